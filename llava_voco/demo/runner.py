"""The DigitGrid demo: the VoCo paper's central comparison, reproduced on CPU from real digits.

    python -m llava_voco.demo [--preset default|quick] [--data-dir playground/data/digitgrid]
        [--runs-dir playground/runs/digitgrid] [--only full,voco1] [--fresh] [--jobs 2]
        [--seeds 0,1,2] [--ablation]

Read top to bottom, the run is:
  1. the data (``llava_voco.demo.digitgrid``) and the base models (``llava_voco.demo.models``: a SentencePiece
     tokenizer and a Llama from configs, a CLIP vision tower pretrained for seconds), built if absent;
  2. one training run per method through the train entry (``python -m llava_voco.train``, LLaVA's flags;
     each command is printed and saved in ``<runs-dir>/<method>/command.txt``, its output in ``train.log``),
     two at a time on two cores, checkpoints kept in ``<runs-dir>/<method>/``:
       full      all 64 vision tokens (the upper bound), vision tower fine-tuned too
       pool1     the 64 patches averaged into 1 token (the paper's pooling baseline), trained the same way
       llamavid  LLaMA-VID: a context token + 1 mean content token
       voco1/2/4 VoCo with k tokens, fine-tuned from ``full`` as the paper does
       voco1+kd  voco1 plus distillation against full vision tokens (``--voco_distill_weight 1 --voco_distill_temperature 2``)
       elastic   one model trained with k drawn from 1, 2, 4, 8 (``--voco_train_tokens``), evaluated at each k
       lower     VoCo k=1 fine-tuned from ``full`` *without* the VoCo mask, evaluated with it (the lower bound)
     ``--ablation`` adds one lever at a time against voco1 (``ABLATIONS``); ``--seeds`` trains the headline
     rows (``HEADLINE``) again with other training seeds (same data, same base models) under ``seed<s>/``;
  3. every checkpoint answers the test questions through the eval entry (``llava_voco.eval.model_vqa``),
     scored by exact match (``llava_voco.eval.exact_match``); the clip questions (video rows) for full,
     llamavid and voco1;
  4. the table (and the seed and ablation tables), ``report.json`` (each row with its training seed) and
     ``accuracy_vs_tokens.png`` in ``<runs-dir>``;
  5. one test question answered through the chat path from a VoCo cache.
A method whose checkpoint was made by the same command (and whose answers are complete) is reused;
``--fresh`` retrains everything. What the run needs beyond the package (the ``demo`` and ``train`` extras)
is checked before the first step, and ``report.json`` names paths relative to its own folder.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from tqdm.auto import tqdm

from . import digitgrid
from .models import BaseSizes, build_base


@dataclass(frozen=True)
class Preset:
    """What one run trains on and for how long."""

    name: str
    train_images: int
    test_images: int
    train_clips: int
    test_clips: int
    vision_pretrain_steps: int
    batch_size: int
    full_steps: int  # full, pool1 and llamavid, from the base models
    voco_steps: int  # voco1/2/4, from full
    lower_steps: int  # lower, from full: without the mask its VoCo tokens learn nothing to keep, however long it trains
    learning_rate: float = 2e-3
    voco_learning_rate: float = 1e-3
    # None: the vision tower frozen, as LLaVA's stage 2 keeps it; a float tunes it at that learning rate (2e-4
    # let the pretrained tower drift while the LLM sat at the text prior)
    vision_tower_lr: float | None = None
    weight_decay: float = 0.1
    frames: int = 4
    seed: int = 0


PRESETS = {
    # Training dominates the run time, which depends on the CPU (README). With 4,000 train grids (each seen ~10
    # times) and no weight decay, full learned which digits a grid holds but read positions on one machine
    # (91.8%) and not on another (34-38%): it fit the train grids instead. 40,000 grids (each seen about once)
    # and weight decay 0.1 read 91.0% there in a side run (benchmarks/digitgrid_levers.py) and 55.3% in the
    # default run of the same day: a matter of where it starts, its base models and its training seed (README).
    "default": Preset("default", train_images=40000, test_images=400, train_clips=250, test_clips=100,
                      vision_pretrain_steps=400, batch_size=32, full_steps=1200, voco_steps=800, lower_steps=120),
    # ~4 minutes, for the tests: every row, real training and evaluation; too short to learn to read the grid
    # It keeps the earlier recipe (tower tuned, no weight decay): with the default's, its 250-step full fell below
    # the text prior (13.3% against 22.0% overall, 2026-12-03), where the tests' plumbing check sits.
    "quick": Preset("quick", train_images=800, test_images=50, train_clips=100, test_clips=10,
                    vision_pretrain_steps=150, batch_size=16, full_steps=250, voco_steps=20, lower_steps=20,
                    vision_tower_lr=2e-5, weight_decay=0.0),
}


# voco1+kd: KL against the same weights with the VoCo mask off, temperature 2 (the hidden-state term at weight 1
# wrecks the model here: see --ablation and README)
KD_FLAGS = ("--voco_distill_weight", "1.0", "--voco_distill_temperature", "2.0")


@dataclass(frozen=True)
class Method:
    name: str
    description: str
    tokens_per_image: int
    start: str  # "base" (an LLM + a vision tower, set-up (a)) or another method's checkpoint
    flags: tuple[str, ...] = ()
    video: bool = False  # also answer the clip questions
    eval_voco_tokens: tuple[int, ...] = ()  # an elastic model: evaluated at each k (rows "<name>@k")

    def row_names(self) -> list[str]:
        return [f"{self.name}@{k}" for k in self.eval_voco_tokens] or [self.name]


METHODS = (
    Method("full", "all vision tokens (upper bound)", 64, "base", ("--mm_projector_type", "mlp2x_gelu"), video=True),
    Method("pool1", "mean pooling to 1 token", 1, "base",
           ("--mm_projector_type", "mlp2x_gelu", "--vision_token_pooling", "mean")),
    Method("llamavid", "LLaMA-VID: context + 1 content token", 2, "base", ("--mm_projector_type", "llamavid"), video=True),
    Method("voco1", "VoCo, k=1", 1, "full", ("--voco_tokens", "1"), video=True),
    Method("voco1+kd", "VoCo, k=1, distilled from full tokens", 1, "full", ("--voco_tokens", "1", *KD_FLAGS), video=True),
    Method("voco2", "VoCo, k=2", 2, "full", ("--voco_tokens", "2")),
    Method("voco4", "VoCo, k=4", 4, "full", ("--voco_tokens", "4")),
    Method("elastic", "one VoCo model trained with k drawn from 1, 2, 4, 8", 8, "full",
           ("--voco_tokens", "8", "--voco_train_tokens", "1,2,4,8"), eval_voco_tokens=(1, 2, 4, 8)),
    Method("lower", "VoCo k=1 trained without the mask (lower bound)", 1, "full",
           ("--voco_tokens", "1", "--voco_mask_in_training", "False")),
)
# The rows run again with other training seeds by --seeds (mean and spread in the report).
HEADLINE = ("full", "pool1", "llamavid", "voco1", "voco1+kd", "voco4")
# --ablation: one lever at a time against voco1, from the same full checkpoint, on the same test questions.
ABLATIONS = (
    Method("kd+hidden", "voco1+kd plus the hidden-state term (weight 1)", 1, "full",
           ("--voco_tokens", "1", *KD_FLAGS, "--voco_distill_hidden", "1.0")),
    Method("kd-hidden", "voco1 + hidden-state term only (weight 1)", 1, "full",
           ("--voco_tokens", "1", "--voco_distill_hidden", "1.0")),
)


# What the run imports beyond the package's own requirements (import name: what pip installs), all of them
# in the ``demo`` and ``train`` extras: checked before the first step, not found missing 20 minutes in.
DEPENDENCIES = {
    "sentencepiece": "sentencepiece",  # the base LLM's tokenizer is trained with it (demo extra)
    "google.protobuf": "protobuf",  # transformers reads that tokenizer's model with it (train extra, via wandb)
    "accelerate": "accelerate",  # the train entry's Trainer (train extra)
    "matplotlib": "matplotlib",  # the accuracy-vs-tokens plot (demo extra)
}
INSTALL = "pip install 'llava-voco[demo,train]'"


def missing_dependencies() -> list[str]:
    missing = []
    for module, package in DEPENDENCIES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a module without a spec
            found = False
        if not found:
            missing.append(package)
    return missing


def relative(path: str | Path, root: Path) -> str:
    """``path`` relative to ``root`` (the report's folder), so that the report names no machine's own paths."""
    return os.path.relpath(Path(path).resolve(), root.resolve())


# ---------------------------------------------------------------------------------------------------
# 1. Data and base models.
# ---------------------------------------------------------------------------------------------------
def ensure_data(preset: Preset, data_dir: Path, fresh: bool) -> dict:
    settings = {"train_images": preset.train_images, "test_images": preset.test_images,
                "train_clips": preset.train_clips, "test_clips": preset.test_clips, "frames": preset.frames,
                "seed": preset.seed}
    marker = data_dir / "settings.json"
    if not fresh and marker.exists() and json.loads(marker.read_text()) == settings:
        print(f"data: reusing {data_dir}")
        return settings
    if data_dir.exists():
        shutil.rmtree(data_dir)
    summary = digitgrid.build(data_dir, **settings)
    marker.write_text(json.dumps(settings))
    print(f"data: wrote {data_dir} ({summary['train_samples']} train, {summary['test_samples']} test samples)")
    return settings


def ensure_base(preset: Preset, data_dir: Path, base_dir: Path, fresh: bool) -> dict:
    sizes = replace(BaseSizes(), vision_pretrain_steps=preset.vision_pretrain_steps, seed=preset.seed)
    marker = base_dir / "base.json"
    if not fresh and marker.exists():
        saved = json.loads(marker.read_text())
        if saved["sizes"] == asdict(sizes) and saved.get("data") == str(data_dir.resolve()):
            print(f"base models: reusing {base_dir}")
            return saved
    if base_dir.exists():
        shutil.rmtree(base_dir)
    summary = build_base(data_dir, base_dir, sizes)
    summary["data"] = str(data_dir.resolve())
    marker.write_text(json.dumps(summary, indent=1))
    print(f"base models: {base_dir} (stage 0: quadrant accuracy {summary['stage0']['quadrant_accuracy_test']:.1%} "
          f"on test grids, {summary['seconds']} s)")
    return summary


# ---------------------------------------------------------------------------------------------------
# 2. Training and evaluation, through the train and eval entries, as processes side by side.
# ---------------------------------------------------------------------------------------------------
def training_steps(method: Method, preset: Preset) -> int:
    """``lower`` is trained without the mask, so its length only sets how far it has drifted from full."""
    if method.start == "base":
        return preset.full_steps
    return preset.lower_steps if method.name == "lower" else preset.voco_steps


def train_command(method: Method, preset: Preset, data_dir: Path, base_dir: Path, runs_dir: Path,
                  seed: int | None = None) -> list[str]:
    """The train entry's command line for ``method`` (what a user would type)."""
    if method.start == "base":
        model = ["--model_name_or_path", base_dir / "llm", "--vision_tower", base_dir / "vision_tower",
                 "--mm_vision_select_layer", "-1"]
        if preset.vision_tower_lr is not None:
            model += ["--unfreeze_mm_vision_tower", "True", "--mm_vision_tower_lr", preset.vision_tower_lr]
        learning_rate = preset.learning_rate
    else:
        model = ["--model_name_or_path", runs_dir / method.start]
        learning_rate = preset.voco_learning_rate
    if method.name == "llamavid":
        model += ["--text_decoder_tokenizer", base_dir / "text_decoder_tokenizer",
                  "--text_decoder_config", base_dir / "text_decoder.json", "--num_query", "8",
                  "--compress_type", "mean", "--video_compress_type", "mean", "--instruction_max_length", "32",
                  # the DigitGrid figures were measured before LLaMA-VID's input LayerNorm existed (its default
                  # since issue 27): kept off so that they still reproduce
                  "--text_decoder_input_norm", "False"]
    command = [
        *model, *method.flags,
        "--version", "v1", "--data_path", data_dir / "train.json", "--image_folder", data_dir,
        "--output_dir", runs_dir / method.name, "--max_steps", training_steps(method, preset),
        "--per_device_train_batch_size", preset.batch_size, "--learning_rate", learning_rate,
        "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05", "--weight_decay", preset.weight_decay,
        "--model_max_length", "512", "--group_by_modality_length", "True", "--cache_samples", "True",
        "--logging_steps", "10", "--save_strategy", "no", "--report_to", "none",
        "--use_cpu", "True", "--dataloader_num_workers", "0", "--seed", preset.seed if seed is None else seed,
    ]
    return [str(part) for part in command]


def eval_command(model_dir: Path, question_file: Path, data_dir: Path, answers_file: Path,
                 voco_tokens: int | None = None) -> list[str]:
    """The eval entry's command line (``python -m llava_voco.eval.model_vqa``) for one question file
    (``voco_tokens``: an elastic model's k)."""
    k = ("--voco-tokens", voco_tokens) if voco_tokens is not None else ()
    return [str(part) for part in (
        "--model-path", model_dir, "--question-file", question_file, "--image-folder", data_dir,
        "--answers-file", answers_file, "--conv-mode", "v1", "--max-new-tokens", "4", "--batch-size", "16", *k)]


def answers_name(kind: str, voco_tokens: int | None = None) -> str:
    """``answers_test.jsonl`` / ``answers_test_video.jsonl`` (``answers_test_k2.jsonl`` at an elastic k)."""
    return f"answers_{kind}" + (f"_k{voco_tokens}" if voco_tokens is not None else "") + ".jsonl"


def printed_command(command: list[str], module: str = "llava_voco.train") -> str:
    return f"python -m {module} " + shlex.join(command)


def reusable(output_dir: Path, command: list[str]) -> bool:
    record = output_dir / "command.txt"
    return record.exists() and record.read_text().strip() == printed_command(command) and (output_dir / "config.json").exists()


def training_summary(output_dir: Path, seconds: float) -> dict:
    state = json.loads((output_dir / "trainer_state.json").read_text())
    history = [entry for entry in state["log_history"] if "loss" in entry]
    return {"steps": state["global_step"], "seconds": round(seconds, 1),
            "first_loss": history[0]["loss"] if history else None, "last_loss": history[-1]["loss"] if history else None}


@dataclass
class Task:
    """One process: a training run (``llava_voco.train``) or an evaluation (``llava_voco.eval.model_vqa``)."""

    name: str  # "full" for its training, "full: test_questions.jsonl" for an evaluation
    module: str
    command: list[str]
    log: Path
    total: int  # steps or questions, for the progress bar
    after: str | None = None  # the training that must finish first
    evaluations: tuple["Task", ...] = ()  # queued once this training has finished

    @property
    def is_training(self) -> bool:
        return self.module == "llava_voco.train"


STEP_PATTERN = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "12/800 [" in a train or eval log


def run_tasks(tasks: list[Task], jobs: int, fresh: bool = False) -> dict[str, dict]:
    """Runs the tasks as processes, ``jobs`` at a time, each with cores / jobs threads (on 2 cores two
    1-thread runs get through ~1.2x the steps of one 2-thread run: these models are too small to keep two
    threads busy). A training starts once the checkpoint it starts from exists and is skipped when its
    checkpoint was made by the same command (``command.txt``, written last); its evaluations then take the
    next free slot, before trainings not yet started. Returns per task name its training summary or
    ``{"seconds": ...}``; stops at the first failure with the task's name and the end of its log."""
    summaries, running = {}, {}
    pending = list(tasks)
    planned = {task.name for task in tasks if task.is_training}
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    for task in list(pending):
        output_dir = task.log.parent
        if task.is_training and not fresh and reusable(output_dir, task.command):
            print(f"[{task.name}] reusing the checkpoint in {output_dir}")
            summaries[task.name] = json.loads((output_dir / "train_summary.json").read_text())
            pending[pending.index(task):pending.index(task) + 1] = list(task.evaluations)
    while pending or running:
        for task in list(pending):
            # after a training finished here, or one that is not part of this run (its checkpoint is on disk)
            ready = task.after is None or task.after in summaries or task.after not in planned
            if len(running) >= jobs or not ready:
                continue
            pending.remove(task)
            if task.is_training:
                if task.log.parent.exists():
                    shutil.rmtree(task.log.parent)
                task.log.parent.mkdir(parents=True)
            tqdm.write(f"[{task.name}] {printed_command(task.command, task.module)}")
            log = open(task.log, "w")
            process = subprocess.Popen([sys.executable, "-m", task.module, *task.command], stdout=log,
                                       stderr=subprocess.STDOUT, env=env)
            slot = min(set(range(jobs)) - {entry["slot"] for entry in running.values()})
            bar = tqdm(total=task.total, desc=("train " if task.is_training else "eval ") + task.name,
                       unit="step" if task.is_training else "q", position=slot, leave=False)
            running[task.name] = {"task": task, "process": process, "slot": slot, "bar": bar, "log": log,
                                  "started": time.perf_counter()}
        time.sleep(1.0)
        for name, entry in list(running.items()):
            task, process = entry["task"], entry["process"]
            tail = task.log.read_bytes()[-4000:].decode(errors="replace")
            found = STEP_PATTERN.findall(tail)
            if found:
                entry["bar"].n = int(found[-1][0])
                entry["bar"].refresh()
            if process.poll() is None:
                continue
            entry["log"].close()
            entry["bar"].close()
            del running[name]
            seconds = time.perf_counter() - entry["started"]
            if process.returncode != 0:
                for other in running.values():
                    other["process"].kill()
                what = "training" if task.is_training else "evaluation"
                raise SystemExit(f"[{name}] {what} failed (exit {process.returncode}); the end of {task.log}:\n{tail}")
            if not task.is_training:
                summaries[name] = {"seconds": round(seconds, 1)}
                continue
            output_dir = task.log.parent
            summary = training_summary(output_dir, seconds)
            (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
            (output_dir / "command.txt").write_text(printed_command(task.command) + "\n")  # last: a run cut short is redone
            summaries[name] = summary
            pending[:0] = list(task.evaluations)
            tqdm.write(f"[{name}] trained: {summary['steps']} steps in {summary['seconds']:.0f} s, "
                       f"loss {summary['first_loss']} -> {summary['last_loss']}")
    return summaries


def method_tasks(method: Method, preset: Preset, data_dir: Path, runs_dir: Path, base_dir: Path | None = None,
                 seed: int | None = None) -> Task:
    """``method``'s training, with its evaluations on the test images (and clips, for the video rows; an
    elastic model at each of its k). ``runs_dir``: where its checkpoint and the one it starts from are."""
    output_dir = runs_dir / method.name
    evaluations = []
    for k in method.eval_voco_tokens or (None,):
        for kind, questions in (("test", "test_questions.jsonl"), ("test_video", "test_video_questions.jsonl")):
            if kind == "test_video" and not (method.video and preset.test_clips):
                continue
            answers = answers_name(kind, k)
            count = sum(1 for line in (data_dir / questions).read_text().splitlines() if line.strip())
            evaluations.append(Task(f"{method.name}: {answers}", "llava_voco.eval.model_vqa",
                                    eval_command(output_dir, data_dir / questions, data_dir, output_dir / answers, k),
                                    output_dir / answers.replace("answers_", "eval_").replace(".jsonl", ".log"), count))
    steps = training_steps(method, preset)
    base_dir = base_dir if base_dir is not None else runs_dir / "base"
    return Task(method.name, "llava_voco.train", train_command(method, preset, data_dir, base_dir, runs_dir, seed),
                output_dir / "train.log", steps, after=None if method.start == "base" else method.start,
                evaluations=tuple(evaluations))


def score(method: Method, runs_dir: Path, data_dir: Path, kind: str, questions: str, seed: int,
          voco_tokens: int | None = None) -> dict:
    from ..eval import exact_match

    output_dir = runs_dir / method.name
    description = method.description + (f", evaluated at k={voco_tokens}" if voco_tokens is not None else "")
    return {"tokens_per_image": voco_tokens or method.tokens_per_image, "description": description,
            "checkpoint": relative(output_dir, runs_dir), "seed": seed,
            **exact_match.score(str(data_dir / questions), str(output_dir / answers_name(kind, voco_tokens)))}


def run_methods(methods: list[Method], preset: Preset, data_dir: Path, runs_dir: Path, base_dir: Path, jobs: int,
                fresh: bool, seed: int) -> tuple[dict, dict, dict, dict]:
    """Trains and evaluates ``methods`` with training seed ``seed``; (image rows, clip rows, training
    summaries, evaluation seconds)."""
    tasks = [method_tasks(m, preset, data_dir, runs_dir, base_dir, seed) for m in methods]
    finished = run_tasks(tasks, jobs, fresh)
    rows, video_rows = {}, {}
    for method in methods:
        for k in method.eval_voco_tokens or (None,):
            name = f"{method.name}@{k}" if k is not None else method.name
            rows[name] = score(method, runs_dir, data_dir, "test", "test_questions.jsonl", seed, k)
            if method.video and preset.test_clips:
                video_rows[name] = score(method, runs_dir, data_dir, "test_video", "test_video_questions.jsonl", seed, k)
    training = {m.name: finished[m.name] for m in methods}
    evaluations = {name: summary["seconds"] for name, summary in finished.items() if ":" in name}
    return rows, video_rows, training, evaluations


def text_prior(data_dir: Path, question_file: Path) -> dict:
    """What answering without the image gets: each test question answered with the answer most often given
    to the same question text in train.json (10% on positions; higher on count and largest)."""
    from collections import Counter, defaultdict

    from ..eval.exact_match import score_answers
    from ..eval.model_vqa import read_questions

    seen: dict[str, Counter] = defaultdict(Counter)
    for sample in json.loads((data_dir / "train.json").read_text()):
        turns = sample["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2]):
            text = question["value"].replace("<image>\n", "").replace("<video>\n", "")
            seen[text][answer["value"]] += 1
    questions = read_questions(str(question_file))
    guesses = {q["question_id"]: seen[q["text"]].most_common(1)[0][0] if seen[q["text"]] else "" for q in questions}
    return score_answers(questions, guesses, str(question_file), "the text prior")


# ---------------------------------------------------------------------------------------------------
# 4. Report.
# ---------------------------------------------------------------------------------------------------
def retention(rows: dict[str, dict], key: str = "overall") -> None:
    """Raw retention (accuracy / full's) and normalised retention ((acc - lower) / (full - lower))."""
    full, lower = rows["full"][key], rows.get("lower", {}).get(key)
    for name, row in rows.items():
        if name == "text prior":
            continue
        row["raw_retention"] = row[key] / full if full else None
        span = (full - lower) if lower is not None else None
        row["normalised_retention"] = (row[key] - lower) / span if span else None


def format_table(rows: dict[str, dict], categories: list[str], title: str) -> str:
    header = ["method", "tokens/img", *categories, "overall", "raw ret.", "norm. ret."]
    lines = [title, " | ".join(f"{h:>10}" for h in header)]
    for name, row in rows.items():
        cells = [name, str(row["tokens_per_image"])]
        cells += [f"{100 * row['categories'].get(c, float('nan')):.1f}" for c in categories]
        cells += [f"{100 * row['overall']:.1f}"]
        cells += ["" if row.get(k) is None else f"{100 * row[k]:.1f}%" for k in ("raw_retention", "normalised_retention")]
        lines.append(" | ".join(f"{c:>10}" for c in cells))
    return "\n".join(lines)


def plot(rows: dict[str, dict], video_rows: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for name, row in rows.items():
        if name == "text prior":
            axis.axhline(100 * row["overall"], color="gray", linestyle=":", linewidth=1, label="text prior (no image)")
            continue
        axis.scatter(row["tokens_per_image"], 100 * row["overall"], s=40, zorder=3)
        axis.annotate(name, (row["tokens_per_image"], 100 * row["overall"]), textcoords="offset points", xytext=(5, 4))
    for name, row in video_rows.items():
        if name == "text prior":
            continue
        axis.scatter(row["tokens_per_image"], 100 * row["overall"], s=40, marker="s", facecolors="none",
                     edgecolors="gray", zorder=3)
        axis.annotate(f"{name} (clips)", (row["tokens_per_image"], 100 * row["overall"]), textcoords="offset points",
                      xytext=(5, -10), color="gray")
    axis.legend(loc="lower right", fontsize=8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("vision tokens per image (or frame) the text reads")
    axis.set_ylabel("exact-match accuracy, test split (%)")
    axis.set_title(title, fontsize=10)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


# ---------------------------------------------------------------------------------------------------
# 5. The chat path.
# ---------------------------------------------------------------------------------------------------
def chat_example(model_dir: Path, data_dir: Path) -> dict:
    from ..conversation import get_template
    from ..image_io import load_image
    from ..inference import ImageChat, load_model

    question = json.loads((data_dir / "test_questions.jsonl").read_text().splitlines()[0])
    model, processor = load_model(str(model_dir))
    image = load_image(data_dir / question["image"])
    chat = ImageChat(model, processor, get_template("v1"), [image], generation_kwargs={"max_new_tokens": 4})
    answer = chat.ask(question["text"])
    return {"model": str(model_dir), "image": question["image"], "question": question["text"], "answer": answer,
            "reference": question["answer"], "cache": chat.cache_summary()}


def seed_table(by_seed: dict[int, dict[str, dict]], categories: list[str]) -> tuple[dict, str]:
    """Per headline row: each seed's overall and position accuracy and raw retention, their mean and spread
    (sample standard deviation)."""
    import statistics

    seeds = sorted(by_seed)
    summary = {}
    for name in HEADLINE:
        if not all(name in by_seed[seed] for seed in seeds):
            continue
        runs = [by_seed[seed][name] for seed in seeds]
        entry = {"seeds": seeds}
        for key, values in (("overall", [r["overall"] for r in runs]),
                            ("position", [r["categories"].get("position") for r in runs]),
                            ("raw_retention", [r["overall"] / by_seed[seed]["full"]["overall"]
                                               if by_seed[seed]["full"]["overall"] else None
                                               for seed, r in zip(seeds, runs)])):
            if any(value is None for value in values):
                entry[key] = None
                continue
            entry[key] = {"per_seed": values, "mean": statistics.fmean(values),
                          "std": statistics.stdev(values) if len(values) > 1 else 0.0}
        summary[name] = entry
    header = ["method", "overall", "position", "raw ret."]
    lines = [f"Training seeds {', '.join(map(str, seeds))}: mean +- standard deviation (%)",
             " | ".join(f"{h:>16}" for h in header)]
    for name, entry in summary.items():
        cells = [name] + [f"{100 * entry[k]['mean']:.1f} +- {100 * entry[k]['std']:.1f}" if entry[k] else ""
                          for k in ("overall", "position", "raw_retention")]
        lines.append(" | ".join(f"{c:>16}" for c in cells))
    return summary, "\n".join(lines)


def ablation_table(rows: dict[str, dict], reference: str = "voco1") -> str:
    """Each lever's row against ``reference`` on the same test questions: accuracy and its difference."""
    base = rows[reference]
    header = ["row", "what", "overall", "d overall", "position", "d position"]
    lines = [f"Ablation against {reference} (same full checkpoint, same test questions; d = difference in points)",
             " | ".join(header)]
    for name, row in rows.items():
        position, base_position = row["categories"].get("position", 0.0), base["categories"].get("position", 0.0)
        lines.append(" | ".join([
            name, row["description"], f"{100 * row['overall']:.1f}", f"{100 * (row['overall'] - base['overall']):+.1f}",
            f"{100 * position:.1f}", f"{100 * (position - base_position):+.1f}"]))
    return "\n".join(lines)


def parse_seeds(value: str | None, parser) -> list[int]:
    if not value:
        return []
    try:
        return sorted({int(part) for part in value.split(",") if part.strip()})
    except ValueError:
        parser.error(f"--seeds {value}: comma-separated integers, e.g. 0,1,2")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description="DigitGrid: full tokens vs pooling vs LLaMA-VID vs VoCo, on CPU")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--data-dir", default=None, help="default: playground/data/digitgrid (quick: ..._quick)")
    parser.add_argument("--runs-dir", default=None, help="default: playground/runs/digitgrid (quick: ..._quick)")
    parser.add_argument("--only", default=None, help="comma-separated methods to run (full is needed by the VoCo rows)")
    parser.add_argument("--fresh", action="store_true", help="rebuild data and base models, retrain every method")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="training runs side by side (default: 2, or 1 on a 1-core machine)")
    parser.add_argument("--seeds", default=None,
                        help="also train the headline rows (" + ", ".join(HEADLINE) + ") with these training seeds "
                             "(e.g. 0,1,2; the preset's seed is the main run), under <runs-dir>/seed<s>/: a mean and "
                             "spread table")
    parser.add_argument("--ablation", action="store_true",
                        help="also train one lever at a time against voco1 (" + ", ".join(m.name for m in ABLATIONS) + ")")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    seeds = parse_seeds(args.seeds, parser)
    missing = missing_dependencies()
    if missing:
        raise SystemExit(f"the DigitGrid demo needs {', '.join(missing)}, not installed here: {INSTALL}")

    preset = PRESETS[args.preset]
    suffix = "" if preset.name == "default" else f"_{preset.name}"
    data_dir = Path(args.data_dir or f"playground/data/digitgrid{suffix}")
    runs_dir = Path(args.runs_dir or f"playground/runs/digitgrid{suffix}")
    methods = [m for m in METHODS if args.only is None or m.name in args.only.split(",")]
    unknown = set(args.only.split(",")) - {m.name for m in METHODS} if args.only else set()
    if unknown:
        parser.error(f"--only: unknown method(s) {sorted(unknown)}; choose from {[m.name for m in METHODS]}")
    ablations = list(ABLATIONS) if args.ablation else []
    os.environ.setdefault("WANDB_DISABLED", "true")
    started = time.perf_counter()
    seconds: dict[str, float] = {}

    # 1.
    tick = time.perf_counter()
    ensure_data(preset, data_dir, args.fresh)
    seconds["data"] = time.perf_counter() - tick
    tick = time.perf_counter()
    base = ensure_base(preset, data_dir, runs_dir / "base", args.fresh)
    seconds["base models (stage 0)"] = time.perf_counter() - tick

    # 2-3. The main run (the preset's seed), its ablations, then the other seeds' headline rows.
    names = {m.name for m in methods}
    for method in methods + ablations:
        if method.start not in ("base", *names) and not (runs_dir / method.start / "config.json").exists():
            raise SystemExit(f"{method.name} starts from {method.start}, which has not been trained: add it to --only")
    tick = time.perf_counter()
    rows, video_rows, training, evaluations = run_methods(methods + ablations, preset, data_dir, runs_dir,
                                                          runs_dir / "base", args.jobs, args.fresh, preset.seed)
    ablation_rows = {name: rows.pop(name) for m in ablations for name in m.row_names()}
    seconds["training and evaluation"] = time.perf_counter() - tick
    by_seed = {preset.seed: rows}
    headline = [m for m in methods if m.name in HEADLINE]
    for seed in seeds:
        if seed == preset.seed:
            continue
        tick = time.perf_counter()
        seed_rows, _, seed_training, seed_evaluations = run_methods(
            headline, preset, data_dir, runs_dir / f"seed{seed}", runs_dir / "base", args.jobs, args.fresh, seed)
        by_seed[seed] = seed_rows
        training.update({f"seed{seed}/{name}": summary for name, summary in seed_training.items()})
        evaluations.update({f"seed{seed}/{name}": value for name, value in seed_evaluations.items()})
        seconds[f"seed {seed}"] = time.perf_counter() - tick

    # 4.
    rows["text prior"] = {"tokens_per_image": 0, "description": "no image: the most frequent train answer",
                          **text_prior(data_dir, data_dir / "test_questions.jsonl")}
    if video_rows:
        video_rows["text prior"] = {"tokens_per_image": 0, "description": "no video: the most frequent train answer",
                                    **text_prior(data_dir, data_dir / "test_video_questions.jsonl")}
    if "full" in rows:
        retention(rows)
    if "full" in video_rows:
        retention(video_rows)
    categories = sorted({c for row in rows.values() for c in row["categories"]})
    title = f"DigitGrid ({preset.name} preset), images: exact match % on {next(iter(rows.values()))['questions']} test questions"
    table = format_table(rows, categories, title)
    if video_rows:
        video_categories = sorted({c for row in video_rows.values() for c in row["categories"]})
        table += "\n\n" + format_table(video_rows, video_categories, "Clips (4 frames; tokens per frame):")
    print("\n" + table + "\n")
    seeds_summary = None
    if len(by_seed) > 1 and all("full" in seed_rows for seed_rows in by_seed.values()):
        seeds_summary, text = seed_table(by_seed, categories)
        print(text + "\n")
        table += "\n\n" + text
    if ablation_rows and "voco1" in rows:
        text = ablation_table({"voco1": rows["voco1"], **({"voco1+kd": rows["voco1+kd"]} if "voco1+kd" in rows else {}),
                               **ablation_rows})
        print(text + "\n")
        table += "\n\n" + text
    runs_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, video_rows, runs_dir / "accuracy_vs_tokens.png", f"DigitGrid ({preset.name} preset)")

    # 5.
    chat = None
    chat_model = next((runs_dir / m for m in ("voco1", "voco2", "voco4") if m in rows), None)
    if chat_model is not None:
        tick = time.perf_counter()
        chat = {**chat_example(chat_model, data_dir), "model": relative(chat_model, runs_dir)}
        seconds["chat"] = time.perf_counter() - tick
        print(f"chat path ({chat_model.name}): {chat['image']}\n  USER: {chat['question']}\n  ASSISTANT: {chat['answer']}"
              f"   (reference: {chat['reference']})\n  {chat['cache']}")

    seconds = {k: round(v, 1) for k, v in seconds.items()}
    report = {"paths": "relative to this report's folder", "preset": asdict(preset), "base": {**base, "data": relative(data_dir, runs_dir)},
              "rows": rows, "video_rows": video_rows, "ablation_rows": ablation_rows,
              "seeds": {"per_seed_rows": {str(seed): seed_rows for seed, seed_rows in by_seed.items()},
                        "summary": seeds_summary} if seeds_summary else None,
              "training": training, "evaluation_seconds": evaluations,
              "chat": chat, "seconds": seconds, "total_seconds": round(time.perf_counter() - started, 1),
              "table": table}
    (runs_dir / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {runs_dir / 'report.json'}, plot: {runs_dir / 'accuracy_vs_tokens.png'}; "
          f"{report['total_seconds']:.0f} s in all (longest: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in sorted(seconds.items(), key=lambda kv: -kv[1])[:3]) + ")")
    return report


if __name__ == "__main__":
    main()
