"""The DigitGrid demo: the VoCo paper's central comparison, reproduced on CPU from real digits.

    python -m llava_voco.demo [--preset default|quick] [--data-dir playground/data/digitgrid]
        [--runs-dir playground/runs/digitgrid] [--only full,voco1] [--fresh] [--jobs 2]
        [--seeds 0,1,2] [--second-base 1] [--ablation]

Read top to bottom, the run is:
  1. the data (``llava_voco.demo.digitgrid``) and the base models (``llava_voco.demo.models``: a SentencePiece
     tokenizer, a Llama from configs trained on grids written in digit words (its text stage, minutes), a CLIP
     vision tower pretrained for seconds), built if absent;
  2. one training run per method and training seed through the train entry (``python -m llava_voco.train``,
     LLaVA's flags; each command is printed and saved in ``<runs-dir>/<method>/command.txt``, its output in
     ``train.log``), one single-threaded process per core, checkpoints kept in ``<runs-dir>/<method>/``:
       full      all 16 vision tokens (the upper bound)
       pool1     the 16 patches averaged into 1 token (the paper's pooling baseline), trained the same way
       llamavid  LLaMA-VID: a context token + 1 mean content token
       voco1/2/4 VoCo with k tokens, fine-tuned from ``full`` (VoCo-LLaMA's released config trains from the base LLM instead: design §5)
       voco1+kd  voco1 plus distillation against full vision tokens (``--voco_distill_weight 1 --voco_distill_temperature 2``)
       elastic   one model trained with k drawn from 1, 2, 4, 8 (``--voco_train_tokens``), evaluated at each k
       lower     VoCo k=1 fine-tuned from ``full`` *without* the VoCo mask, evaluated with it (the lower bound)
     The headline rows (``HEADLINE``) are trained with every training seed of the preset (``--seeds``; the
     others with the first), under ``seed<s>/``; ``--second-base`` trains ``full`` with each seed from a second
     base build; ``--ablation`` adds one lever at a time against voco1 (``ABLATIONS``);
  3. every checkpoint answers the test questions through the eval entry (``llava_voco.eval.model_vqa``),
     scored by exact match (``llava_voco.eval.exact_match``); the clip questions for the video rows;
  4. the table (mean +- standard deviation across seeds), ``report.json`` (each row's seeds and per-seed
     scores, whether every row was trained by this invocation, the time, the CPU) and
     ``accuracy_vs_tokens.png`` (error bars) in ``<runs-dir>``;
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
from .models import CONV_MODE, BaseSizes, build_base


@dataclass(frozen=True)
class Preset:
    """What one run trains on and for how long."""

    name: str
    train_images: int
    test_images: int
    train_clips: int
    test_clips: int
    vision_pretrain_steps: int
    llm_pretrain_steps: int  # the LLM's text stage (models.pretrain_llm), once per base build
    batch_size: int
    full_steps: int  # full, pool1 and llamavid, from the base models (after their stage 1)
    voco_steps: int  # voco1/2/4, from full
    lower_steps: int  # lower, from full: without the mask its VoCo tokens learn nothing to keep, however long it trains
    # LLaVA's stage 1 (--tune_mm_mlp_adapter) of each row trained from the base models: its projector alone, on the
    # train conversations, the LLM and tower frozen; stage 2 starts from it (--pretrain_mm_mlp_adapter). 0: none
    projector_pretrain_steps: int = 0
    projector_pretrain_lr: float = 1e-2
    learning_rate: float = 2e-3
    voco_learning_rate: float = 1e-3
    # None: the vision tower frozen, as LLaVA's stage 2 keeps it; a float tunes it at that learning rate (2e-4
    # let the pretrained tower drift while the LLM sat at the text prior)
    vision_tower_lr: float | None = None
    weight_decay: float = 0.1
    frames: int = 4
    turns: int = 5  # questions per train sample (every kind about its image: 5 answers a step for ~2x the text)
    caption: bool = True  # train samples start with "What digits are shown?" -> "3 5 0 9" (digitgrid.caption)
    seed: int = 0  # data, base models
    seeds: tuple[int, ...] = (0, 1, 2)  # training seeds of the headline rows (the first: every row)


PRESETS = {
    # Every row, three seeds of the headline rows: 28.4, 30.9 and 35.5 minutes in three fresh runs on a quiet
    # 2-core Intel Xeon (2026-12-07; every figure the same: the machine's speed moves it), 4.8 of the first the
    # base build (the LLM's text stage, then stage 0) and about 2.5 each row's stage 1; full 97.6 +- 0.6% on
    # images and 96.0 +- 0.2% on clips against text priors of 28.7% and 30.4%
    # (docs/experiments/digitgrid-2026-12-07.md). 12,000 train grids and 6,000 clips (a third of the samples:
    # with a sixth, full's clip kinds stopped at 60-85%).
    "default": Preset("default", train_images=12000, test_images=400, train_clips=6000, test_clips=240,
                      vision_pretrain_steps=3000, llm_pretrain_steps=1200, batch_size=32, projector_pretrain_steps=300,
                      full_steps=400, voco_steps=150, lower_steps=50),
    # A few minutes on a quiet machine, for the tests: every row, one seed, real training and evaluation; long
    # enough for full to answer each kind in its form, far too short to read the images
    "quick": Preset("quick", train_images=1000, test_images=100, train_clips=200, test_clips=30,
                    vision_pretrain_steps=100, llm_pretrain_steps=60, batch_size=16, projector_pretrain_steps=20,
                    full_steps=120, voco_steps=20, lower_steps=10,
                    seeds=(0,)),
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
    Method("full", "all vision tokens (upper bound)", 16, "base", ("--mm_projector_type", "mlp2x_gelu"), video=True),
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
                "seed": preset.seed, "turns": preset.turns, "caption": preset.caption}
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


def ensure_base(preset: Preset, data_dir: Path, base_dir: Path, fresh: bool, base_seed: int | None = None) -> dict:
    """The base models under ``base_dir``, built unless the same sizes and data made them (then ``reused``)."""
    sizes = replace(BaseSizes(), vision_pretrain_steps=preset.vision_pretrain_steps,
                    llm_pretrain_steps=preset.llm_pretrain_steps, seed=preset.seed if base_seed is None else base_seed)
    marker = base_dir / "base.json"
    if not fresh and marker.exists():
        saved = json.loads(marker.read_text())
        if saved["sizes"] == asdict(sizes) and saved.get("data") == str(data_dir.resolve()):
            print(f"base models: reusing {base_dir}")
            return {**saved, "reused": True}
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


def pretrain_dir(method: Method, base_dir: Path) -> Path:
    """Where ``method``'s stage 1 is, beside the base build it starts from (shared by every training seed, as
    LLaVA users share a pretrained projector)."""
    return base_dir.parent / "pretrain" / method.name


def train_command(method: Method, preset: Preset, data_dir: Path, base_dir: Path, runs_dir: Path,
                  seed: int | None = None, stage_one: bool = False) -> list[str]:
    """The train entry's command line for ``method`` (what a user would type). ``stage_one``: its stage 1 from
    the base models, LLaVA's pretrain stage: the projector (LLaMA-VID's with its text decoder and queries)
    alone, the LLM and tower frozen, at a projector's learning rate and no weight decay, as LLaVA's pretrain
    script; on the train conversations rather than captions alone (with captions only, full's where fell to
    52.5% on seed 2 against 98.8%, 2026-12-07)."""
    output_dir, steps, weight_decay = runs_dir / method.name, training_steps(method, preset), preset.weight_decay
    if stage_one:
        model = ["--tune_mm_mlp_adapter", "True", "--model_name_or_path", base_dir / "llm",
                 "--vision_tower", base_dir / "vision_tower", "--mm_vision_select_layer", "-1"]
        output_dir, steps, weight_decay = pretrain_dir(method, base_dir), preset.projector_pretrain_steps, 0.0
        learning_rate, seed = preset.projector_pretrain_lr, preset.seed
    elif method.start == "base":
        model = ["--model_name_or_path", base_dir / "llm", "--vision_tower", base_dir / "vision_tower",
                 "--mm_vision_select_layer", "-1"]
        if preset.vision_tower_lr is not None:
            model += ["--unfreeze_mm_vision_tower", "True", "--mm_vision_tower_lr", preset.vision_tower_lr]
        if preset.projector_pretrain_steps:
            model += ["--pretrain_mm_mlp_adapter", pretrain_dir(method, base_dir) / "mm_projector.safetensors"]
        learning_rate = preset.learning_rate
    else:
        model = ["--model_name_or_path", runs_dir / method.start]
        learning_rate = preset.voco_learning_rate
    if method.name == "llamavid":
        model += ["--text_decoder_tokenizer", base_dir / "text_decoder_tokenizer",
                  "--text_decoder_config", base_dir / "text_decoder.json", "--num_query", "8",
                  "--compress_type", "mean", "--video_compress_type", "mean", "--instruction_max_length", "32",
                  # LLaMA-VID's input LayerNorm (its default since issue 27) off, as in every DigitGrid
                  # llamavid figure so far (the 2026-12-06 design has not measured llamavid yet)
                  "--text_decoder_input_norm", "False"]
    command = [
        *model, *method.flags,
        "--version", CONV_MODE, "--data_path", data_dir / "train.json", "--image_folder", data_dir,
        "--output_dir", output_dir, "--max_steps", steps,
        "--per_device_train_batch_size", preset.batch_size, "--learning_rate", learning_rate,
        "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.05", "--weight_decay", weight_decay,
        "--model_max_length", "512", "--cache_samples", "True",
        # Random batches. Grouped by modality and length, a batch of one-question samples holds one kind of
        # question (each kind's text has its own length): full then learned to answer each batch's kind,
        # whatever was asked (400 steps: "bottom" to "Is there a 1?", the text prior on every kind, 2026-12-06).
        # With today's five-question samples grouping only sorts by length: steps were 20% faster, but full's
        # where fell to 59% and 58% (seeds 0, 2; 500 steps), against 97.5% and 93.8% at random (2026-12-07).
        "--group_by_modality_length", "False",
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
        "--answers-file", answers_file, "--conv-mode", CONV_MODE, "--max-new-tokens", "6", "--batch-size", "16", *k)]


def answers_name(kind: str, voco_tokens: int | None = None) -> str:
    """``answers_test.jsonl`` / ``answers_test_video.jsonl`` (``answers_test_k2.jsonl`` at an elastic k)."""
    return f"answers_{kind}" + (f"_k{voco_tokens}" if voco_tokens is not None else "") + ".jsonl"


def printed_command(command: list[str], module: str = "llava_voco.train") -> str:
    return f"python -m {module} " + shlex.join(command)


def started_from(command: list[str]) -> list[Path]:
    """The records of what a training reads, each rewritten when that input is remade: the data's
    ``settings.json``, and the ``base.json`` of the base build or the ``command.txt`` of the checkpoint it starts
    from."""
    data = Path(command[command.index("--data_path") + 1]).parent / "settings.json"
    start = Path(command[command.index("--model_name_or_path") + 1])
    records = [data, start / "command.txt" if (start / "command.txt").exists() else start.parent / "base.json"]
    if "--pretrain_mm_mlp_adapter" in command:
        records.append(Path(command[command.index("--pretrain_mm_mlp_adapter") + 1]).parent / "command.txt")
    return records


def reusable(output_dir: Path, command: list[str]) -> bool:
    """Made by the same command, after its data and what it starts from were last made: the same command line
    can name a base build made again since (2026-12-07: --second-base reused three fulls trained on an older
    build of base1/, and scored 7%)."""
    record = output_dir / "command.txt"
    if not (record.exists() and record.read_text().strip() == printed_command(command) and (output_dir / "config.json").exists()):
        return False
    made = record.stat().st_mtime
    return all(not source.exists() or source.stat().st_mtime <= made for source in started_from(command))


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


def answered(evaluation: Task) -> bool:
    """An evaluation of a reused checkpoint whose answers file already answers every question (then kept)."""
    answers = Path(evaluation.command[evaluation.command.index("--answers-file") + 1])
    if not answers.exists():
        return False
    done = sum(1 for line in answers.read_text().splitlines() if line.strip()) == evaluation.total
    if done:
        print(f"[{evaluation.name}] reusing its answers")
    return done


def finished_with_cpu_seconds(process: subprocess.Popen) -> float | None:
    """None while ``process`` runs; once it has ended, the CPU seconds (user + system) it used, which unlike
    its wall time do not depend on what else the machine runs (``returncode`` is set as ``poll`` sets it)."""
    if process.returncode is not None:
        return 0.0
    pid, status, usage = os.wait4(process.pid, os.WNOHANG)
    if pid == 0:
        return None
    process.returncode = os.waitstatus_to_exitcode(status)
    return round(usage.ru_utime + usage.ru_stime, 1)


STEP_PATTERN = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "12/800 [" in a train or eval log


def run_tasks(tasks: list[Task], jobs: int, fresh: bool = False) -> dict[str, dict]:
    """Runs the tasks as processes, ``jobs`` at a time, each with cores / jobs threads (on 2 cores two
    1-thread runs get through ~1.2x the steps of one 2-thread run: these models are too small to keep two
    threads busy). A training starts once the checkpoint it starts from exists and is skipped when its
    checkpoint was made by the same command (``command.txt``, written last) and what it starts from is not
    trained again in this run; its evaluations then take the
    next free slot, before trainings not yet started. Returns per task name its training summary or
    ``{"seconds": ...}``; stops at the first failure with the task's name and the end of its log."""
    summaries, running = {}, {}
    pending = list(tasks)
    planned = {task.name for task in tasks if task.is_training}
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    for task in list(pending):
        output_dir = task.log.parent
        # not when what it starts from is trained again in this run (its checkpoint on disk is the old one)
        starts_from_a_retraining = task.after in {other.name for other in pending if other.is_training}
        if task.is_training and not fresh and not starts_from_a_retraining and reusable(output_dir, task.command):
            print(f"[{task.name}] reusing the checkpoint in {output_dir}")
            summaries[task.name] = {**json.loads((output_dir / "train_summary.json").read_text()), "reused": True}
            pending[pending.index(task):pending.index(task) + 1] = [
                evaluation for evaluation in task.evaluations if not answered(evaluation)]
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
            finished = finished_with_cpu_seconds(process)
            if finished is None:
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
                summaries[name] = {"seconds": round(seconds, 1), "cpu_seconds": finished}
                continue
            output_dir = task.log.parent
            summary = {**training_summary(output_dir, seconds), "cpu_seconds": finished}
            (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1))
            (output_dir / "command.txt").write_text(printed_command(task.command) + "\n")  # last: a run cut short is redone
            summaries[name] = summary
            pending[:0] = list(task.evaluations)
            tqdm.write(f"[{name}] trained: {summary['steps']} steps in {summary['seconds']:.0f} s, "
                       f"loss {summary['first_loss']} -> {summary['last_loss']}")
    return summaries


