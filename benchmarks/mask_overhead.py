"""What the VoCo mask costs in training: step time of a VoCo batch vs the same batch with VoCo off.

    python benchmarks/mask_overhead.py [--reps 5] [--batch 4]

LLaVA-1.5 shaped sequence scaled to a CPU: 576 vision tokens per image (96 px, patch 4), a ~35-token
system prompt, ~40-token question and answer, a small Llama. For each backend (eager, sdpa) it runs
forward + backward of the same batch with voco_tokens=1 (VoCo mask) and with voco_tokens=0 (the
plain causal path of LlavaForConditionalGeneration, one VoCo token still in the sequence), interleaved,
and prints the median ratio. It also times building the mask alone (transformers' vmap mask builder
with our and_mask_function, and the broadcast dense_mask) against the step. Ratios only: absolute
seconds on these shared machines mean little (docs/design.md §6).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

import llava_voco
from llava_voco.fixtures import TinySizes, build_tiny_llava


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)

    workdir = tempfile.mkdtemp()
    sizes = TinySizes(image_size=96, patch_size=4, vision_hidden=64, text_hidden=256, text_layers=4, heads=8, kv_heads=4)
    build_tiny_llava(f"{workdir}/llava", sizes)
    _, processor = llava_voco.add_voco_to_llava(f"{workdir}/llava", voco_tokens=1, output_dir=f"{workdir}/voco")

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)) for _ in range(args.batch)]
    question = "Which digit is at the top left of the image and what is the sum of all the digits in it? " * 2
    texts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
             {"role": "assistant", "content": "The digit at the top left is seven and the sum is eighteen. " * 2}]
        )
        for _ in images
    ]
    batch = processor(images=images, text=texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    seq = batch["input_ids"].shape[1]
    print(f"batch {args.batch} x {seq} tokens (576 vision + 1 VoCo per sample), {args.reps} reps, median ratios\n")

    rows = []
    for implementation in ("eager", "sdpa"):
        models = {
            k: llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(
                f"{workdir}/voco", voco_tokens=k, attn_implementation=implementation
            ).train()
            for k in (1, 0)
        }

        def step(model):
            model.zero_grad(set_to_none=True)
            model(**batch, labels=labels).loss.backward()

        voco_model = models[1]
        layout = voco_model.model.voco_layout(batch["input_ids"], batch["attention_mask"], batch["pixel_values"])

        def build_mask():
            voco_model.model.voco_attention_mask(layout, seq, args.batch, batch["attention_mask"], None, None)

        for model in models.values():
            step(model)  # warm up
        times = {"voco": [], "causal": [], "mask": [], "dense": []}
        for _ in range(args.reps):
            times["voco"].append(timed(lambda: step(models[1])))
            times["causal"].append(timed(lambda: step(models[0])))
            times["mask"].append(timed(build_mask))
            times["dense"].append(timed(lambda: layout.dense_mask(batch["attention_mask"])))
        median = {k: statistics.median(v) for k, v in times.items()}
        rows.append((implementation, median["voco"] / median["causal"], median["mask"] / median["voco"],
                     median["dense"] / median["voco"]))

    print(f"{'backend':<8} {'VoCo step / causal step':>24} {'mask build / step':>18} {'dense_mask / step':>18}")
    for implementation, ratio, mask_share, dense_share in rows:
        print(f"{implementation:<8} {ratio:>24.3f} {mask_share:>18.3f} {dense_share:>18.3f}")


if __name__ == "__main__":
    main()
