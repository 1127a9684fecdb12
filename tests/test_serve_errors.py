"""A user's mistake (a missing, corrupt or text-file image, an image over PIL's decompression limit, a bad
question or answers line, a missing model) stops the chat CLI, the eval entry and the scripts with ONE line
on stderr naming the file and the problem, and a non-zero exit: no traceback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from llava_voco.eval import model_vqa
from llava_voco.serve import cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def one_line_failure(capsys, main, argv, *expected):
    """Runs ``main(argv)`` in this process; it must exit non-zero with one stderr line holding ``expected``."""
    with pytest.raises(SystemExit) as raised:
        main(argv)
    assert raised.value.code not in (0, None)
    err = capsys.readouterr().err
    # progress bars (loading weights, answering) are the entry's ordinary output, not part of the error
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith(("Loading weights", "answering"))]
    assert len(lines) == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in lines[0], lines[0]
    return lines[0]


def run_file(script, *args):
    return subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True, env=ENV,
                          timeout=300)


@pytest.fixture
def bad_images(tmp_path, digit_images):
    folder = tmp_path / "bad"
    folder.mkdir()
    digit_images[0].save(folder / "good.png")
    (folder / "corrupt.png").write_bytes((folder / "good.png").read_bytes()[:40])
    (folder / "notes.png").write_text("a text file, not an image\n")
    (folder / "empty.png").write_bytes(b"")
    return folder


@pytest.mark.parametrize("name, problem", [
    ("missing.png", "no such image file"),
    ("corrupt.png", "not an image file PIL can read (corrupt"),
    ("notes.png", "not an image file"),
    ("empty.png", "empty file (0 bytes)"),
])
def test_cli_bad_image(voco_dir, bad_images, capsys, name, problem):
    path = bad_images / name
    one_line_failure(capsys, cli.main, ["--model-path", str(voco_dir), "--image-file", str(path)], str(path), problem)


def test_cli_image_over_the_decompression_limit(voco_dir, bad_images, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64)  # a 16 x 16 image is then over twice the limit
    path = bad_images / "good.png"
    one_line_failure(capsys, cli.main, ["--model-path", str(voco_dir), "--image-file", str(path)], str(path), "too large")


def test_cli_missing_model_and_unknown_template(voco_dir, bad_images, tmp_path, capsys):
    image = str(bad_images / "good.png")
    missing = tmp_path / "no_model"
    one_line_failure(capsys, cli.main, ["--model-path", str(missing), "--image-file", image], str(missing))
    empty = tmp_path / "empty_model"
    empty.mkdir()
    one_line_failure(capsys, cli.main, ["--model-path", str(empty), "--image-file", image], str(empty), "config.json")
    one_line_failure(capsys, cli.main, ["--model-path", str(voco_dir), "--image-file", image, "--conv-mode", "v9"],
                     "v9")


def test_cli_as_a_process_prints_no_traceback(voco_dir, tmp_path):
    missing = tmp_path / "missing.png"
    result = subprocess.run([sys.executable, "-m", "llava_voco.serve.cli", "--model-path", str(voco_dir),
                             "--image-file", str(missing)], capture_output=True, text=True, env=ENV, timeout=300,
                            input="What is the sum?\n")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if str(missing) in line] == result.stderr.strip().splitlines()[-1:]


def eval_args(voco_dir, tmp_path, questions, images):
    question_file = tmp_path / "questions.jsonl"
    question_file.write_text(questions)
    return ["--model-path", str(voco_dir), "--question-file", str(question_file), "--image-folder", str(images),
            "--answers-file", str(tmp_path / "answers.jsonl"), "--max-new-tokens", "2"], question_file


def test_eval_bad_question_line_missing_files_and_bad_image(voco_dir, bad_images, tmp_path, capsys):
    good = json.dumps({"question_id": 0, "image": "good.png", "text": "What is the sum?"}) + "\n"
    argv, questions = eval_args(voco_dir, tmp_path, good + "{broken\n", bad_images)
    one_line_failure(capsys, model_vqa.main, argv, f"{questions}:2", "not a JSON line")
    argv, questions = eval_args(voco_dir, tmp_path, good + json.dumps({"image": "good.png"}) + "\n", bad_images)
    one_line_failure(capsys, model_vqa.main, argv, f"{questions}:2", "question_id")
    argv, questions = eval_args(voco_dir, tmp_path, good, bad_images)
    argv[argv.index("--question-file") + 1] = str(tmp_path / "nowhere.jsonl")
    one_line_failure(capsys, model_vqa.main, argv, str(tmp_path / "nowhere.jsonl"))
    for name in ("missing.png", "notes.png"):
        argv, _ = eval_args(voco_dir, tmp_path, json.dumps({"question_id": 1, "image": name, "text": "Sum?"}) + "\n",
                            bad_images)
        one_line_failure(capsys, model_vqa.main, argv, str(bad_images / name))


def test_eval_names_the_question_of_a_bad_image(voco_dir, bad_images, tmp_path, capsys):
    """A file that exists but does not open stops the run naming the file, the problem and the question."""
    for name, problem in (("corrupt.png", "not an image file PIL can read"), ("empty.png", "empty file")):
        good = json.dumps({"question_id": "q1", "image": "good.png", "text": "Sum?"}) + "\n"
        bad = json.dumps({"question_id": "q7", "image": name, "text": "Sum?"}) + "\n"
        argv, questions = eval_args(voco_dir, tmp_path, good + bad, bad_images)
        (tmp_path / "answers.jsonl").unlink(missing_ok=True)
        one_line_failure(capsys, model_vqa.main, argv, str(bad_images / name), problem, f"question 'q7' of {questions}")
        # the good image's question, batched with nothing yet, is answered and kept: a rerun resumes after it
        answered = [json.loads(line)["question_id"] for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
        assert answered == ["q1"]


def test_eval_refuses_an_empty_question_file(voco_dir, bad_images, tmp_path, capsys):
    for content in ("", "\n\n"):
        argv, questions = eval_args(voco_dir, tmp_path, content, bad_images)
        one_line_failure(capsys, model_vqa.main, argv, str(questions), "no questions")
    assert not (tmp_path / "answers.jsonl").exists()


def test_a_mistyped_model_folder_is_named_as_a_folder(voco_dir, bad_images, tmp_path, capsys, monkeypatch):
    """``checkpoints/voco-7c`` beside ``checkpoints/voco-7b`` reads like a Hub id (``org/name``); it is a missing
    folder, and saying so beats "could not connect to the Hub"."""
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    image = str(bad_images / "good.png")
    one_line_failure(capsys, cli.main, ["--model-path", "checkpoints/voco-7c", "--image-file", image],
                     "checkpoints/voco-7c: no such model folder")
    argv, _ = eval_args(voco_dir, tmp_path, json.dumps({"question_id": 0, "image": "good.png", "text": "Sum?"}) + "\n",
                        bad_images)
    argv[argv.index("--model-path") + 1] = "checkpoints/voco-7c"
    one_line_failure(capsys, model_vqa.main, argv, "checkpoints/voco-7c: no such model folder")


def test_eval_damaged_answers_file(voco_dir, bad_images, tmp_path, capsys):
    argv, _ = eval_args(voco_dir, tmp_path, json.dumps({"question_id": 0, "image": "good.png", "text": "Sum?"}) + "\n",
                        bad_images)
    answers = tmp_path / "answers.jsonl"
    answers.write_text('{"question_id": 7, "text": "1"}\nnot json\n{"question_id": 8, "text": "2"}\n')
    one_line_failure(capsys, model_vqa.main, argv, f"{answers}:2")


def test_scripts_missing_model_and_missing_video_folder(tmp_path, voco_dir):
    for script, extra in (("add_voco_to_llava.py", ["--output-dir", tmp_path / "out"]),
                          ("extract_video_features.py", ["--video-folder", tmp_path, "--output-folder", tmp_path / "f"])):
        result = run_file(REPO / "scripts" / script, "--model-path", tmp_path / "no_model", *extra)
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and str(tmp_path / "no_model") in result.stderr
    result = run_file(REPO / "scripts" / "extract_video_features.py", "--model-path", voco_dir,
                      "--video-folder", tmp_path / "no_videos", "--output-folder", tmp_path / "f")
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith(("Loading weights", "["))]
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and str(tmp_path / "no_videos") in lines[0]


def test_a_bug_keeps_its_traceback(voco_dir, bad_images, capsys, monkeypatch):
    """Only the user's mistakes are one line: anything else is a bug and shows where it happened."""
    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "load_model", broken)
    with pytest.raises(KeyError):
        cli.main(["--model-path", str(voco_dir), "--image-file", str(bad_images / "good.png")])


def test_flash_attention_without_flash_attn_is_refused_before_loading(voco_dir, bad_images, tmp_path, capsys):
    """Chat and eval take --attn-implementation; flash_attention_2 where flash-attn is missing is one line
    naming the gpu extra, before any weight is read (the weights file here is garbage)."""
    import shutil

    from llava_voco.eval import model_vqa

    broken = tmp_path / "broken"
    shutil.copytree(voco_dir, broken)
    (broken / "model.safetensors").write_bytes(b"not weights")
    image = str(bad_images / "good.png")
    one_line_failure(capsys, cli.main, ["--model-path", str(broken), "--image-file", image,
                                        "--attn-implementation", "flash_attention_2"], "llava-voco[gpu]")
    questions = tmp_path / "q.jsonl"
    questions.write_text('{"question_id": 1, "text": "Which digit?"}\n')
    one_line_failure(capsys, model_vqa.main, ["--model-path", str(broken), "--question-file", str(questions),
                                              "--image-folder", str(tmp_path), "--answers-file", str(tmp_path / "a.jsonl"),
                                              "--attn-implementation", "flash_attention_2"], "llava-voco[gpu]")
