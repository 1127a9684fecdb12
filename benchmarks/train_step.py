"""Training step time with and without VoCo (``--voco_tokens 1`` vs 0), side by side in one process.

Same weights, same samples, the batches built by the training data pipeline (``llava_voco.train.data``)
with the v1 template; a step is forward + backward + AdamW, as the Trainer does it. The two settings
alternate step by step, so machine noise hits both alike; the ratio is what to read (docs/design.md §6).

    python benchmarks/train_step.py [--steps 30] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import llava_voco
from llava_voco.fixtures import TinySizes, build_tiny_llava
from llava_voco.train.data import DataArguments, make_supervised_data_module, pop_batch_stats

SIZES = {
    "tiny (tests): 16 image tokens, Llama 2 x 64": TinySizes(),
    "small: 64 image tokens, Llama 4 x 256": TinySizes(image_size=32, patch_size=4, vision_hidden=64, vision_layers=2,
                                                         text_hidden=256, text_layers=4, heads=8, kv_heads=4),
}


def write_data(folder: Path, image_size: int, count: int) -> Path:
    from sklearn.datasets import load_digits

    digits = load_digits()
    words = "zero one two three four five six seven eight nine".split()
    samples = []
    for i in range(count):
        gray = (digits.images[i] / 16.0 * 255.0).astype(np.uint8)
        Image.fromarray(np.stack([gray] * 3, -1)).resize((image_size, image_size)).save(folder / f"{i}.png")
        samples.append({"id": i, "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is in the image? What is the sum of the digits?"},
            {"from": "gpt", "value": f"The image shows a handwritten digit: {words[digits.target[i]]}."}]})
    path = folder / "data.json"
    path.write_text(json.dumps(samples))
    return path


def batch_for(model_dir: Path, data_path: Path, batch_size: int):
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(model_dir)
    data_args = DataArguments(data_path=str(data_path), image_folder=str(data_path.parent), lazy_preprocess=True)
    module = make_supervised_data_module(processor, data_args, version="v1", model_max_length=512)
    batch = module["data_collator"]([module["train_dataset"][i] for i in range(batch_size)])
    pop_batch_stats(batch)
    return batch


def step(model, optimizer, batch):
    optimizer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    model(**batch).loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    for name, sizes in SIZES.items():
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            build_tiny_llava(tmp / "llava", sizes=sizes, seed=0)
            llava_voco.add_voco_to_llava(tmp / "llava", voco_tokens=1, output_dir=tmp / "voco1")
            data_path = write_data(tmp, sizes.image_size, args.batch)
            models, batches, optimizers = {}, {}, {}
            for k in (0, 1):
                # k=0: the same checkpoint with VoCo off (plain LLaVA: causal mask, no VoCo token).
                models[k] = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(
                    tmp / "voco1", voco_tokens=k, attn_implementation="sdpa").train()
                processor = llava_voco.VoCoLlavaProcessor.from_pretrained(tmp / "voco1", voco_tokens=k)
                processor.save_pretrained(tmp / f"proc{k}")
                batches[k] = batch_for(tmp / f"proc{k}", data_path, args.batch)
                optimizers[k] = torch.optim.AdamW(models[k].parameters(), lr=1e-4)
            times = {0: [], 1: []}
            for i in range(args.steps + 3):
                for k in (0, 1) if i % 2 == 0 else (1, 0):
                    elapsed = step(models[k], optimizers[k], batches[k])
                    if i >= 3:  # warm-up
                        times[k].append(elapsed)
            median = {k: statistics.median(v) for k, v in times.items()}
            tokens = {k: tuple(batches[k]["input_ids"].shape) for k in (0, 1)}
            print(f"{name}: batch {args.batch}, input_ids {tokens[0]} (k=0) vs {tokens[1]} (k=1)")
            print(f"  median step  k=0: {median[0] * 1e3:.1f} ms   k=1: {median[1] * 1e3:.1f} ms   "
                  f"ratio k=1 / k=0: {median[1] / median[0]:.3f}")


if __name__ == "__main__":
    main()