@dataclass(frozen=True)
class Group:
    """Methods trained with one training seed from one base build, under ``runs_dir`` (task names get ``prefix``)."""

    prefix: str  # "" for the main run, "seed1/" for another training seed, "base1/seed0/" for another base build
    runs_dir: Path
    base_dir: Path
    seed: int
    methods: tuple[Method, ...]
    base_prefix: str = ""  # the prefix of the base build's own tasks (stage 1): "" for the main one, "base1/"


def pretrain_task(method: Method, preset: Preset, data_dir: Path, base_dir: Path, base_prefix: str = "") -> Task:
    """``method``'s stage 1 from the base build in ``base_dir`` (no evaluation: no row reads it)."""
    return Task(f"{base_prefix}pretrain/{method.name}", "llava_voco.train",
                train_command(method, preset, data_dir, base_dir, base_dir.parent, stage_one=True),
                pretrain_dir(method, base_dir) / "train.log",
                preset.projector_pretrain_steps)


def method_tasks(method: Method, preset: Preset, data_dir: Path, runs_dir: Path, base_dir: Path | None = None,
                 seed: int | None = None, prefix: str = "", base_prefix: str = "") -> Task:
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
            evaluations.append(Task(f"{prefix}{method.name}: {answers}", "llava_voco.eval.model_vqa",
                                    eval_command(output_dir, data_dir / questions, data_dir, output_dir / answers, k),
                                    output_dir / answers.replace("answers_", "eval_").replace(".jsonl", ".log"), count))
    steps = training_steps(method, preset)
    base_dir = base_dir if base_dir is not None else runs_dir / "base"
    if method.start != "base":
        after = prefix + method.start
    else:
        after = f"{base_prefix}pretrain/{method.name}" if preset.projector_pretrain_steps else None
    return Task(prefix + method.name, "llava_voco.train",
                train_command(method, preset, data_dir, base_dir, runs_dir, seed), output_dir / "train.log", steps,
                after=after, evaluations=tuple(evaluations))


