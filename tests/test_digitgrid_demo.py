"""The main job, end to end: ``python -m llava_voco.demo --preset quick`` trains and evaluates every method
through the train and eval entries, and its report is a real evaluation of the saved checkpoints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from llava_voco.constants import IGNORE_INDEX
from llava_voco.demo.digitgrid import IMAGE_KINDS, POSITIONS
from llava_voco.demo.models import CONV_MODE
from llava_voco.demo.runner import METHODS, PRESETS
from llava_voco.eval import exact_match, model_vqa
from llava_voco.image_io import load_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("digitgrid_quick")
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_DISABLED": "true"}
    command = [sys.executable, "-m", "llava_voco.demo", "--preset", "quick",
               "--data-dir", str(root / "data"), "--runs-dir", str(root / "runs")]
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    report = json.loads((root / "runs" / "report.json").read_text())
    return root, report, result.stdout


def test_quick_preset_writes_every_row_the_plot_and_the_chat_answer(quick_run):
    root, report, stdout = quick_run
    assert list(report["rows"]) == [name for m in METHODS for name in m.row_names()] + ["text prior"]
    assert [report["rows"][f"elastic@{k}"]["tokens_per_image"] for k in (1, 2, 4, 8)] == [1, 2, 4, 8]
    assert report["seeds"] == [0] and all(row["seeds"] == [0] for name, row in report["rows"].items()
                                          if name != "text prior")
    assert set(report["video_rows"]) == {m.name for m in METHODS if m.video} | {"text prior"}
    for name, row in report["rows"].items():
        if name == "text prior":
            continue
        assert set(row["categories"]) == set(IMAGE_KINDS)
        assert row["questions"] == sum(row["counts"].values()) > 0
        checkpoint = root / "runs" / row["per_seed"][0]["checkpoint"]
        assert (checkpoint / "config.json").exists()
        assert (checkpoint / "command.txt").read_text().startswith("python -m llava_voco.train ")
    # What the run is: every row trained here, how long it took, on what
    assert report["fresh"] is True
    assert report["machine"]["cpu"] and report["machine"]["cores"] >= 1
    assert report["total_seconds"] > sum(report["seconds"].values()) - 1 > 0
    assert all(report["training"][name]["seconds"] > 0 and report["training"][name]["steps"] > 0
               for name in [m.name for m in METHODS])
    plot = load_image(root / "runs" / "accuracy_vs_tokens.png")
    assert plot.size[0] > 300 and plot.size[1] > 200
    assert "cached positions:" in stdout and "compression ratio" in stdout
    assert report["chat"]["answer"] and "compression ratio 16x" in report["chat"]["cache"]
    for method in ("full", "voco1"):  # the VoCo rows really start from full's checkpoint
        command = (root / "runs" / method / "command.txt").read_text()
        assert ("--model_name_or_path " + str(root / "runs" / "full")) in command or method == "full"


def test_rows_from_the_base_models_start_from_their_own_stage_one(quick_run):
    """LLaVA's two stages: full, pool1 and llamavid each pretrain their own projector with the LLM and tower
    frozen (``--tune_mm_mlp_adapter``), and their stage 2 loads it (``--pretrain_mm_mlp_adapter``); every
    training seed's stage 2 reads the same stage 1."""
    import torch
    from safetensors.torch import load_file

    root, report, _ = quick_run
    runs = root / "runs"
    base_llm = load_file(runs / "base" / "llm" / "model.safetensors")
    projectors = {}
    for name in ("full", "pool1", "llamavid"):
        stage_one = runs / "pretrain" / name
        assert report["training"][f"pretrain/{name}"]["steps"] == PRESETS["quick"].projector_pretrain_steps
        assert (stage_one / "command.txt").read_text().startswith("python -m llava_voco.train --tune_mm_mlp_adapter True ")
        adapter = stage_one / "mm_projector.safetensors"
        assert f"--pretrain_mm_mlp_adapter {adapter} " in (runs / name / "command.txt").read_text()
        assert f"loaded the projector from {adapter}" in (runs / name / "train.log").read_text()
        projectors[name] = load_file(adapter)
        # the LLM frozen in stage 1: its weights are the base LLM's, bit for bit
        weights = load_file(stage_one / "model.safetensors")
        for key, value in base_llm.items():
            if key.startswith("model.layers."):
                assert torch.equal(weights["language_model." + key], value), (name, key)
    assert set(projectors["full"]) != set(projectors["llamavid"])  # each row's own projector
    assert not torch.equal(projectors["full"][next(iter(projectors["full"]))],
                           projectors["pool1"][next(iter(projectors["pool1"]))])


