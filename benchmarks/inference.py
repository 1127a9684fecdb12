"""Compress once, answer many: cache size and answer time, full tokens vs a reused VoCo cache.

    python benchmarks/inference.py [--reps 5] [--out benchmarks/inference.json]

A LLaVA-1.5 shaped model scaled to a 2-core CPU: 576 vision tokens per image (96 px, patch 4), a
~35-token system prompt, ~40-token questions, 8-token answers, a 32,000-row vocabulary, and a Llama of
8 layers x 512 wide (MLP 1,376) so that attention over the long prompt and the MLPs both cost something.
All paths run in one process, interleaved, each figure the median of ``--reps`` repetitions:

(a) cache bytes per image beyond the shared prompt: full tokens, VoCo k=1, k=4;
(b) time to first token and time for a whole 8-token answer: full tokens re-prefilled (vision tower
    included), a reused full-token cache, a reused VoCo cache, and the same question with no image
    (only the prompt cached: the floor any cache can reach);
(c) total time for Q = 1, 4, 16 questions about one image, compression included.
Prints ratios (docs/design.md §6) and writes every figure as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image
from transformers import DynamicCache

import llava_voco
from llava_voco.conversation import HUMAN, get_template
from llava_voco.demo.tiny import TinySizes, build_tiny_llava
from llava_voco.engine import ids_after_media
from llava_voco.inference import first_human_turn, prompt_for_reply

ANSWER_TOKENS = 8


def cache_bytes(cache) -> int:
    return sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)


def split_at(tokenizer, text: str, boundary: int) -> tuple[list[int], list[int]]:
    """The whole ``text``'s tokens, split into those before character ``boundary`` and those after."""
    encoded = tokenizer(text, return_offsets_mapping=True)
    head = sum(1 for start, end in encoded["offset_mapping"] if end <= boundary)
    return encoded["input_ids"][:head], encoded["input_ids"][head:]


