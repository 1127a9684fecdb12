"""Training step: VoCo against plain causal attention, per backend, padded against packed rows.

On a LLaVA-like mix of sample lengths (image samples with short and long turns, text-only samples), one
forward + backward + AdamW step, as the Trainer runs it. Every configuration uses the same weights and the
same samples; they run in turn, step after step, so machine noise hits all alike: read the ratios, not the
seconds (docs/design.md §6). Peak memory: CUDA's allocator peak on a GPU; on CPU (Linux) the growth of the
process's peak resident memory during one step after a warm-up step, each configuration in a fresh process
(coarse, but comparable).

    python benchmarks/training.py [--steps 6] [--batch 8] [--backends eager,sdpa,flex_attention,varlen_reference]

"VoCo" is the batch with its VoCo tokens and the mask; "causal" the same batch and tokens with a plain
causal mask (``voco_mask=False``). flex_attention has no backward on CPU: forward only there.
The cost of distillation (``--voco_distill_weight``, ``--voco_distill_hidden``: one more forward of the same
weights with the mask off, under no_grad) is measured on the first backend, padded: "voco+kl" and
"voco+kl+hidden" against "voco".
flash_attention_2 joins the backends when flash-attn is installed (a CUDA machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import llava_voco
from llava_voco.constants import IGNORE_INDEX
from llava_voco.demo.tiny import TinySizes, build_tiny_llava
from llava_voco.train.distillation import VoCoDistillation
from llava_voco.train.packing import packed_text_batch

SIZES = TinySizes(image_size=32, patch_size=4, vision_hidden=64, vision_layers=2, text_hidden=256, text_layers=4,
                  heads=8, kv_heads=4)  # 64 image tokens per image, Llama 4 x 256 with GQA
MAX_LENGTH = 512


def build(workdir: Path):
    build_tiny_llava(workdir / "llava", sizes=SIZES, seed=0)
    llava_voco.add_voco_to_llava(workdir / "llava", voco_tokens=1, output_dir=workdir / "voco")
    return workdir / "voco"


def samples(processor, batch_size: int) -> list[dict]:
    """A mix: image samples whose turns run from a few words to a paragraph, and text-only samples."""
    rng = np.random.default_rng(0)
    words = "which digit is at the top left of the image and what is the sum of all digits in it".split()
    items = []
    for index in range(batch_size):
        with_image = index % 3 != 2
        question = " ".join(rng.choice(words, size=int(rng.integers(4, 40))))
        answer = " ".join(rng.choice(words, size=int(rng.integers(2, 60))))
        content = ([{"type": "image"}] if with_image else []) + [{"type": "text", "text": question}]
        text = processor.apply_chat_template([{"role": "user", "content": content},
                                              {"role": "assistant", "content": answer}])
        image = Image.fromarray(rng.integers(0, 255, (SIZES.image_size, SIZES.image_size, 3), dtype=np.uint8))
        encoded = processor(images=[image] if with_image else None, text=text, return_tensors="pt")
        items.append({"input_ids": encoded["input_ids"][0], "labels": encoded["input_ids"][0].clone(),
                      "pixel_values": encoded.get("pixel_values")})
    return items


def batches(items: list[dict], pad_id: int) -> dict[str, dict]:
    pixels = torch.cat([item["pixel_values"] for item in items if item["pixel_values"] is not None])
    width = max(len(item["input_ids"]) for item in items)
    padded = {"input_ids": torch.full((len(items), width), pad_id), "attention_mask": torch.zeros(len(items), width,
              dtype=torch.long)}
    for row, item in enumerate(items):
        padded["input_ids"][row, : len(item["input_ids"])] = item["input_ids"]
        padded["attention_mask"][row, : len(item["input_ids"])] = 1
    padded["labels"] = padded["input_ids"].masked_fill(padded["attention_mask"] == 0, IGNORE_INDEX)
    packed = packed_text_batch(items, MAX_LENGTH, pad_id)
    return {"padded": {**padded, "pixel_values": pixels}, "packed": {**packed, "pixel_values": pixels}}


DISTILL_MASKS = ("voco+kl", "voco+kl+hidden")


def configurations(backends: list[str]) -> list[tuple[str, str, str]]:
    configs = [(backend, mask, layout) for backend in backends for mask in ("voco", "causal") for layout in ("padded", "packed")]
    return configs + [(backends[0], mask, "padded") for mask in DISTILL_MASKS]


def make_step(model_dir: Path, backend: str, mask: str, batch: dict, device: str):
    model = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(
        model_dir, attn_implementation={"text_config": backend, "vision_config": "sdpa"}).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = {name: value.to(device) for name, value in batch.items()}
    if mask == "causal":  # the same tokens with plain causal attention
        batch["voco_mask"] = False
    forward_only = backend == "flex_attention" and device == "cpu"
    distillation = None
    if mask in DISTILL_MASKS:
        distillation = VoCoDistillation(weight=1.0, temperature=2.0, hidden_weight=1.0 if mask.endswith("hidden") else 0.0)

    def step():
        optimizer.zero_grad(set_to_none=True)
        if forward_only:
            with torch.no_grad():
                model(**batch)
            return
        if distillation is None:
            model(**batch).loss.backward()
        else:
            outputs = model(**batch, output_hidden_states=distillation.needs_hidden_states)
            (outputs.loss + distillation.loss(distillation.terms(model, batch, outputs))).backward()
        optimizer.step()

    return step


def synchronize(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_of(model_dir: Path, backend: str, mask: str, layout: str, batch_size: int, device: str) -> float:
    """MiB one step adds to the peak (CUDA allocator peak, or peak RSS growth in a fresh CPU process)."""
    processor = llava_voco.VoCoLlavaProcessor.from_pretrained(model_dir)
    batch = batches(samples(processor, batch_size), processor.tokenizer.pad_token_id)[layout]
    step = make_step(model_dir, backend, mask, batch, device)
    if device == "cuda":
        step()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    step()  # warm up (optimizer state, lazily built kernels)
    Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident size to the current one
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) / 1024


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backends", default="eager,sdpa,flex_attention,varlen_reference")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--memory-of", default=None, help=argparse.SUPPRESS)  # backend,mask,layout (child process)
    parser.add_argument("--output", default="benchmarks/training.json")
    args = parser.parse_args()
    if args.memory_of:
        backend, mask, layout = args.memory_of.split(",")
        print(json.dumps(peak_memory_of(Path(args.model_dir), backend, mask, layout, args.batch, args.device)))
        return
    backends = args.backends.split(",")
    try:
        import flash_attn  # noqa: F401

        backends.append("flash_attention_2")
    except ImportError:
        pass
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build(Path(tmp))
        processor = llava_voco.VoCoLlavaProcessor.from_pretrained(model_dir)
        items = samples(processor, args.batch)
        built = batches(items, processor.tokenizer.pad_token_id)
        real_tokens = int(built["padded"]["attention_mask"].sum())
        shapes = {name: tuple(batch["input_ids"].shape) for name, batch in built.items()}
        print(f"{args.batch} samples, {real_tokens} real tokens; padded {shapes['padded']}, packed {shapes['packed']} "
              f"(rows of at most {MAX_LENGTH}); device {args.device}, torch {torch.__version__}")
        configs = configurations(backends)
        steps = {config: make_step(model_dir, config[0], config[1], built[config[2]], args.device) for config in configs}
        times = {config: [] for config in configs}
        for repeat in range(args.steps + 1):
            order = configs if repeat % 2 == 0 else configs[::-1]
            for config in order:
                synchronize(args.device)
                start = time.perf_counter()
                steps[config]()
                synchronize(args.device)
                if repeat > 0:  # the first round warms up
                    times[config].append(time.perf_counter() - start)
        memory = {}
        for config in configs:
            if args.device == "cuda":
                memory[config] = peak_memory_of(model_dir, *config, args.batch, args.device)
            else:
                child = subprocess.run(
                    [sys.executable, __file__, "--model-dir", str(model_dir), "--memory-of", ",".join(config),
                     "--batch", str(args.batch), "--device", args.device],
                    capture_output=True, text=True, check=True,
                )
                memory[config] = json.loads(child.stdout.strip().splitlines()[-1])
    median = {config: statistics.median(values) for config, values in times.items()}
    tokens_per_second = {config: real_tokens / seconds for config, seconds in median.items()}
    print(f"\n{'backend':<18} {'layout':<7} {'VoCo tok/s':>11} {'causal tok/s':>13} {'VoCo/causal step':>17} "
          f"{'VoCo MiB':>9} {'causal MiB':>11}")
    for backend in backends:
        for layout in ("padded", "packed"):
            voco, causal = (backend, "voco", layout), (backend, "causal", layout)
            print(f"{backend:<18} {layout:<7} {tokens_per_second[voco]:>11.0f} {tokens_per_second[causal]:>13.0f} "
                  f"{median[voco] / median[causal]:>17.3f} {memory[voco]:>9.1f} {memory[causal]:>11.1f}")
    print(f"\n{'backend':<18} {'packed / padded tok/s (VoCo)':>29} {'(causal)':>9}")
    for backend in backends:
        ratios = [median[(backend, mask, "padded")] / median[(backend, mask, "packed")] for mask in ("voco", "causal")]
        print(f"{backend:<18} {ratios[0]:>29.3f} {ratios[1]:>9.3f}")
    voco = (backends[0], "voco", "padded")
    print(f"\ndistillation ({backends[0]}, padded)   step / VoCo step   MiB (VoCo: {memory[voco]:.1f})")
    for mask in DISTILL_MASKS:
        config = (backends[0], mask, "padded")
        print(f"{mask:<32} {median[config] / median[voco]:>16.3f}   {memory[config]:.1f}")
    if "flex_attention" in backends and args.device == "cpu":
        print("\nflex_attention: forward only on CPU (no backward there); its training step is unchecked until a GPU run")
    record = {"device": args.device, "torch": torch.__version__, "samples": args.batch, "real_tokens": real_tokens,
              "shapes": shapes, "median_step_seconds": {"/".join(c): v for c, v in median.items()},
              "peak_mib": {"/".join(c): v for c, v in memory.items()}}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(record, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