def test_quick_full_answers_each_kind_in_its_own_form(quick_run):
    """Full's answers to the test questions, read from its answers file: each is a well-formed answer to the
    question asked, its subject first ("7 yes", "7 twice", "top left 3", "frame 2 5"). A model that answers
    every batch's kind whatever is asked (what length-grouped batches of one-question samples taught it,
    2026-12-06), or a list of digits (the caption turn's answer) to every question, or answers out of step
    with their questions, fails; so does a scorer fed the wrong file."""
    root, report, _ = quick_run
    corner = "(" + "|".join(POSITIONS) + ")"
    forms = {"presence": r"\d (yes|no)", "count": r"\d (none|once|twice)", "largest": r"\d",
             "where": r"\d " + corner, "position": corner + r" \d", "frame": r"frame [1-4] \d"}
    for kind, questions, answers in (("test", "test_questions.jsonl", "answers_test.jsonl"),
                                     ("test_video", "test_video_questions.jsonl", "answers_test_video.jsonl")):
        asked = {q["question_id"]: q for q in map(json.loads, (root / "data" / questions).read_text().splitlines())}
        given = [json.loads(line) for line in (root / "runs" / "full" / answers).read_text().splitlines()]
        assert {a["question_id"] for a in given} == set(asked)
        wrong_form = [(asked[a["question_id"]]["text"], a["text"]) for a in given
                      if not re.fullmatch(forms[asked[a["question_id"]]["category"]], exact_match.normalise(a["text"]))]
        assert len(wrong_form) <= 0.05 * len(given), wrong_form[:10]


def test_the_text_prior_row_is_what_the_train_answers_give(quick_run):
    """The prior, recomputed here from train.json: per test question, the answer given most often to the same
    question text in any turn of training (ties: the first met)."""
    from collections import Counter, defaultdict

    root, report, _ = quick_run
    seen = defaultdict(Counter)
    for sample in json.loads((root / "data" / "train.json").read_text()):
        turns = sample["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2]):
            seen[question["value"].split("\n", 1)[-1]][answer["value"]] += 1
    right, total = Counter(), Counter()
    for question in map(json.loads, (root / "data" / "test_questions.jsonl").read_text().splitlines()):
        guess = seen[question["text"]].most_common(1)[0][0] if seen[question["text"]] else None
        right[question["category"]] += guess == question["answer"]
        total[question["category"]] += 1
    prior = report["rows"]["text prior"]["categories"]
    assert prior == pytest.approx({category: right[category] / total[category] for category in total})
    # Low, as balanced answers make it. The quick preset asks 20 presence questions, each yes or no at random
    # (17 no and 3 yes on 2026-12-07), so answering from the text can reach the larger share but not beyond
    presence = Counter(q["answer"].split()[-1] for q in map(json.loads, (root / "data" / "test_questions.jsonl")
                                                             .read_text().splitlines()) if q["category"] == "presence")
    assert prior["presence"] <= max(0.7, max(presence.values()) / sum(presence.values())) and prior["position"] < 0.3


def test_a_checkpoint_re_evaluated_with_the_eval_entry_gives_the_reported_accuracy(quick_run, tmp_path):
    root, report, _ = quick_run
    data = root / "data"
    answers = tmp_path / "voco1_answers.jsonl"
    model_vqa.main(["--model-path", str(root / "runs" / "voco1"), "--question-file", str(data / "test_questions.jsonl"),
                    "--image-folder", str(data), "--answers-file", str(answers), "--conv-mode", CONV_MODE,
                    "--max-new-tokens", "6", "--batch-size", "3"])  # another batch size than the runner's
    rescored = exact_match.score(str(data / "test_questions.jsonl"), str(answers))
    assert rescored["overall"] == pytest.approx(report["rows"]["voco1"]["overall"])
    assert rescored["categories"] == pytest.approx(report["rows"]["voco1"]["categories"])
    assert report["rows"]["voco1"]["per_seed"][0]["categories"] == pytest.approx(rescored["categories"])


def test_a_rerun_reuses_the_checkpoints_and_gives_the_same_table(quick_run):
    root, report, _ = quick_run
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_DISABLED": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "llava_voco.demo", "--preset", "quick", "--data-dir", str(root / "data"),
         "--runs-dir", str(root / "runs"), "--only", "full,voco1"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "[full] reusing the checkpoint" in result.stdout and "[voco1] reusing the checkpoint" in result.stdout
    again = json.loads((root / "runs" / "report.json").read_text())
    assert again["fresh"] is False  # the rows were not trained by that invocation
    for name in ("full", "voco1"):
        assert again["rows"][name]["categories"] == report["rows"][name]["categories"]


def test_exact_match_refuses_missing_and_unknown_answers(tmp_path):
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "text": "?", "answer": str(i), "category": "c"}) + "\n"
                                 for i in range(3)))
    answers = tmp_path / "a.jsonl"
    answers.write_text("".join(json.dumps({"question_id": i, "text": f" {i}."}) + "\n" for i in range(2)))
    with pytest.raises(ValueError, match=r"no answer to question 2 "):
        exact_match.score(str(questions), str(answers))
    answers.write_text("".join(json.dumps({"question_id": i, "text": "1" if i == 2 else str(i)}) + "\n" for i in range(3)))
    assert exact_match.score(str(questions), str(answers))["overall"] == pytest.approx(2 / 3)
    answers.write_text(answers.read_text() + json.dumps({"question_id": 9, "text": "9"}) + "\n")
    with pytest.raises(ValueError, match="not in"):
        exact_match.score(str(questions), str(answers))