def score(method: Method, runs_dir: Path, data_dir: Path, kind: str, questions: str, seed: int,
          voco_tokens: int | None = None, report_dir: Path | None = None) -> dict:
    from ..eval import exact_match

    output_dir = runs_dir / method.name
    return {"checkpoint": relative(output_dir, report_dir or runs_dir), "seed": seed,
            **exact_match.score(str(data_dir / questions), str(output_dir / answers_name(kind, voco_tokens)))}


def run_groups(groups: list[Group], preset: Preset, data_dir: Path, report_dir: Path, jobs: int, fresh: bool):
    """Trains and evaluates every group's methods in one queue: each base build's stage 1 of each row trained from
    it, every ``full`` (the VoCo rows start from it), then the other rows trained from the base models (400
    steps), then the VoCo rows (150): the longest
    first, so that the run ends on short tasks instead of one long training beside an idle core (the
    2026-12-07 fresh run: 1,836 s before, 1,777 s after, the same CPU seconds). Returns per group prefix (image rows, clip rows) of single-seed scores,
    the training summaries and the evaluation seconds, by task name."""
    tasks = [(group, method, method_tasks(method, preset, data_dir, group.runs_dir, group.base_dir, group.seed,
                                          group.prefix, group.base_prefix))
             for group in groups for method in group.methods]
    order = {"full": 0, "base": 1}
    tasks.sort(key=lambda entry: order.get(entry[1].name, order["base"] if entry[1].start == "base" else 2))
    stage_one = {}  # each base build's stage 1 of each row trained from it, first in the queue
    if preset.projector_pretrain_steps:
        for group, method, _ in tasks:
            if method.start == "base":
                task = pretrain_task(method, preset, data_dir, group.base_dir, group.base_prefix)
                stage_one.setdefault(task.name, task)
    finished = run_tasks([*stage_one.values(), *(task for _, _, task in tasks)], jobs, fresh)
    scores: dict[str, tuple[dict, dict]] = {group.prefix: ({}, {}) for group in groups}
    for group, method, _ in tasks:
        rows, video_rows = scores[group.prefix]
        for k in method.eval_voco_tokens or (None,):
            name = f"{method.name}@{k}" if k is not None else method.name
            rows[name] = score(method, group.runs_dir, data_dir, "test", "test_questions.jsonl", group.seed, k,
                               report_dir)
            if method.video and preset.test_clips:
                video_rows[name] = score(method, group.runs_dir, data_dir, "test_video", "test_video_questions.jsonl",
                                         group.seed, k, report_dir)
    training = {name: finished[name] for name in stage_one} | {task.name: finished[task.name] for _, _, task in tasks}
    evaluations = {name: summary for name, summary in finished.items() if ":" in name}
    return scores, training, evaluations


