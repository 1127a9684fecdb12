"""Video at length: LLaMA-VID token generation and VoCo streaming compression for 60, 600, 3,600 frames.

    python benchmarks/video.py [--frames 60 600 3600] [--out benchmarks/video.json]

Each (stage, frame count) runs in a fresh process; right before the stage its peak resident size is
reset (Linux ``/proc/self/clear_refs``), and the figure reported is the peak during the stage minus the
resident size at its start, i.e. what the stage itself added. Stages, on a tiny model (16 patch tokens per 16 px frame):

* ``llamavid``: precomputed frame features (``[frames, patches, dim]``, safetensors, as
  ``scripts/extract_video_features.py`` would write) -> LLaMA-VID's context + mean-pooled content token
  per frame, ``frame_chunk`` frames at a time;
* ``voco``: a prompt with every frame followed by one VoCo token, compressed frame by frame with
  ``model.compress`` (the cache holds the prefix, the VoCo tokens so far and one frame).
Targets (issue 5): time linear (3,600 frames <= 1.3 x 60 x the 60-frame time), token-stage memory at
3,600 frames <= 1.2 x that at 60.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time


def status_mb(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise KeyError(field)


def start_measuring() -> float:
    """Reset the process's peak resident size (Linux: clear_refs 5) and return the current size."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return status_mb("VmRSS")


def run_stage(stage: str, frames: int, workdir: str) -> dict:
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    import llava_voco
    from llava_voco.model.projectors.llamavid import FrameFeatures, encode_instructions
    from llava_voco.demo.tiny import build_tiny_llava, train_wordpiece_tokenizer

    torch.manual_seed(0)
    torch.set_grad_enabled(False)
    build_tiny_llava(f"{workdir}/llava")
    if stage == "llamavid":
        bert = train_wordpiece_tokenizer()
        base = llava_voco.VoCoLlavaConfig.from_pretrained(f"{workdir}/llava").to_dict()
        base.pop("model_type")
        config = llava_voco.VoCoLlavaConfig(**{
            **base, "mm_projector_type": "llamavid", "llamavid_num_query": 8, "llamavid_video_compress_type": "mean",
            "llamavid_qformer": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                 "intermediate_size": 64, "vocab_size": len(bert)},
        })
        model = llava_voco.VoCoLlavaForConditionalGeneration(config).eval()
        features_path = f"{workdir}/features.safetensors"
        save_file({"features": torch.randn(frames, 16, config.vision_config.hidden_size)}, features_path)
        features = FrameFeatures(features_path)  # read a chunk at a time
        instruction = encode_instructions(bert, ["what is the sum of the digits in the video"])
        ids = instruction["instruction_input_ids"].expand(frames, -1)
        mask = instruction["instruction_attention_mask"].expand(frames, -1)
        before = start_measuring()
        start = time.perf_counter()
        tokens = model.model.multi_modal_projector(features, ids, mask, compress_type="mean",
                                                   frame_chunk=config.frame_chunk)
        seconds = time.perf_counter() - start
        produced = tokens.shape[0] * tokens.shape[1]
    else:
        model, processor = llava_voco.add_voco_to_llava(f"{workdir}/llava", voco_tokens=1)
        model.eval()
        rng = np.random.default_rng(0)
        video = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(frames)]
        inputs = processor(videos=[video], text="A chat. USER: <video>", return_tensors="pt")
        before = start_measuring()
        start = time.perf_counter()
        cache = model.compress(**inputs)
        seconds = time.perf_counter() - start
        produced = cache.get_seq_length()
    peak = status_mb("VmHWM")
    return {"stage": stage, "frames": frames, "seconds": seconds, "added_peak_mb": max(peak - before, 0.0),
            "tokens": produced}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--frames", type=int, nargs="+", default=[60, 600, 3600])
    parser.add_argument("--out", default="benchmarks/video.json")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:  # a child process: one measurement
        print(json.dumps(run_stage(args.stage, args.count, tempfile.mkdtemp())))
        return

    rows = []
    for stage in ("llamavid", "voco"):
        for frames in args.frames:
            child = subprocess.run([sys.executable, __file__, "--stage", stage, "--count", str(frames)],
                                   capture_output=True, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"  {stage:<9} {frames:>6} frames: {rows[-1]['seconds']:8.2f} s, "
                  f"+{rows[-1]['added_peak_mb']:7.1f} MB peak, {rows[-1]['tokens']} tokens", flush=True)
    print()
    smallest, largest = min(args.frames), max(args.frames)
    for stage in ("llamavid", "voco"):
        by_frames = {row["frames"]: row for row in rows if row["stage"] == stage}
        scale = largest / smallest
        time_ratio = by_frames[largest]["seconds"] / (scale * by_frames[smallest]["seconds"])
        memory_ratio = (by_frames[largest]["added_peak_mb"] + 1) / (by_frames[smallest]["added_peak_mb"] + 1)
        print(f"{stage:<9} time({largest}) / ({scale:.0f} x time({smallest})) = {time_ratio:.2f} (target <= 1.3); "
              f"added peak memory {largest} vs {smallest} frames = {memory_ratio:.2f}x (target <= 1.2, +1 MB each)")
    with open(args.out, "w") as handle:
        json.dump(rows, handle, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