def test_every_answer_is_labelled_with_the_demo_tokenizer(quick_run):
    """The SentencePiece tokenizer the demo trains keeps "\\n" (byte fallback), so character offsets, and
    with them the labels, are exact: the labelled tokens of each sample are its answers, each with </s>."""
    from transformers import AutoProcessor

    from llava_voco.train.data import DataArguments, make_supervised_data_module

    root, _, _ = quick_run
    processor = AutoProcessor.from_pretrained(root / "runs" / "full")
    data = make_supervised_data_module(
        processor, DataArguments(data_path=str(root / "data" / "train.json"), image_folder=str(root / "data")),
        version="v1", model_max_length=512,
    )
    samples = json.loads((root / "data" / "train.json").read_text())
    tokenizer = processor.tokenizer
    from llava_voco.conversation import get_template

    for marker in get_template(CONV_MODE).turn_markers():  # one piece each, as saved and loaded by the entries
        assert tokenizer.tokenize(marker) == [marker], tokenizer.tokenize(marker)
    for index in range(0, len(samples), max(1, len(samples) // 40)):
        item = data["train_dataset"][index]
        labelled = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
        answers = [turn["value"] for turn in samples[index]["conversations"][1::2]]
        pieces = tokenizer.decode(labelled).split(tokenizer.eos_token)
        assert [p.strip() for p in pieces[:-1]] == answers and pieces[-1] == "", (index, pieces)


def test_a_failed_training_run_names_the_method_and_shows_the_end_of_its_log(tmp_path):
    from llava_voco.demo.runner import Task, run_tasks

    task = Task("broken", "llava_voco.train", ["--no_such_flag", "1", "--max_steps", "1"],
                tmp_path / "broken" / "train.log", total=1)
    with pytest.raises(SystemExit, match=r"(?s)\[broken\] training failed .*train\.log.*--no_such_flag"):
        run_tasks([task], jobs=1, fresh=True)
    assert not (tmp_path / "broken" / "command.txt").exists()  # not taken for a finished run on a rerun


def test_a_failed_evaluation_names_the_method_and_the_question_file(tmp_path):
    from llava_voco.demo.runner import Task, eval_command, run_tasks

    questions = tmp_path / "test_questions.jsonl"
    questions.write_text(json.dumps({"question_id": 0, "image": "a.png", "text": "?", "answer": "1"}) + "\n")
    model_dir = tmp_path / "full"  # no checkpoint there
    task = Task("full: test_questions.jsonl", "llava_voco.eval.model_vqa",
                eval_command(model_dir, questions, tmp_path, model_dir / "answers.jsonl"), tmp_path / "eval.log", total=1)
    with pytest.raises(SystemExit, match=r"(?s)\[full: test_questions\.jsonl\] evaluation failed .*eval\.log"):
        run_tasks([task], jobs=1)


def test_only_a_voco_row_retrains_it_from_the_full_checkpoint_on_disk(quick_run, tmp_path):
    """``--only voco1`` with ``full`` trained by an earlier run: voco1 starts from that checkpoint, for as many
    steps as ``--voco-steps`` asks, and the report says so."""
    import shutil

    root, _, _ = quick_run
    runs = tmp_path / "runs"
    for name in ("base", "full", "voco1"):
        shutil.copytree(root / "runs" / name, runs / name)
    (runs / "voco1" / "command.txt").unlink()  # as if that run had been cut short
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_DISABLED": "true"}
    result = subprocess.run(
        [sys.executable, "-m", "llava_voco.demo", "--preset", "quick", "--data-dir", str(root / "data"),
         "--runs-dir", str(runs), "--only", "voco1", "--voco-steps", str(PRESETS["quick"].voco_steps + 5)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    steps = PRESETS["quick"].voco_steps + 5
    assert f"[voco1] trained: {steps} steps" in result.stdout + result.stderr
    report = json.loads((runs / "report.json").read_text())
    assert report["preset"]["voco_steps"] == steps and report["training"]["voco1"]["steps"] == steps
    assert ("--model_name_or_path " + str(runs / "full")) in (runs / "voco1" / "command.txt").read_text()


def test_default_preset_fine_tunes_the_voco_rows_longer_than_the_lower_bound(tmp_path):
    """The default commands: full, pool1 and llamavid from the base models for ``full_steps``; voco1/2/4 from
    full's checkpoint for ``voco_steps``; the lower bound (no mask in training) for ``lower_steps``."""
    from llava_voco.demo.runner import PRESETS, train_command

    preset = PRESETS["default"]
    expected = {"base": preset.full_steps, "voco": preset.voco_steps, "lower": preset.lower_steps}
    for method in METHODS:
        command = train_command(method, preset, tmp_path / "data", tmp_path / "base", tmp_path / "runs")
        steps = int(command[command.index("--max_steps") + 1])
        kind = "base" if method.start == "base" else "lower" if method.name == "lower" else "voco"
        assert steps == expected[kind], (method.name, steps)
        if kind != "base":
            assert command[command.index("--model_name_or_path") + 1] == str(tmp_path / "runs" / "full")
            assert "--voco_mask_in_training" in command if kind == "lower" else "--voco_mask_in_training" not in command
    assert preset.voco_steps > preset.lower_steps


def checkpoints_on_disk(tmp_path, preset):
    """Data, a base build, and full and voco1 checkpoints made from them, in that order, each by its command
    (as a finished run leaves them): (data, base, runs, {name: command})."""
    import time

    from llava_voco.demo.runner import METHODS, printed_command, train_command

    data, base, runs = tmp_path / "data", tmp_path / "base", tmp_path / "runs"
    for folder in (data, base / "llm", runs / "full", runs / "voco1"):
        folder.mkdir(parents=True)
    (data / "settings.json").write_text("{}")
    (base / "base.json").write_text("{}")
    methods = {method.name: method for method in METHODS}
    commands = {name: train_command(methods[name], preset, data, base, runs) for name in ("full", "voco1")}
    time.sleep(0.05)
    for name, command in commands.items():
        for file, text in (("config.json", "{}"), ("train_summary.json", '{"steps": 1}'),
                           ("command.txt", printed_command(command) + "\n")):
            (runs / name / file).write_text(text)
        time.sleep(0.05)
    return data, base, runs, commands


def test_a_checkpoint_is_not_reused_once_what_it_started_from_was_made_again(tmp_path):
    """The same command line names a base build (or a full checkpoint, or data) that may have been made
    again since: --second-base then reused three fulls trained on an older base1/ build (2026-12-07, 7%)."""
    from llava_voco.demo.runner import PRESETS, printed_command, reusable

    data, base, runs, commands = checkpoints_on_disk(tmp_path, PRESETS["quick"])
    assert reusable(runs / "full", commands["full"]) and reusable(runs / "voco1", commands["voco1"])
    assert not reusable(runs / "full", commands["voco1"])  # another command
    (base / "base.json").write_text("{}")  # the base built again
    assert not reusable(runs / "full", commands["full"])
    (runs / "full" / "command.txt").write_text(printed_command(commands["full"]) + "\n")  # full retrained
    assert reusable(runs / "full", commands["full"]) and not reusable(runs / "voco1", commands["voco1"])
    (runs / "voco1" / "command.txt").write_text(printed_command(commands["voco1"]) + "\n")
    (data / "settings.json").write_text("{}")  # the data made again
    assert not reusable(runs / "voco1", commands["voco1"]) and not reusable(runs / "full", commands["full"])


def test_a_checkpoint_is_not_reused_when_what_it_starts_from_is_trained_again_in_the_same_run(tmp_path, capsys):
    """voco1's checkpoint on disk was made from the full on disk; when this run trains full again (another
    command: a changed flag), voco1 must be trained again after it, not reused from the old full."""
    from llava_voco.demo.runner import PRESETS, Task, run_tasks

    _, _, runs, commands = checkpoints_on_disk(tmp_path, replace(PRESETS["quick"], projector_pretrain_steps=0))

    def tasks(full_command):
        return [Task("full", "llava_voco.train", full_command, runs / "full" / "train.log", 1),
                Task("voco1", "llava_voco.train", commands["voco1"], runs / "voco1" / "train.log", 1, after="full")]

    summaries = run_tasks(tasks(commands["full"]), jobs=1)  # both as on disk: both reused, nothing runs
    assert summaries["full"]["reused"] and summaries["voco1"]["reused"]
    capsys.readouterr()
    with pytest.raises(SystemExit, match=r"\[full\] training failed"):  # full changed: trained (and fails here)
        run_tasks(tasks(commands["full"] + ["--no_such_flag", "1"]), jobs=1)
    assert "[voco1] reusing" not in capsys.readouterr().out