def median_time(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/inference.json")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)

    workdir = tempfile.mkdtemp()
    sizes = TinySizes(image_size=96, patch_size=4, vision_hidden=64, vision_layers=2, text_hidden=512, text_layers=8,
                      text_intermediate=1376, heads=8, kv_heads=8, embedding_rows=32000)
    build_tiny_llava(f"{workdir}/llava", sizes)
    models, processors = {}, {}
    for k in (1, 4):
        llava_voco.add_voco_to_llava(f"{workdir}/llava", voco_tokens=k, output_dir=f"{workdir}/voco{k}")
        models[k] = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(f"{workdir}/voco{k}").eval()
        processors[k] = llava_voco.VoCoLlavaProcessor.from_pretrained(f"{workdir}/voco{k}")
    # the same weights with VoCo off: plain LLaVA (the <voco> row exists but is never used)
    models[0] = llava_voco.VoCoLlavaForConditionalGeneration.from_pretrained(f"{workdir}/voco1", voco_tokens=0).eval()
    processors[0] = llava_voco.VoCoLlavaProcessor.from_pretrained(f"{workdir}/voco1", voco_tokens=0)
    tokenizer = processors[0].tokenizer

    template = get_template("v1")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    questions = [
        f"Question {i}: which digit is at the top left of the image, and what is the sum of the digits?"
        for i in range(16)
    ]
    prompts = [prompt_for_reply(template, [(HUMAN, first_human_turn(q, 1))], 1) for q in questions]
    head_text = prompts[0][: prompts[0].index("<image>") + len("<image>")]
    no_image_prompts = [prompt_for_reply(template, [(HUMAN, q)], 0) for q in questions]
    floor_head = no_image_prompts[0][: no_image_prompts[0].index("USER:") + len("USER:")]
    # each question's tokens as the whole prompt has them (tokenized alone they may split otherwise)
    question_ids = [ids_after_media(tokenizer, p, processors[0].image_token_id) for p in prompts]
    floor_split = [split_at(tokenizer, p, len(floor_head)) for p in no_image_prompts]
    n_system = len(tokenizer(head_text.split("USER:")[0])["input_ids"])
    n_question = len(question_ids[0])
    print(f"prompt: {n_system} system tokens, 576 vision tokens, {n_question}-token questions, "
          f"{ANSWER_TOKENS}-token answers, vocabulary {models[0].config.text_config.vocab_size}, {args.reps} reps\n")

    # --- caches -----------------------------------------------------------------------------
    full_inputs = processors[0](images=image, text=head_text, return_tensors="pt")

    def full_cache():
        cache = DynamicCache(config=models[0].config.text_config)
        models[0](**full_inputs, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    def voco_cache(k):
        return models[k].compress(**processors[k](images=image, text=head_text, return_tensors="pt"))

    floor_ids = {"input_ids": torch.tensor([floor_split[0][0]])}

    def floor_cache():
        cache = DynamicCache(config=models[0].config.text_config)
        models[0](**floor_ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return cache

    prompt_only = tokenizer(head_text.replace("<image>", ""), return_tensors="pt")
    base = DynamicCache(config=models[0].config.text_config)
    models[0](input_ids=prompt_only["input_ids"], past_key_values=base, use_cache=True, logits_to_keep=1)
    shared_prompt_bytes = cache_bytes(base)
    caches = {"full": full_cache(), "voco1": voco_cache(1), "voco4": voco_cache(4), "floor": floor_cache()}
    per_image = {name: cache_bytes(caches[name]) - shared_prompt_bytes for name in ("full", "voco1", "voco4")}

    # --- answering ----------------------------------------------------------------------------
    generate_kwargs = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}

    def answer_full_reprefill(i, tokens):
        inputs = processors[0](images=image, text=prompts[i], return_tensors="pt")
        models[0].generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, **generate_kwargs)

    def answer_from_full_cache(i, tokens, cache=None):
        cache = copy.deepcopy(cache or caches["full"])
        ids = torch.tensor([question_ids[i]])
        mask = torch.ones(1, cache.get_seq_length() + ids.shape[1], dtype=torch.long)
        models[0].generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=tokens,
                           min_new_tokens=tokens, **generate_kwargs)

    def answer_from_voco(i, tokens, cache=None):
        ids = torch.tensor([question_ids[i]])
        models[1].generate(input_ids=ids, past_key_values=cache or caches["voco1"], max_new_tokens=tokens,
                           min_new_tokens=tokens, **generate_kwargs)

    def answer_floor(i, tokens):
        cache = copy.deepcopy(caches["floor"])
        ids = torch.tensor([floor_split[i][1]])
        mask = torch.ones(1, cache.get_seq_length() + ids.shape[1], dtype=torch.long)
        models[0].generate(input_ids=ids, attention_mask=mask, past_key_values=cache, max_new_tokens=tokens,
                           min_new_tokens=tokens, **generate_kwargs)

    paths = {"full re-prefill": answer_full_reprefill, "full cache": answer_from_full_cache,
             "VoCo cache": answer_from_voco, "no image (floor)": answer_floor}
    for fn in paths.values():  # warm up
        fn(0, 2)
    timings = {name: {"ttft": [], "answer": []} for name in paths}
    for rep in range(args.reps):
        for name, fn in paths.items():  # interleaved, so drift hits every path alike
            for kind, tokens in (("ttft", 1), ("answer", ANSWER_TOKENS)):
                start = time.perf_counter()
                fn(rep % 16, tokens)
                timings[name][kind].append(time.perf_counter() - start)
    medians = {name: {kind: statistics.median(v) for kind, v in kinds.items()} for name, kinds in timings.items()}

    # --- Q questions about one image, compression included -------------------------------------
    def session(kind, q):
        if kind == "full re-prefill":
            for i in range(q):
                answer_full_reprefill(i, ANSWER_TOKENS)
        elif kind == "full cache":
            cache = full_cache()
            for i in range(q):
                answer_from_full_cache(i, ANSWER_TOKENS, cache)
        else:
            cache = voco_cache(1)
            for i in range(q):
                answer_from_voco(i, ANSWER_TOKENS, cache)

    sessions = {}
    for q in (1, 4, 16):
        reps = max(1, args.reps // (2 if q == 16 else 1))
        sessions[q] = {}
        for _ in range(reps):
            for kind in ("full re-prefill", "full cache", "VoCo cache"):
                start = time.perf_counter()
                session(kind, q)
                sessions[q].setdefault(kind, []).append(time.perf_counter() - start)
        sessions[q] = {kind: statistics.median(v) for kind, v in sessions[q].items()}

    # --- report ---------------------------------------------------------------------------------
    print("(a) KV-cache bytes per image beyond the shared prompt")
    for name, value in per_image.items():
        print(f"    {name:<6} {value:>12,d} bytes   full / this = {per_image['full'] / value:8.1f}x")
    print("\n(b) median seconds; ratios against the VoCo cache")
    print(f"    {'path':<18} {'first token':>12} {'8-token answer':>15} {'TTFT / VoCo':>12} {'answer / VoCo':>14}")
    voco = medians["VoCo cache"]
    for name, m in medians.items():
        print(f"    {name:<18} {m['ttft']:>12.4f} {m['answer']:>15.4f} {m['ttft'] / voco['ttft']:>12.2f} "
              f"{m['answer'] / voco['answer']:>14.2f}")
    print("\n(c) Q questions about one image, compression included: median seconds (ratio to VoCo)")
    for q, row in sessions.items():
        cells = "  ".join(f"{kind} {t:.3f} ({t / row['VoCo cache']:.2f}x)" for kind, t in row.items())
        print(f"    Q={q:<3} {cells}")
    ratios = {
        "cache_full_over_voco1": per_image["full"] / per_image["voco1"],
        "ttft_reprefill_over_voco": medians["full re-prefill"]["ttft"] / voco["ttft"],
        "ttft_full_cache_over_voco": medians["full cache"]["ttft"] / voco["ttft"],
        "ttft_voco_over_floor": voco["ttft"] / medians["no image (floor)"]["ttft"],
    }
    print("\ntargets: cache full/VoCo1 >= 500: {cache_full_over_voco1:.0f}; TTFT re-prefill/VoCo >= 6: "
          "{ttft_reprefill_over_voco:.2f}; TTFT full cache/VoCo >= 1.15: {ttft_full_cache_over_voco:.2f}; "
          "TTFT VoCo/floor <= 1.1: {ttft_voco_over_floor:.2f}".format(**ratios))
    with open(args.out, "w") as handle:
        json.dump({"cache_bytes_per_image": per_image, "seconds": medians, "sessions": sessions, "ratios": ratios,
                   "reps": args.reps, "torch": torch.__version__}, handle, indent=2)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
