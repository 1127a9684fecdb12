"""LLaVA's eval scripts run ``model_vqa`` unchanged: shards (``--num-chunks`` / ``--chunk-idx``) merged with
``cat`` are one run's answers, ``--top_p`` / ``--num_beams`` reach decoding, and ``--load-4bit`` /
``--load-8bit`` go through bitsandbytes or say in one line that it is missing."""

import importlib.util
import json
import math

import pytest

from llava_voco.eval import model_vqa
from llava_voco.serve import cli

from conftest import load_voco
from test_serve_errors import one_line_failure

QUESTIONS = ["What is the sum?", "Which digit is at the top left?", "What is the largest digit?", "How many digits?",
             "Describe the picture."]


@pytest.fixture
def question_file(tmp_path, image_folder):
    path = tmp_path / "questions.jsonl"
    path.write_text("".join(json.dumps({"question_id": f"q{i}", "image": f"digit{i % 2}.png", "text": text}) + "\n"
                            for i, text in enumerate(QUESTIONS)))
    return path


def answer(voco_dir, question_file, image_folder, answers, *extra):
    model_vqa.main(["--model-path", str(voco_dir), "--question-file", str(question_file), "--image-folder",
                    str(image_folder), "--answers-file", str(answers), "--max-new-tokens", "4", *map(str, extra)])
    return [json.loads(line) for line in answers.read_text().splitlines()]


def test_shards_merged_with_cat_are_one_run(voco_dir, question_file, image_folder, tmp_path):
    whole = answer(voco_dir, question_file, image_folder, tmp_path / "whole.jsonl", "--temperature", "0")
    chunks = 3
    shards = [answer(voco_dir, question_file, image_folder, tmp_path / f"{chunks}_{index}.jsonl",
                     "--num-chunks", chunks, "--chunk-idx", index, "--temperature", "0") for index in range(chunks)]
    # LLaVA's get_chunk: chunks of ceil(5 / 3) = 2 questions in file order
    size = math.ceil(len(QUESTIONS) / chunks)
    assert [sorted(r["question_id"] for r in shard) for shard in shards] == [
        [f"q{i}" for i in range(start, min(start + size, len(QUESTIONS)))] for start in range(0, len(QUESTIONS), size)]
    merged = "".join((tmp_path / f"{chunks}_{index}.jsonl").read_text() for index in range(chunks))  # LLaVA: cat
    merged = [json.loads(line) for line in merged.splitlines()]
    assert len(merged) == len(whole)
    fields = lambda records: {r["question_id"]: (r["prompt"], r["text"], r["model_id"]) for r in records}
    assert fields(merged) == fields(whole)
    one_line_failure_args = ["--num-chunks", "2", "--chunk-idx", "2"]
    with pytest.raises(SystemExit):
        answer(voco_dir, question_file, image_folder, tmp_path / "bad.jsonl", *one_line_failure_args)


def test_top_p_and_num_beams_reach_decoding(voco_dir, question_file, image_folder, tmp_path):
    """Beam search from the compressed cache gives what beam search over the whole prompt gives; sampling with
    ``--top_p`` runs."""
    beams = answer(voco_dir, question_file, image_folder, tmp_path / "beams.jsonl", "--num_beams", "3")
    model, processor = load_voco(voco_dir)
    from PIL import Image

    for record in beams[:2]:
        image = Image.open(image_folder / f"digit{int(record['question_id'][1:]) % 2}.png").convert("RGB")
        full = processor(images=image, text=record["prompt"], return_tensors="pt")
        expected = model.generate(**full, max_new_tokens=4, do_sample=False, num_beams=3)[0, full["input_ids"].shape[1]:]
        assert record["text"] == processor.tokenizer.decode(expected, skip_special_tokens=True).strip()
    sampled = answer(voco_dir, question_file, image_folder, tmp_path / "sampled.jsonl", "--temperature", "0.7",
                     "--top_p", "0.9")
    assert len(sampled) == len(QUESTIONS)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
@pytest.mark.parametrize("flag", ["--load-4bit", "--load-8bit"])
def test_quantized_loading_without_bitsandbytes_is_one_line(voco_dir, question_file, image_folder, tmp_path, capsys,
                                                            digit_images, flag):
    image = tmp_path / "digit.png"
    digit_images[0].save(image)
    one_line_failure(capsys, cli.main, ["--model-path", str(voco_dir), "--image-file", str(image), flag],
                     flag, "needs bitsandbytes")
    one_line_failure(capsys, model_vqa.main, ["--model-path", str(voco_dir), "--question-file", str(question_file),
                                              "--image-folder", str(image_folder), "--answers-file",
                                              str(tmp_path / "a.jsonl"), flag], flag, "needs bitsandbytes")
