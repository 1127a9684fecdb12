"""One base model served three ways, side by side: VoCo caches, a full-token prefix cache, full-token prefill.

    python benchmarks/serving.py [--out benchmarks/out/serving] [--sessions 64] [--questions 2]
        [--concurrency 1,16,64] [--max-tokens 16] [--threads 1] [--device cpu]

The model has CLIP-336's geometry (a 336 x 336 image becomes 576 vision tokens; patch 14) at a tiny width,
random weights (throughput and memory do not depend on what the weights know). Its VoCo version (k=1) is
served with ``--mode voco``; the base LLaVA with ``--mode full-cache`` (each image's prompt head prefilled once
with all 576 vision tokens and kept, as a prefix-caching engine would) and ``--mode full`` (every request
prefills its image). For each mode and concurrency C a fresh server (``llava_voco.serve.server``, a
subprocess on 127.0.0.1) answers ``--sessions`` sessions over 16 images, C at a time, each asking
``--questions`` questions in turn with the ``openai`` client (streaming). Measured: answers per second (first
request to last answer, compressions included), time to first token (p50 / p95), the server's peak resident
memory (VmHWM), prompt positions held per answer and their key/value bytes, and the bytes of the image caches
the server keeps (``voco_cache_bytes``) per session. Writes ``serving.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))
sys.path.insert(0, str(PROJECT_ROOT / "tests"))

IMAGES = 16
QUESTIONS = ["What is in the image?", "Which digit is at the top left?", "What is the sum of the digits?",
             "How many times does 7 appear?"]
MODES = ("voco", "full-cache", "full")


def build_models(out: Path) -> tuple[Path, Path]:
    """(base LLaVA, its VoCo version): CLIP-336 geometry, tiny width."""
    import llava_voco
    from llava_voco.demo.tiny import TinySizes, build_tiny_llava

    base, voco = out / "models" / "llava-336-tiny", out / "models" / "voco-336-tiny"
    if not (voco / "config.json").exists():
        sizes = TinySizes(image_size=336, patch_size=14, vision_hidden=64, vision_layers=2, text_hidden=256,
                          text_layers=4, heads=4, kv_heads=4)
        build_tiny_llava(base, sizes=sizes, seed=0)
        llava_voco.add_voco_to_llava(base, voco_tokens=1, output_dir=voco)
    return base, voco


def image_urls() -> list[str]:
    """16 handwritten digits (scikit-learn's), enlarged to 336 x 336, as PNG data URLs."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from serve_support import png_data_url

    urls = []
    for pixels in load_digits().images[:IMAGES]:
        gray = (pixels / 16.0 * 255.0).astype(np.uint8)
        image = Image.fromarray(np.stack([gray] * 3, axis=-1)).resize((336, 336), Image.NEAREST)
        urls.append(png_data_url(image))
    return urls


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


async def run_sessions(base_url: str, model: str, urls: list[str], sessions: int, questions: int, concurrency: int,
                       max_tokens: int) -> list[dict]:
    import openai

    from serve_support import image_message

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="none", max_retries=0, timeout=600)
    gate = asyncio.Semaphore(concurrency)
    records = []

    async def session(number: int) -> None:
        async with gate:
            for turn in range(questions):
                question = QUESTIONS[(number // IMAGES + turn) % len(QUESTIONS)]
                started = time.perf_counter()
                first, usage, text = None, None, ""
                stream = await client.chat.completions.create(
                    model=model, max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                    messages=image_message(urls[number % IMAGES], question))
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter()
                        text += chunk.choices[0].delta.content
                    if chunk.usage:
                        usage = chunk.usage
                records.append({"ttft_s": (first or time.perf_counter()) - started, "text": text,
                                "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                "uncompressed_prompt_tokens": usage.model_extra["uncompressed_prompt_tokens"]})

    try:
        await asyncio.gather(*(session(number) for number in range(sessions)))
    finally:
        await client.close()
    return records


def measure(mode: str, model_dir: Path, urls: list[str], concurrency: int, args, scratch: Path) -> dict:
    import httpx

    from serve_support import running_server

    extra = ["--mode", mode, "--max-batch", str(max(args.concurrency_levels)), "--hot-cache-entries", str(IMAGES),
             "--threads", str(args.threads)] + (["--device", args.device] if args.device else [])
    with running_server(model_dir, scratch, *extra) as server:
        started = time.perf_counter()
        records = asyncio.run(run_sessions(server.base_url, model_dir.name, urls, args.sessions, args.questions,
                                           concurrency, args.max_tokens))
        elapsed = time.perf_counter() - started
        metrics = server.metrics()
        peak = peak_rss_bytes(server.process.pid)
        config = httpx.get(server.base_url + "/health").json()
    ttfts = sorted(record["ttft_s"] for record in records)
    layers, kv_heads, head_dim = args.kv_shape
    bytes_per_position = 2 * layers * kv_heads * head_dim * 4  # keys and values, float32
    prompt_positions = statistics.mean(record["prompt_tokens"] for record in records)
    from transformers import AutoConfig

    from llava_voco.model.image_inputs import tokens_per_image

    # positions an image takes in the prompt as laid out (vision tokens, plus VoCo), and as the model holds it
    laid_out = tokens_per_image(AutoConfig.from_pretrained(model_dir)).total
    image_positions = statistics.mean(record["prompt_tokens"] - (record["uncompressed_prompt_tokens"] - laid_out)
                                      for record in records)
    return {
        "mode": mode, "concurrency": concurrency, "answers": len(records), "seconds": round(elapsed, 2),
        "answers_per_s": round(len(records) / elapsed, 2),
        "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3), "ttft_p95_s": round(ttfts[int(0.95 * (len(ttfts) - 1))], 3),
        "peak_rss_mib": round(peak / 2**20, 1),
        "prompt_positions": round(prompt_positions, 1),
        "prompt_kv_bytes_per_session": int(prompt_positions * bytes_per_position),
        "image_positions": round(image_positions, 1),
        "image_kv_bytes_per_session": int(image_positions * bytes_per_position),
        "image_cache_bytes_per_session": int(metrics.get("voco_cache_bytes", 0) / args.sessions),
        "image_cache_bytes": int(metrics.get("voco_cache_bytes", 0)),
        "compressions": int(metrics.get("voco_compressions_total", 0)),
        "tokens_generated": int(metrics.get("voco_tokens_generated_total", 0)),
        "server_mode": config["mode"],
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(PROJECT_ROOT / "benchmarks" / "out" / "serving"))
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--questions", type=int, default=2, help="questions per session, asked in turn")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--device", default=None)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    args.concurrency_levels = [int(level) for level in args.concurrency.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, voco = build_models(out)
    from transformers import AutoConfig

    text_config = AutoConfig.from_pretrained(base).text_config
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    args.kv_shape = (text_config.num_hidden_layers, text_config.num_key_value_heads, head_dim)
    urls = image_urls()
    rows = []
    for concurrency in args.concurrency_levels:
        for mode in args.modes.split(","):
            row = measure(mode, voco if mode == "voco" else base, urls, concurrency, args, out)
            rows.append(row)
            print(json.dumps(row), flush=True)
    (out / "serving.json").write_text(json.dumps({"args": {k: v for k, v in vars(args).items()}, "rows": rows},
                                                 indent=2, default=str))
    print()
    print("| sessions at once | serving | answers/s | TTFT p50 (s) | TTFT p95 (s) | peak RSS (MiB) "
          "| image positions held | image KV / session | prompt KV / session | cache kept / session | prefills of an image |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['concurrency']} | {row['mode']} | {row['answers_per_s']} | {row['ttft_p50_s']} | "
              f"{row['ttft_p95_s']} | {row['peak_rss_mib']} | {row['image_positions']:g} | "
              f"{row['image_kv_bytes_per_session'] / 1024:.1f} KiB | {row['prompt_kv_bytes_per_session'] / 1024:.1f} KiB | "
              f"{row['image_cache_bytes_per_session'] / 1024:.1f} KiB | "
              f"{row['compressions'] if row['mode'] != 'full' else row['answers']} |")
    by = {(row["mode"], row["concurrency"]): row for row in rows}
    for concurrency in args.concurrency_levels:
        if ("voco", concurrency) in by:
            voco_row = by["voco", concurrency]
            for other in ("full", "full-cache"):
                if (other, concurrency) in by:
                    row = by[other, concurrency]
                    print(f"C={concurrency}: voco/{other}: answers/s x{voco_row['answers_per_s'] / row['answers_per_s']:.2f}, "
                          f"image KV per session 1/{row['image_kv_bytes_per_session'] / voco_row['image_kv_bytes_per_session']:.0f}, "
                          f"prompt KV per session 1/{row['prompt_kv_bytes_per_session'] / voco_row['prompt_kv_bytes_per_session']:.1f}"
                          + (f", image cache per session 1/{row['image_cache_bytes_per_session'] / voco_row['image_cache_bytes_per_session']:.0f}"
                             if row["image_cache_bytes_per_session"] and voco_row["image_cache_bytes_per_session"] else ""))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
