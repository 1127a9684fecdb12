"""DigitGrid side runs: the levers tried on ``full`` and ``llamavid`` (issue 16), side by side on the same
test questions.

    python benchmarks/digitgrid_levers.py [--only frozen-600,llamavid-single] [--jobs 2] [--steps N]
        [--data-dir playground/data/digitgrid_4k] [--runs-dir playground/runs/digitgrid_levers]

Each lever is the command for its row of ``BASELINE`` (the default preset until 2026-12-03: 4,000 train
grids, the vision tower tuned at 2e-5, no weight decay; ``llava_voco.demo.runner.train_command``: the train
entry with LLaVA's flags) with one or two things changed, trained from the same base models with training
seed 0 and scored on the same 1,200 test questions (the baseline data's) through the eval entry. The changes:

* flags of the train entry (VoCo from the start of instruction tuning instead of fine-tuned from ``full``;
  the vision tower frozen, as LLaVA's stage 2 keeps it, instead of tuned at 2e-5;
  learning rates; weight decay; steps);
* the data: 7 turns per grid (every question about it) instead of 3 (same images), 40,000 train grids instead
  of 4,000 (the first 4,000 are the baseline's; the test questions stay the baseline's), or every turn as its
  own single-turn sample (so LLaMA-VID's context token is always made from the question it answers, as at
  evaluation);
* the base: patch 8 (16 vision tokens per image) instead of 4 (64), stage 0 rerun; or the LLM's config with
  another RoPE theta or head split (the same weights: neither changes a tensor's shape);
* LLaMA-VID's text decoder pretrained before the run (``pretrain_text_decoder``: the stand-in for the
  InstructBLIP Q-Former LLaMA-VID starts from), loaded with ``--text_decoder_path``.

Prints a table (overall and position accuracy, training seconds) and writes ``levers.json`` in the runs
folder. Two runs at a time on two cores; the seconds are comparable only within one invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from llava_voco.demo import digitgrid
from llava_voco.demo.models import BaseSizes, build_base
from llava_voco.demo.runner import (
    METHODS,
    PRESETS,
    Task,
    answers_name,
    ensure_base,
    ensure_data,
    eval_command,
    run_tasks,
    train_command,
)


# What the levers change: the default preset as it was when they were measured (2026-12-03). The preset that
# followed is frozen-1200-40k-wd0.1's full.
BASELINE = replace(PRESETS["default"], train_images=4000, vision_tower_lr=2e-5, weight_decay=0.0)


@dataclass(frozen=True)
class Lever:
    name: str
    what: str
    row: str  # the baseline's method whose command it changes: full, pool1 or llamavid
    steps: int
    flags: tuple[str, ...] = ()  # set (flag, value, flag, value, ...) on the command
    tune_tower: bool = False  # keep the baseline's --unfreeze_mm_vision_tower True --mm_vision_tower_lr 2e-5
    turns: int = 3
    train_images: int = 4000  # train grids (the test questions stay the baseline data's)
    single_turn: bool = False
    patch_size: int = 4
    pretrained_text_decoder: bool = False
    llm_config: tuple[tuple[str, object], ...] = ()  # LlamaConfig fields changed (same weights: RoPE, head split)


LEVERS = (
    Lever("full-preset", "the baseline's full (tower tuned at 2e-5)", "full", 1200, tune_tower=True),
    Lever("frozen-600", "vision tower frozen, 600 steps", "full", 600),
    Lever("frozen-1200", "vision tower frozen, 1,200 steps", "full", 1200),
    Lever("frozen-1200-lr3e-3", "frozen, LLM lr 3e-3", "full", 1200, ("--learning_rate", "0.003")),
    Lever("frozen-600-lr1e-3", "frozen, LLM lr 1e-3", "full", 600, ("--learning_rate", "0.001")),
    Lever("tuned-600-lr4e-3", "tower tuned at 2e-5, LLM lr 4e-3", "full", 600, ("--learning_rate", "0.004"), tune_tower=True),
    Lever("frozen-600-7turns", "frozen, 7 questions per grid", "full", 600, turns=7),
    Lever("frozen-600-patch8", "frozen, patch 8: 16 vision tokens", "full", 600, patch_size=8),
    Lever("frozen-600-rope1e6", "frozen, RoPE theta 1e6 (10,000)", "full", 600,
          llm_config=(("rope_parameters", {"rope_theta": 1e6, "rope_type": "default"}),)),
    Lever("frozen-600-heads8", "frozen, 8 heads of 16 (4 of 32)", "full", 600,
          llm_config=(("num_attention_heads", 8), ("num_key_value_heads", 8), ("head_dim", 16))),
    Lever("frozen-3000", "frozen, 3,000 steps (the cosine schedule over 3,000)", "full", 3000),
    Lever("frozen-1200-wd0.1", "frozen, weight decay 0.1 (0)", "full", 1200, ("--weight_decay", "0.1")),
    Lever("frozen-1200-40k", "frozen, 40,000 train grids (4,000): each seen about once", "full", 1200,
          train_images=40000),
    Lever("frozen-1200-40k-wd0.1", "frozen, 40,000 train grids, weight decay 0.1", "full", 1200,
          ("--weight_decay", "0.1"), train_images=40000),
    Lever("frozen-1200-wd0.3", "frozen, weight decay 0.3", "full", 1200, ("--weight_decay", "0.3")),
    Lever("tuned-1200-wd0.1", "the baseline's full with weight decay 0.1", "full", 1200, ("--weight_decay", "0.1"),
          tune_tower=True),
    Lever("voco1-from-base-600", "VoCo k=1 from the base models (the paper's order: no full first), frozen",
          "full", 600, ("--voco_tokens", "1")),
    Lever("pool1-frozen-600", "pool1, frozen, 600 steps", "pool1", 600),
    Lever("llamavid-frozen-600", "llamavid, frozen, 600 steps", "llamavid", 600),
    Lever("llamavid-single", "llamavid, frozen, single-turn samples", "llamavid", 600, single_turn=True),
    Lever("llamavid-single-plr1e-2", "single-turn, projector lr 1e-2", "llamavid", 600, ("--mm_projector_lr", "0.01"),
          single_turn=True),
    Lever("llamavid-single-tuned-1200", "the baseline's llamavid (tower tuned, 1,200 steps), each turn its own sample",
          "llamavid", 1200, tune_tower=True, single_turn=True),
    Lever("llamavid-td", "llamavid, frozen, pretrained text decoder", "llamavid", 600, pretrained_text_decoder=True),
    Lever("llamavid-td-single", "pretrained text decoder, single-turn samples", "llamavid", 600,
          single_turn=True, pretrained_text_decoder=True),
)


def set_flag(command: list[str], flag: str, value: str | None) -> list[str]:
    """``command`` with ``flag`` set to ``value`` (``None``: removed with its value)."""
    command = list(command)
    if flag in command:
        at = command.index(flag)
        del command[at:at + 2]
    return command + [flag, value] if value is not None else command


def single_turn_data(data_dir: Path, out: Path) -> Path:
    """Each turn of train.json as its own sample (the image shown with that question only)."""
    samples = []
    for sample in json.loads((data_dir / "train.json").read_text()):
        placeholder = "<image>" if "image" in sample else "<video>"
        turns = sample["conversations"]
        for number, (question, answer) in enumerate(zip(turns[0::2], turns[1::2])):
            media = {key: value for key, value in sample.items() if key in ("image", "video")}
            text = question["value"].replace(placeholder + "\n", "")
            samples.append({"id": f"{sample['id']}_turn{number}", **media,
                            "conversations": [{"from": "human", "value": f"{placeholder}\n{text}"}, answer]})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(samples))
    return out


def pretrain_text_decoder(base_dir: Path, data_dir: Path, out: Path, steps: int = 1500, num_query: int = 8) -> dict:
    """LLaMA-VID's context path (text decoder, queries, context attention) trained alone on the train grids
    to name the answer of each image question from the context token (a linear probe), on the frozen stage-0
    tower's features; its Q-Former and queries saved as an InstructBLIP checkpoint for ``--text_decoder_path``
    (the context attention's own maps start afresh there, as in LLaMA-VID). Returns the probe's accuracy on
    the questions of 200 test grids."""
    from safetensors.torch import save_file
    from transformers import (AutoTokenizer, CLIPImageProcessorPil, CLIPVisionModel, InstructBlipConfig,
                              InstructBlipQFormerConfig, LlamaConfig)

    from llava_voco.image_io import load_image
    from llava_voco.model.projectors.llamavid import LlamaVidProjector, encode_instructions

    torch.manual_seed(0)
    tower = CLIPVisionModel.from_pretrained(base_dir / "vision_tower").eval()
    processor = CLIPImageProcessorPil.from_pretrained(base_dir / "vision_tower")
    tokenizer = AutoTokenizer.from_pretrained(base_dir / "text_decoder_tokenizer")
    qformer_config = InstructBlipQFormerConfig(**json.loads((base_dir / "text_decoder.json").read_text()),
                                               encoder_hidden_size=tower.config.hidden_size, vocab_size=len(tokenizer))

    def split(name: str, limit: int | None = None):
        samples = [s for s in json.loads((data_dir / f"{name}.json").read_text()) if "image" in s][:limit]
        features = []
        with torch.no_grad():
            for start in range(0, len(samples), 256):
                pixels = processor([load_image(data_dir / s["image"]) for s in samples[start:start + 256]],
                                   return_tensors="pt")["pixel_values"]
                features.append(tower(pixel_values=pixels).last_hidden_state[:, 1:])  # [b, N, C]
        rows = [(n, q["value"].replace("<image>\n", ""), a["value"]) for n, s in enumerate(samples)
                for q, a in zip(s["conversations"][0::2], s["conversations"][1::2])]
        encoded = encode_instructions(tokenizer, [q for _, q, _ in rows], 32)
        return (torch.cat(features), torch.tensor([n for n, _, _ in rows]), encoded["instruction_input_ids"],
                encoded["instruction_attention_mask"], [a for _, _, a in rows])

    train, test = split("train"), split("test", 200)
    answers = sorted(set(train[4]) | set(test[4]), key=int)
    target = {a: i for i, a in enumerate(answers)}
    projector = LlamaVidProjector(qformer_config, tower.config.hidden_size, tower.config.hidden_size, nn.Identity(),
                                  num_query=num_query)
    probe = nn.Linear(tower.config.hidden_size, len(answers))
    parameters = list(projector.parameters()) + list(probe.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(0)

    def logits(data, rows):
        features, image_of, ids, mask, _ = data
        return probe(projector.context_token(features[image_of[rows]], ids[rows], mask[rows])[:, 0])

    labels = torch.tensor([target[a] for a in train[4]])
    for _ in range(steps):
        rows = torch.randint(len(labels), (128,), generator=generator)
        loss = nn.functional.cross_entropy(logits(train, rows), labels[rows])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        predicted = logits(test, torch.arange(len(test[4]))).argmax(-1)
    correct = predicted == torch.tensor([target[a] for a in test[4]])
    out.mkdir(parents=True, exist_ok=True)
    llm = LlamaConfig.from_pretrained(base_dir / "llm")
    InstructBlipConfig(vision_config=tower.config.to_dict(), qformer_config=qformer_config.to_dict(),
                       text_config=llm.to_dict(), num_query_tokens=num_query).save_pretrained(out)
    state = {f"qformer.{k}": v.contiguous() for k, v in projector.text_decoder.state_dict().items()}
    state["query_tokens"] = projector.query_tokens.detach().contiguous()
    save_file(state, out / "model.safetensors")
    return {"probe_accuracy_test": round(correct.float().mean().item(), 4), "steps": steps}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated levers: " + ", ".join(l.name for l in LEVERS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None, help="override every lever's steps (a smoke run)")
    parser.add_argument("--data-dir", default="playground/data/digitgrid_4k")
    parser.add_argument("--runs-dir", default="playground/runs/digitgrid_levers")
    parser.add_argument("--base-dir", default="playground/runs/digitgrid_levers/base",
                        help="the demo's base models (built here when absent or made for other data)")
    parser.add_argument("--text-decoder-steps", type=int, default=1500)
    args = parser.parse_args(argv)
    levers = [l for l in LEVERS if args.only is None or l.name in args.only.split(",")]
    if not levers:
        parser.error(f"--only: none of {args.only}; choose from {[l.name for l in LEVERS]}")
    os.environ.setdefault("WANDB_DISABLED", "true")
    preset, runs_dir = BASELINE, Path(args.runs_dir)
    data_dir = Path(args.data_dir)
    ensure_data(preset, data_dir, fresh=False)
    base_dir = Path(args.base_dir)
    ensure_base(preset, data_dir, base_dir, fresh=False)
    methods = {m.name: m for m in METHODS}
    prepared: dict = {}
    tasks = []
    for lever in levers:
        lever_data, lever_base = data_dir, base_dir
        if lever.turns != 3 or lever.train_images != preset.train_images:
            lever_data = runs_dir / f"data_{lever.turns}turns_{lever.train_images}images"
            if not (lever_data / "train.json").exists():
                settings = {k: getattr(preset, k) for k in ("test_images", "train_clips", "test_clips", "frames", "seed")}
                digitgrid.build(lever_data, **settings, train_images=lever.train_images, turns=lever.turns)
        if lever.patch_size != 4:
            lever_base = runs_dir / f"base_patch{lever.patch_size}"
            if not (lever_base / "base.json").exists():
                build_base(data_dir, lever_base, replace(BaseSizes(), patch_size=lever.patch_size,
                                                         vision_pretrain_steps=preset.vision_pretrain_steps))
        steps = args.steps or lever.steps
        command = train_command(methods[lever.row], replace(preset, full_steps=steps), lever_data, lever_base,
                                runs_dir)
        command = set_flag(command, "--output_dir", str(runs_dir / lever.name))
        if not lever.tune_tower:
            command = set_flag(set_flag(command, "--unfreeze_mm_vision_tower", None), "--mm_vision_tower_lr", None)
        if lever.single_turn:
            command = set_flag(command, "--data_path", str(single_turn_data(data_dir, runs_dir / "train_single_turn.json")))
        if lever.pretrained_text_decoder:
            record = runs_dir / "text_decoder" / "pretraining.json"
            if "text_decoder" not in prepared:
                # made once per runs folder: the levers' checkpoints, reused by command, were trained from it
                if record.exists():
                    prepared["text_decoder"] = json.loads(record.read_text())
                else:
                    prepared["text_decoder"] = pretrain_text_decoder(base_dir, data_dir, runs_dir / "text_decoder",
                                                                     args.text_decoder_steps)
                    record.write_text(json.dumps(prepared["text_decoder"]))
                print(f"text decoder pretrained: {prepared['text_decoder']}")
            command = set_flag(command, "--text_decoder_path", str(runs_dir / "text_decoder"))
        if lever.llm_config:
            llm = runs_dir / f"llm_{lever.name}"
            shutil.copytree(base_dir / "llm", llm, dirs_exist_ok=True)
            config = json.loads((llm / "config.json").read_text())
            (llm / "config.json").write_text(json.dumps({**config, **dict(lever.llm_config)}, indent=1))
            command = set_flag(command, "--model_name_or_path", str(llm))
        for flag, value in zip(lever.flags[0::2], lever.flags[1::2]):
            command = set_flag(command, flag, value)
        output_dir = runs_dir / lever.name
        answers = output_dir / answers_name("test")
        evaluation = Task(f"{lever.name}: test", "llava_voco.eval.model_vqa",
                          eval_command(output_dir, data_dir / "test_questions.jsonl", data_dir, answers),
                          output_dir / "eval_test.log", 1200)
        tasks.append(Task(lever.name, "llava_voco.train", command, output_dir / "train.log", steps,
                          evaluations=(evaluation,)))
    started = time.perf_counter()
    summaries = run_tasks(tasks, args.jobs)
    from llava_voco.eval import exact_match

    rows = {}
    for lever in levers:
        result = exact_match.score(str(data_dir / "test_questions.jsonl"),
                                   str(runs_dir / lever.name / answers_name("test")))
        rows[lever.name] = {"what": lever.what, "row": lever.row, "steps": args.steps or lever.steps,
                            "overall": result["overall"], "position": result["categories"]["position"],
                            "largest": result["categories"]["largest"],
                            "train_seconds": summaries[lever.name]["seconds"]}
    lines = ["lever | what | steps | overall | position | largest | train s"]
    for name, row in rows.items():
        lines.append(f"{name} | {row['what']} | {row['steps']} | {100 * row['overall']:.1f} | "
                     f"{100 * row['position']:.1f} | {100 * row['largest']:.1f} | {row['train_seconds']:.0f}")
    print("\n".join(lines))
    report = {"rows": rows, "prepared": prepared, "seconds": round(time.perf_counter() - started, 1),
              "machine": os.uname().machine, "argv": sys.argv[1:]}
    (runs_dir / "levers.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