def combine_seeds(methods: list[Method], per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """One row per method from its single-seed scores (a list of ``{row name: score}``, one per training seed):
    the mean accuracy per category and overall, the sample standard deviation across seeds (None with one
    seed), and each seed's score."""
    import statistics

    rows = {}
    for method in methods:
        for k in method.eval_voco_tokens or (None,):
            name = f"{method.name}@{k}" if k is not None else method.name
            runs = [scores[name] for scores in per_seed if name in scores]
            if not runs:
                continue

            def spread(values):
                return statistics.stdev(values) if len(values) > 1 else None

            categories = sorted(runs[0]["categories"])
            description = method.description + (f", evaluated at k={k}" if k is not None else "")
            rows[name] = {
                "tokens_per_image": k or method.tokens_per_image, "description": description,
                "seeds": [run["seed"] for run in runs], "questions": runs[0]["questions"],
                "counts": runs[0]["counts"],
                "categories": {c: statistics.fmean(run["categories"][c] for run in runs) for c in categories},
                "overall": statistics.fmean(run["overall"] for run in runs),
                "std": {"categories": {c: spread([run["categories"][c] for run in runs]) for c in categories},
                        "overall": spread([run["overall"] for run in runs])},
                "per_seed": runs,
            }
    return rows


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
    """Raw retention (accuracy / full's) and normalised retention ((acc - lower) / (full - lower)), of the
    means; and, for a row trained with several seeds, the raw retention of each seed against ``full`` of the
    same seed, with its mean and spread."""
    import statistics

    full, lower = rows["full"][key], rows.get("lower", {}).get(key)
    full_by_seed = {run["seed"]: run[key] for run in rows["full"].get("per_seed", [])}
    for name, row in rows.items():
        if name == "text prior":
            continue
        row["raw_retention"] = row[key] / full if full else None
        span = (full - lower) if lower is not None else None
        row["normalised_retention"] = (row[key] - lower) / span if span else None
        paired = [run[key] / full_by_seed[run["seed"]] for run in row.get("per_seed", [])
                  if full_by_seed.get(run["seed"])]
        if len(paired) > 1:
            row["raw_retention_by_seed"] = {"per_seed": paired, "mean": statistics.fmean(paired),
                                            "std": statistics.stdev(paired)}


def percent(value: float | None, spread: float | None = None) -> str:
    if value is None:
        return ""
    return f"{100 * value:.1f}" + (f" +- {100 * spread:.1f}" if spread is not None else "")


def format_table(rows: dict[str, dict], categories: list[str], title: str) -> str:
    """Accuracy per category and overall (mean +- standard deviation across training seeds where a row has
    several), and retention."""
    header = ["method", "tok", "seeds", *categories, "overall", "raw ret.", "norm. ret."]
    table = [header]
    for name, row in rows.items():
        std = row.get("std") or {"categories": {}, "overall": None}
        cells = [name, str(row["tokens_per_image"]), ",".join(map(str, row.get("seeds", []))) or "-"]
        cells += [percent(row["categories"].get(c), std["categories"].get(c)) for c in categories]
        cells += [percent(row["overall"], std["overall"])]
        by_seed = row.get("raw_retention_by_seed")
        cells += [percent(by_seed["mean"], by_seed["std"]) + "%" if by_seed else
                  ("" if row.get("raw_retention") is None else f"{100 * row['raw_retention']:.1f}%")]
        cells += ["" if row.get("normalised_retention") is None else f"{100 * row['normalised_retention']:.1f}%"]
        table.append(cells)
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    lines = [" | ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in table]
    return "\n".join([title, *lines])


def plot(rows: dict[str, dict], video_rows: dict[str, dict], path: Path, title: str) -> None:
    """Overall accuracy against vision tokens per image; error bars: the standard deviation across seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    labels: list[tuple[str, int, float, dict]] = []  # (text, tokens, accuracy, style), written once all are known

    for name, row in rows.items():
        if name == "text prior":
            axis.axhline(100 * row["overall"], color="gray", linestyle=":", linewidth=1, label="text prior (no image)")
            continue
        spread = (row.get("std") or {}).get("overall")
        axis.errorbar(row["tokens_per_image"], 100 * row["overall"], yerr=None if spread is None else 100 * spread,
                      fmt="o", capsize=3, zorder=3)
        labels.append((name, row["tokens_per_image"], 100 * row["overall"], {}))
    for name, row in video_rows.items():
        if name == "text prior":
            continue
        spread = (row.get("std") or {}).get("overall")
        axis.errorbar(row["tokens_per_image"], 100 * row["overall"], yerr=None if spread is None else 100 * spread,
                      fmt="s", mfc="none", color="gray", capsize=3, zorder=3)
        labels.append((f"{name} (clips)", row["tokens_per_image"], 100 * row["overall"], {"color": "gray"}))
    # At one token count, rows within a few points of each other (voco1 and voco1+kd, llamavid and voco2) would
    # have their names printed over each other: each name goes at least a line's height under the one above it.
    low, high = axis.get_ylim()
    line = 0.05 * (high - low)
    for tokens in sorted({tokens for _, tokens, _, _ in labels}):
        above = None
        at_tokens = sorted((entry for entry in labels if entry[1] == tokens), key=lambda entry: -entry[2])
        for text, _, accuracy, style in at_tokens:
            at = accuracy if above is None else min(accuracy, above - line)
            axis.annotate(text, (tokens, accuracy), xytext=(tokens * 1.07, at - line / 4), fontsize=9, **style)
            above = at
    axis.legend(loc="lower right", fontsize=8)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("vision tokens per image (or frame) the text reads")
    axis.set_ylabel("exact-match accuracy, test split (%)")
    axis.set_title(title + "\n(error bars: standard deviation across training seeds)", fontsize=9)
    axis.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def machine() -> dict:
    """The CPU the run used (model name from /proc/cpuinfo), its cores and the load when asked."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = [round(value, 2) for value in os.getloadavg()]
    except OSError:
        load = None
    return {"cpu": model, "cores": os.cpu_count(), "load_average_1_5_15_min": load}


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
    chat = ImageChat(model, processor, get_template(CONV_MODE), [image], generation_kwargs={"max_new_tokens": 4})
    answer = chat.ask(question["text"])
    return {"model": str(model_dir), "image": question["image"], "question": question["text"], "answer": answer,
            "reference": question["answer"], "cache": chat.cache_summary()}


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
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes side by side, one thread each (default: one per core)")
    parser.add_argument("--seeds", default=None,
                        help="training seeds of the headline rows (" + ", ".join(HEADLINE) + "), e.g. 0,1,2 (default: "
                             "the preset's); the first is the main run, whose other rows use it too")
    parser.add_argument("--second-base", type=int, default=None, metavar="BASE_SEED",
                        help="also train full, with each training seed, from a second base build made with this "
                             "seed (another LLM and tower initialisation and stage-0 batches), under <runs-dir>/base<SEED>/")
    parser.add_argument("--voco-steps", type=int, default=None, metavar="N",
                        help="train the VoCo rows (voco1/2/4, voco1+kd, elastic) N steps from full instead of the "
                             "preset's (default preset: 150)")
    parser.add_argument("--ablation", action="store_true",
                        help="also train one lever at a time against voco1 (" + ", ".join(m.name for m in ABLATIONS) + ")")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    missing = missing_dependencies()
    if missing:
        raise SystemExit(f"the DigitGrid demo needs {', '.join(missing)}, not installed here: {INSTALL}")

    preset = PRESETS[args.preset]
    if args.voco_steps is not None:
        if args.voco_steps < 1:
            parser.error("--voco-steps must be at least 1")
        preset = replace(preset, voco_steps=args.voco_steps)
    seeds = parse_seeds(args.seeds, parser) if args.seeds else list(preset.seeds)
    if args.second_base is not None and args.second_base == preset.seed:
        parser.error(f"--second-base {args.second_base}: the main base build already uses seed {preset.seed}")
    suffix = "" if preset.name == "default" else f"_{preset.name}"
    data_dir = Path(args.data_dir or f"playground/data/digitgrid{suffix}")
    runs_dir = Path(args.runs_dir or f"playground/runs/digitgrid{suffix}")
    methods = [m for m in METHODS if args.only is None or m.name in args.only.split(",")]
    unknown = set(args.only.split(",")) - {m.name for m in METHODS} if args.only else set()
    if unknown:
        parser.error(f"--only: unknown method(s) {sorted(unknown)}; choose from {[m.name for m in METHODS]}")
    ablations = list(ABLATIONS) if args.ablation else []
    os.environ.setdefault("WANDB_DISABLED", "true")
    # One thread per process: on a shared machine two-thread processes spend their time waiting for each other
    # (stage 0 ran at 0.3 steps/s with two threads beside other work, 5 steps/s with one, 2026-12-06).
    import torch

    torch.set_num_threads(1)
    started, at_start = time.perf_counter(), machine()
    seconds: dict[str, float] = {}

    # 1.
    tick = time.perf_counter()
    ensure_data(preset, data_dir, args.fresh)
    seconds["data"] = time.perf_counter() - tick
    tick = time.perf_counter()
    base = ensure_base(preset, data_dir, runs_dir / "base", args.fresh)
    second_base = None
    if args.second_base is not None:
        second_base = ensure_base(preset, data_dir, runs_dir / f"base{args.second_base}" / "base", args.fresh,
                                  base_seed=args.second_base)
    seconds["base models (stage 0)"] = time.perf_counter() - tick

    # 2-3. Every run in one queue: the main run (the first seed; all rows and ablations), the headline rows
    # with the other seeds, and full from the second base build with every seed.
    names = {m.name for m in methods}
    for method in methods + ablations:
        if method.start not in ("base", *names) and not (runs_dir / method.start / "config.json").exists():
            raise SystemExit(f"{method.name} starts from {method.start}, which has not been trained: add it to --only")
    headline = tuple(m for m in methods if m.name in HEADLINE)
    groups = [Group("", runs_dir, runs_dir / "base", seeds[0], tuple(methods + ablations))]
    groups += [Group(f"seed{seed}/", runs_dir / f"seed{seed}", runs_dir / "base", seed, headline) for seed in seeds[1:]]
    full = tuple(m for m in METHODS if m.name == "full")
    if args.second_base is not None:
        second_dir = runs_dir / f"base{args.second_base}"
        groups += [Group(f"base{args.second_base}/seed{seed}/", second_dir / f"seed{seed}", second_dir / "base", seed, full,
                         base_prefix=f"base{args.second_base}/") for seed in seeds]
    tick = time.perf_counter()
    scores, training, evaluations = run_groups(groups, preset, data_dir, runs_dir, args.jobs, args.fresh)
    seconds["training and evaluation"] = time.perf_counter() - tick

    # 4.
    main_groups = [group.prefix for group in groups if not group.prefix.startswith("base")]
    rows = combine_seeds(methods, [scores[prefix][0] for prefix in main_groups])
    video_rows = combine_seeds(methods, [scores[prefix][1] for prefix in main_groups])
    ablation_rows = combine_seeds(ablations, [scores[""][0]])
    rows["text prior"] = {"tokens_per_image": 0, "description": "no image: the most frequent train answer",
                          **text_prior(data_dir, data_dir / "test_questions.jsonl")}
    if video_rows:
        video_rows["text prior"] = {"tokens_per_image": 0, "description": "no video: the most frequent train answer",
                                    **text_prior(data_dir, data_dir / "test_video_questions.jsonl")}
    if "full" in rows:
        retention(rows)
    if "full" in video_rows:
        retention(video_rows)
    categories = list(digitgrid.IMAGE_KINDS)
    title = (f"DigitGrid ({preset.name} preset), images: exact match % on {rows['text prior']['questions']} test "
             f"questions (mean +- standard deviation across training seeds)")
    table = format_table(rows, categories, title)
    if video_rows:
        table += "\n\n" + format_table(video_rows, list(digitgrid.CLIP_KINDS),
                                        f"Clips ({preset.frames} frames; tokens per frame), "
                                        f"{video_rows['text prior']['questions']} test questions:")
    second = None
    if args.second_base is not None:
        prefixes = [group.prefix for group in groups if group.prefix.startswith("base")]
        second = {"base": second_base,
                  "rows": combine_seeds(full, [scores[prefix][0] for prefix in prefixes]),
                  "video_rows": combine_seeds(full, [scores[prefix][1] for prefix in prefixes])}
        text = format_table({"full": rows["full"], f"full, base {args.second_base}": second["rows"]["full"],
                             "text prior": rows["text prior"]}, categories,
                            f"full from the main base build (seed {preset.seed}) and from base build {args.second_base}:")
        if video_rows:
            text += "\n" + format_table({"full": video_rows["full"],
                                         f"full, base {args.second_base}": second["video_rows"]["full"],
                                         "text prior": video_rows["text prior"]}, list(digitgrid.CLIP_KINDS), "clips:")
        table += "\n\n" + text
    if ablation_rows and "voco1" in rows:
        text = ablation_table({"voco1": scores[""][0]["voco1"] | {"description": rows["voco1"]["description"]},
                               **ablation_rows})
        table += "\n\n" + text
    print("\n" + table + "\n")
    runs_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, video_rows, runs_dir / "accuracy_vs_tokens.png",
         f"DigitGrid ({preset.name} preset), training seeds {', '.join(map(str, seeds))} for the headline rows")

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
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    cpu_seconds = {"this process (data, stage 0, scoring, plot, chat)": round(own.ru_utime + own.ru_stime, 1),
                   "trainings": round(sum(t.get("cpu_seconds") or 0 for t in training.values()), 1),
                   "evaluations": round(sum(e.get("cpu_seconds") or 0 for e in evaluations.values()), 1)}
    cpu_seconds["total"] = round(sum(cpu_seconds.values()), 1)
    fresh = not any(summary.get("reused") for summary in [*training.values(), base, second_base or {}])
    report = {"paths": "relative to this report's folder", "preset": asdict(preset), "seeds": seeds,
              "fresh": fresh, "machine": {**at_start, "load_average_at_end": machine()["load_average_1_5_15_min"]},
              "base": {**base, "data": relative(data_dir, runs_dir)},
              "rows": rows, "video_rows": video_rows, "ablation_rows": ablation_rows, "second_base": second,
              "training": training, "evaluations": evaluations,
              "chat": chat, "seconds": seconds, "total_seconds": round(time.perf_counter() - started, 1),
              "cpu_seconds": cpu_seconds,
              "table": table}
    (runs_dir / "report.json").write_text(json.dumps(report, indent=1))
    print(f"report: {runs_dir / 'report.json'}, plot: {runs_dir / 'accuracy_vs_tokens.png'}; "
          f"{report['total_seconds']:.0f} s in all ({cpu_seconds['total']:.0f} CPU seconds) on {at_start['cpu']} ({at_start['cores']} cores; load "
          f"{at_start['load_average_1_5_15_min']} at the start){'' if fresh else '; not fresh: some rows reused'}")
    return report


if __name__ == "__main__":
    main()
