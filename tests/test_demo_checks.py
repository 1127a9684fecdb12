"""The DigitGrid demo's runner, without its 25 minutes of training: it checks what the run needs before the
first step, and its report names paths relative to the report's folder (never the machine's own)."""

import json
import os
import shutil
import sys

import pytest

from llava_voco.demo import runner



@pytest.mark.parametrize("missing", ["matplotlib", "sentencepiece", "accelerate"])
def test_a_missing_dependency_stops_the_run_before_the_first_step(tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # as if it were not installed

    def first_step(*args):
        raise AssertionError("the run started before its dependencies were checked")

    monkeypatch.setattr(runner, "ensure_data", first_step)
    with pytest.raises(SystemExit) as raised:
        runner.main(["--preset", "quick", "--data-dir", str(tmp_path / "data"), "--runs-dir", str(tmp_path / "runs")])
    message = str(raised.value.code)
    assert missing in message and "pip install 'llava-voco[demo,train]'" in message and "\n" not in message
    assert not (tmp_path / "data").exists() and not (tmp_path / "runs").exists()


def write_data(data, image):
    """A DigitGrid-shaped data folder with two image questions and one clip question."""
    (data / "images").mkdir(parents=True)
    image.save(data / "images" / "test_0.png")
    conversation = [{"from": "human", "value": "<image>\nWhat is the largest digit?"}, {"from": "gpt", "value": "7"}]
    (data / "train.json").write_text(json.dumps([{"id": "a", "image": "images/test_0.png", "conversations": conversation}]))
    questions = [{"question_id": i, "image": "images/test_0.png", "text": text, "answer": "7", "category": "largest"}
                 for i, text in enumerate(["What is the largest digit?", "What is the largest digit?"])]
    (data / "test_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    clip = {"question_id": 0, "video": "clips/test_0", "text": "What is the largest digit?", "answer": "7", "category": "largest"}
    (data / "test_video_questions.jsonl").write_text(json.dumps(clip) + "\n")


def stand_in_for_training(monkeypatch, workdir, wrong_first=lambda task, answers: False, commands=None):
    """Data, base models, training and evaluation stood in for: each evaluation answers with the references
    (the first question wrong where ``wrong_first(task, answers_file)``); ``commands``: filled with each
    training's command line by its output folder."""

    def run_tasks(tasks, jobs, fresh=False):
        finished = {}
        for task in tasks:
            if commands is not None:
                commands[str(task.log.parent)] = task.command
            finished[task.name] = {"steps": 1, "seconds": 0.1, "first_loss": 1.0, "last_loss": 0.5}
            for evaluation in task.evaluations:
                command = evaluation.command
                questions = command[command.index("--question-file") + 1]
                answers = command[command.index("--answers-file") + 1]
                wrong = wrong_first(task, answers)
                os.makedirs(os.path.dirname(answers), exist_ok=True)
                with open(questions) as source, open(answers, "w") as out:
                    for index, line in enumerate(source):
                        question = json.loads(line)
                        text = "no" if wrong and index == 0 else question["answer"]
                        out.write(json.dumps({"question_id": question["question_id"], "text": text}) + "\n")
                finished[evaluation.name] = {"seconds": 0.1}
        return finished

    monkeypatch.setattr(runner, "ensure_data", lambda preset, data_dir, fresh: {})
    monkeypatch.setattr(runner, "ensure_base", lambda preset, data_dir, base_dir, fresh, base_seed=None: {
        "sizes": {"seed": base_seed}, "stage0": {}, "data": str(data_dir.resolve())})
    monkeypatch.setattr(runner, "run_tasks", run_tasks)
    monkeypatch.chdir(workdir)


def test_report_paths_are_relative_to_the_report(tmp_path, monkeypatch, voco_dir, digit_images):
    """Training and evaluation are stood in for (each evaluation answers with the reference); the scoring, the
    table, the plot, the chat example (a real VoCo checkpoint) and the report are the runner's own."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    write_data(data, digit_images[0])
    shutil.copytree(voco_dir, runs / "voco1")

    stand_in_for_training(monkeypatch, tmp_path)
    report = runner.main(["--preset", "quick", "--data-dir", str(data), "--runs-dir", str(runs), "--only", "full,voco1"])
    assert report["rows"]["voco1"]["overall"] == 1.0 and report["chat"]["answer"] is not None

    written = (runs / "report.json").read_text()
    strings = []

    def collect(value):
        if isinstance(value, dict):
            for item in value.values():
                collect(item)
        elif isinstance(value, list):
            for item in value:
                collect(item)
        elif isinstance(value, str):
            strings.append(value)

    collect(json.loads(written))
    assert str(tmp_path) not in written and not any(os.path.isabs(s) for s in strings)
    saved = json.loads(written)
    assert saved["rows"]["voco1"]["per_seed"][0]["checkpoint"] == "voco1" and saved["chat"]["model"] == "voco1"
    assert os.path.normpath(runs / saved["base"]["data"]) == str(data)


def test_seeds_second_base_and_ablation_rows(tmp_path, monkeypatch, voco_dir, digit_images):
    """--seeds 0,1 --second-base 1 --ablation with stand-ins for training and evaluation (answers: the
    references, except that the seed-1 VoCo rows get the first question wrong): each headline row gives its
    per-seed scores with their mean and spread in the main table, the other rows one seed, full from the second
    base build its own rows; the ablation rows come out of the main table and into their own; every command
    carries its training seed and starts from its own group's full and base."""
    data, runs = tmp_path / "data", tmp_path / "runs"
    write_data(data, digit_images[0])
    shutil.copytree(voco_dir, runs / "voco1")
    commands = {}
    stand_in_for_training(monkeypatch, tmp_path, commands=commands,
                          wrong_first=lambda task, answers: "seed1" in answers and "full" not in task.name)
    report = runner.main(["--preset", "quick", "--data-dir", str(data), "--runs-dir", str(runs),
                          "--only", "full,voco1,voco1+kd,voco2", "--seeds", "0,1", "--second-base", "1", "--ablation"])

    rows = report["rows"]
    assert report["seeds"] == [0, 1] and report["fresh"] is True
    assert {name: row["seeds"] for name, row in rows.items() if name != "text prior"} == {
        "full": [0, 1], "voco1": [0, 1], "voco1+kd": [0, 1], "voco2": [0]}
    assert set(report["ablation_rows"]) == {m.name for m in runner.ABLATIONS}
    assert not set(report["ablation_rows"]) & set(rows)
    assert [run["overall"] for run in rows["full"]["per_seed"]] == [1.0, 1.0] and rows["full"]["std"]["overall"] == 0
    assert [run["overall"] for run in rows["voco1"]["per_seed"]] == [1.0, 0.5]
    assert rows["voco1"]["overall"] == pytest.approx(0.75)
    assert rows["voco1"]["std"]["overall"] == pytest.approx(0.5 ** 0.5 / 2)
    assert rows["voco1+kd"]["raw_retention_by_seed"]["per_seed"] == [1.0, 0.5]
    assert rows["voco2"]["std"]["overall"] is None and rows["voco2"]["overall"] == 1.0
    assert "75.0 +- 35.4" in report["table"] and "Ablation against voco1" in report["table"]
    second = report["second_base"]["rows"]["full"]
    assert second["seeds"] == [0, 1] and [run["checkpoint"] for run in second["per_seed"]] == [
        "base1/seed0/full", "base1/seed1/full"]
    assert "full, base 1" in report["table"]
    for output_dir, command in commands.items():
        assert command[command.index("--seed") + 1] == ("1" if "seed1" in output_dir else "0"), output_dir
    seed1_voco = commands[str(runs / "seed1" / "voco1")]
    assert seed1_voco[seed1_voco.index("--model_name_or_path") + 1] == str(runs / "seed1" / "full")
    second_full = commands[str(runs / "base1" / "seed1" / "full")]
    assert second_full[second_full.index("--model_name_or_path") + 1] == str(runs / "base1" / "base" / "llm")
