"""A short, runnable look at VoCo on a tiny LLaVA built here (no downloads).

    python -m llava_voco.demo.mask [--voco-tokens 1] [--mask-mode paper]

Builds a plain LLaVA checkpoint from configs (CLIP tower, Llama, a tokenizer trained on the spot),
turns it into a VoCo checkpoint with ``add_voco_to_llava``, runs a real handwritten digit from
scikit-learn through it, and prints the token layout, the VoCo mask (by block) and how many cached
positions the text needs once the vision tokens are dropped, checking that dropping them changes no
logit. The main demo, a model trained to answer questions about digits, is ``python -m llava_voco.demo``.
"""

from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch
from PIL import Image

from ..model.builder import add_voco_to_llava
from .tiny import build_tiny_llava


def digit_image(index: int = 0) -> Image.Image:
    from sklearn.datasets import load_digits

    pixels = load_digits().images[index] / 16.0 * 255.0
    gray = np.kron(pixels, np.ones((2, 2))).astype(np.uint8)
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


def block_summary(mask: torch.Tensor, segments: list[tuple[str, int, int]]) -> list[str]:
    """One line per segment pair: 'all', 'none', 'causal' or 'some' of the query->key block attends."""
    lines = [" " * 8 + "".join(f"{name:>9}" for name, _, _ in segments)]
    for q_name, q0, q1 in segments:
        cells = []
        for _, k0, k1 in segments:
            block = mask[q0:q1, k0:k1]
            if block.numel() == 0:
                cells.append("-")
            elif block.all():
                cells.append("all")
            elif not block.any():
                cells.append("none")
            elif q0 == k0 and torch.equal(block, torch.ones_like(block).tril()):
                cells.append("causal")
            else:
                cells.append("some")
        lines.append(f"{q_name:>8}" + "".join(f"{c:>9}" for c in cells))
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--voco-tokens", type=int, default=1)
    parser.add_argument("--mask-mode", choices=["paper", "official"], default="paper")
    args = parser.parse_args(argv)

    workdir = tempfile.mkdtemp(prefix="llava_voco_demo_")
    build_tiny_llava(f"{workdir}/llava")
    model, processor = add_voco_to_llava(
        f"{workdir}/llava", voco_tokens=args.voco_tokens, voco_mask_mode=args.mask_mode, output_dir=f"{workdir}/voco"
    )
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny LLaVA ({n_params:,} parameters) with VoCo k={args.voco_tokens}, mask mode {args.mask_mode!r}")
    print(f"checkpoint: {workdir}/voco (loads with AutoModelForImageTextToText after `import llava_voco`)\n")

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    batch = processor(images=digit_image(0), text=text, return_tensors="pt")
    ids = batch["input_ids"][0]
    vision = (ids == model.config.image_token_id).nonzero().squeeze(1)
    voco = (ids == model.config.voco_token_id).nonzero().squeeze(1)
    v0, v1, c1 = int(vision[0]), int(vision[-1]) + 1, int(voco[-1]) + 1
    segments = [("prefix", 0, v0), ("vision", v0, v1), ("VoCo", v1, c1), ("text", c1, len(ids))]
    print("sequence: " + ", ".join(f"{name} {end - start}" for name, start, end in segments))

    layout = model.model.voco_layout(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
    mask = layout.dense_mask(batch["attention_mask"])[0, 0]
    print("\nwho may attend to whom (rows: queries, columns: keys):")
    print("\n".join(block_summary(mask, segments)))

    # Compress: one pass over everything up to the last VoCo token keeps only what text may read.
    head = {key: value[:, :c1] if key in ("input_ids", "attention_mask") else value for key, value in batch.items()}
    cache = model.compress(**head)
    cached_after_drop = cache.get_seq_length()
    with torch.no_grad():
        full_logits = model(**batch).logits[:, c1:]
        compressed_logits = model(input_ids=batch["input_ids"][:, c1:], past_key_values=cache).logits
    before, after = c1, cached_after_drop
    print(f"\nKV cache the text reads: {before} positions with vision, {after} after dropping it "
          f"({v1 - v0} vision tokens -> {c1 - v1} VoCo token(s), {(v1 - v0) / (c1 - v1):.0f}x per image)")
    difference = (compressed_logits - full_logits).abs().max().item()
    print(f"largest logit difference, compressed cache vs full masked forward: {difference:.2e}")


if __name__ == "__main__":
    main()
