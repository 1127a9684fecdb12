"""The GPU check: what CPU tests cannot show, in one short run on one CUDA device (no network needed).

    python benchmarks/gpu_check.py [--skip-benchmark]        (or: bash benchmarks/gpu_check.sh)

1. Backends agree on a VoCo batch in bf16, padded and packed: loss and gradients of the varlen path
   (flash-attn's kernel if importable, else torch's own varlen kernel), of flex attention (its backward
   exists on CUDA) and of eager, against sdpa, within bf16 tolerance.
2. A bf16 training step, then compress / answer round trip on CUDA: the answer from the cache equals the
   full masked forward's greedy tokens; a model split over the GPU and the CPU (``device_map``) compresses
   and answers too.
3. ``benchmarks/training.py`` on CUDA (tokens/s, peak memory, VoCo vs causal, padded vs packed).
Prints one table; exits non-zero when a check fails. Budget: well under 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import llava_voco
from llava_voco.constants import IGNORE_INDEX
from llava_voco.demo.tiny import TinySizes, build_tiny_llava
from llava_voco.train.packing import packed_text_batch

BF16_ATOL, BF16_RTOL = 2e-2, 2e-2
SIZES = TinySizes(image_size=32, patch_size=4, vision_hidden=64, text_hidden=256, text_layers=4, heads=8, kv_heads=4)


def varlen_backend() -> str:
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2"
    except ImportError:
        return "varlen_torch"


def batches(processor, images):
    items = []
    for index, question in enumerate(["Which digit is at the top left?", "What is the sum of all digits here?",
                                      "Say hello."]):
        content = ([{"type": "image"}] if index < 2 else []) + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content},
                                              {"role": "assistant", "content": "seven " * (index + 1)}])
        encoded = processor(images=[images[index]] if index < 2 else None, text=text, return_tensors="pt")
        items.append({"input_ids": encoded["input_ids"][0], "labels": encoded["input_ids"][0],
                      "pixel_values": encoded.get("pixel_values")})
    pixels = torch.cat([i["pixel_values"] for i in items if i["pixel_values"] is not None])
    width = max(len(i["input_ids"]) for i in items)
    pad = processor.tokenizer.pad_token_id
    padded = {"input_ids": torch.full((3, width), pad), "attention_mask": torch.zeros(3, width, dtype=torch.long)}
    for row, item in enumerate(items):
        padded["input_ids"][row, : len(item["input_ids"])] = item["input_ids"]
        padded["attention_mask"][row, : len(item["input_ids"])] = 1
    padded["labels"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, IGNORE_INDEX)
    return {"padded": {**padded, "pixel_values": pixels},
            "packed": {**packed_text_batch(items, 4096, pad), "pixel_values": pixels}}


def loss_and_grads(model_dir, backend, batch):
    model = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.bfloat16, attn_implementation={"text_config": backend, "vision_config": "sdpa"},
    ).cuda().train()
    batch = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda()) for k, v in batch.items()}
    loss = model(**batch).loss
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return loss.float().item(), grads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-benchmark", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device", file=sys.stderr)
        return 2
    started = time.perf_counter()
    rows, failed = [], False
    from sklearn.datasets import load_digits
    from PIL import Image
    import numpy as np

    digits = load_digits()
    images = [Image.fromarray(np.kron(d / 16 * 255, np.ones((4, 4))).astype(np.uint8)).convert("RGB")
              for d in digits.images[:4]]
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_llava(Path(tmp) / "llava", sizes=SIZES, seed=0)
        model_dir = Path(tmp) / "voco"
        _, processor = llava_voco.add_voco_to_llava(Path(tmp) / "llava", voco_tokens=1, output_dir=model_dir)
        built = batches(processor, images)
        for layout, batch in built.items():
            reference_loss, reference_grads = loss_and_grads(model_dir, "sdpa", batch)
            for backend in ("eager", "flex_attention", varlen_backend()):
                try:
                    loss, grads = loss_and_grads(model_dir, backend, batch)
                    worst = max(((grads[n] - g).abs().max() / (g.abs().max() + 1e-6)).item()
                                for n, g in reference_grads.items())
                    ok = abs(loss - reference_loss) <= BF16_ATOL + BF16_RTOL * abs(reference_loss) and worst < 5e-2
                    rows.append((f"{backend} vs sdpa, {layout}", f"loss {loss:.4f} vs {reference_loss:.4f}, "
                                 f"worst relative grad diff {worst:.3g}", ok))
                except Exception as error:  # a backend that cannot run here is a finding, not a crash
                    rows.append((f"{backend} vs sdpa, {layout}", f"{type(error).__name__}: {error}"[:160], False))
        # bf16 step, then compress and answer on CUDA, and over GPU + CPU
        model = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
        batch = {k: (v.cuda().to(torch.bfloat16) if v.is_floating_point() else v.cuda())
                 for k, v in built["padded"].items()}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        model.train()
        model(**batch).loss.backward()
        optimizer.step()
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        rows.append(("bf16 training step (CUDA)", f"parameters finite: {finite}", bool(finite)))
        model.eval()
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which digit?"}]}],
            add_generation_prompt=True)
        for placement in ("cuda", "device_map"):
            try:
                if placement == "device_map":
                    layers = model.config.text_config.num_hidden_layers
                    device_map = {"model.vision_tower": 0, "model.multi_modal_projector": 0,
                                  "model.language_model.embed_tokens": 0, "model.language_model.norm": "cpu",
                                  "model.language_model.rotary_emb": 0, "lm_head": "cpu"}
                    device_map.update({f"model.language_model.layers.{i}": 0 if i < layers // 2 else "cpu"
                                       for i in range(layers)})
                    model = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(
                        model_dir, dtype=torch.bfloat16, device_map=device_map).eval()
                full = processor(images=images[0], text=text, return_tensors="pt").to(0)
                full["pixel_values"] = full["pixel_values"].to(torch.bfloat16)
                cut = int((full["input_ids"][0] == model.config.voco_token_id).nonzero()[-1]) + 1
                cache = model.compress(input_ids=full["input_ids"][:, :cut], pixel_values=full["pixel_values"])
                greedy = model.generate(**full, max_new_tokens=6, do_sample=False)[:, full["input_ids"].shape[1]:]
                rest = full["input_ids"][:, cut:]
                answered = model.generate(input_ids=rest, past_key_values=cache, max_new_tokens=6,
                                          do_sample=False)[:, rest.shape[1]:]
                same = torch.equal(greedy.cpu(), answered.cpu())
                rows.append((f"compress + answer, {placement}", f"cached {cache.get_seq_length()} positions, "
                             f"greedy answers equal: {same}", same))
            except Exception as error:
                rows.append((f"compress + answer, {placement}", f"{type(error).__name__}: {error}"[:160], False))
    print(f"\n{'check':<40} {'result':<90} ok")
    for name, result, ok in rows:
        failed |= not ok
        print(f"{name:<40} {result:<90} {'yes' if ok else 'NO'}")
    print(f"\nchecks took {time.perf_counter() - started:.0f} s on {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    if not args.skip_benchmark:
        subprocess.run([sys.executable, str(Path(__file__).with_name("training.py")), "--steps", "5", "--device", "cuda",
                        "--output", "benchmarks/training_gpu.json"], check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
