"""The DigitGrid builder: disjoint splits, answers that follow from the labels, images that show them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

from llava_voco.demo.digitgrid import CELL, POSITIONS, build, digit_cell
from llava_voco.image_io import load_image
from llava_voco.train.data import load_samples


def test_build(tmp_path):
    summary = build(tmp_path, train_images=40, test_images=12, train_clips=10, test_clips=4, frames=3, seed=3)
    train, test = set(summary["train_digit_indices"]), set(summary["test_digit_indices"])
    assert not train & test and len(train | test) == 1797
    digits = load_digits()
    for label in range(10):  # stratified: a quarter of each digit's images is test
        of_label = np.flatnonzero(digits.target == label)
        assert abs(np.isin(of_label, list(test)).mean() - 0.25) < 0.01
    labels = json.loads((tmp_path / "labels.json").read_text())

    for split, pool in (("train", train), ("test", test)):
        samples = json.loads((tmp_path / f"{split}.json").read_text())
        assert len(samples) == summary[f"{split}_samples"]
        for sample in samples:
            media = sample.get("image") or sample.get("video")
            label = labels[media]
            assert set(label["sources"]) <= pool  # test items use test digits only
            assert [int(digits.target[i]) for i in label["sources"]] == label["digits"]
            turns = sample["conversations"]
            assert turns[0]["value"].startswith("<image>\n" if "image" in sample else "<video>\n")
            for question, answer in zip(turns[0::2], turns[1::2]):
                text, value, values = question["value"].split("\n")[-1], answer["value"], label["digits"]
                if text.startswith("Which digit is at the "):
                    expected = values[POSITIONS.index(text[len("Which digit is at the "):-1])]
                elif text.startswith("Which digit is in frame "):
                    expected = values[int(text[len("Which digit is in frame "):-1]) - 1]
                elif text.startswith("What is the sum"):
                    expected = sum(values)
                elif text.startswith("How many times does the digit "):
                    expected = values.count(int(text.split()[-2]))
                else:
                    assert text == "What is the largest digit?"
                    expected = max(values)
                assert value == str(expected), (sample["id"], text)
            if "image" in sample:  # the cell at each position is that source digit, upscaled
                pixels = np.asarray(load_image(tmp_path / media))[:, :, 0]
                for cell, source in enumerate(label["sources"]):
                    row, col = divmod(cell, 2)
                    crop = pixels[row * CELL:(row + 1) * CELL, col * CELL:(col + 1) * CELL]
                    assert np.array_equal(crop, digit_cell(digits.images[source]))
            else:
                frames = sorted((tmp_path / media).iterdir())
                assert len(frames) == 3

    questions = [json.loads(line) for line in (tmp_path / "test_questions.jsonl").read_text().splitlines()]
    assert len(questions) == 12 * 3 and {"question_id", "image", "text", "answer", "category"} <= set(questions[0])
    # the data loads with the training pipeline's reader
    assert len(load_samples(str(tmp_path / "train.json"))) == 50


def test_build_command_is_deterministic(tmp_path):
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-m", "llava_voco.demo.digitgrid", "build", "--out", str(tmp_path / name),
                        "--train-images", "5", "--test-images", "2", "--train-clips", "2", "--test-clips", "1"],
                       check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert (tmp_path / "a" / "train.json").read_text() == (tmp_path / "b" / "train.json").read_text()
    assert (tmp_path / "a" / "images" / "test_00001.png").read_bytes() == (tmp_path / "b" / "images" / "test_00001.png").read_bytes()


def test_base_models_are_the_same_when_built_again_from_the_same_data(tmp_path):
    """What a rerun of the demo starts from: the same data and sizes give the same tower and LLM weights and
    the same tokenizer, so a difference between two runs' ``full`` comes from their data or flags, not from
    the base build (2026-12-03: two runs differed because their data's train clips did)."""
    import torch
    import sentencepiece as spm
    from safetensors.torch import load_file

    from llava_voco.demo.models import BaseSizes, build_base

    build(tmp_path / "data", train_images=64, test_images=8, train_clips=8, test_clips=4, frames=4)
    sizes = BaseSizes(vision_pretrain_steps=12, vision_pretrain_images=64, vision_pretrain_batch=16)
    summaries = [build_base(tmp_path / "data", tmp_path / name, sizes) for name in ("a", "b")]
    assert summaries[0]["stage0"] == summaries[1]["stage0"]
    weights = {part: [load_file(tmp_path / name / part / "model.safetensors") for name in ("a", "b")]
               for part in ("vision_tower", "llm")}
    for part, (first, second) in weights.items():
        assert first.keys() == second.keys()
        assert all(torch.equal(first[key], second[key]) for key in first), part
    pieces = [[p.id_to_piece(i) for i in range(p.get_piece_size())]
              for p in (spm.SentencePieceProcessor(model_file=str(tmp_path / name / "llm" / "tokenizer.model"))
                        for name in ("a", "b"))]
    assert pieces[0] == pieces[1]
    # More train grids, the first 64 the same: the train clips, drawn after them, differ, and so does the tower
    # stage 0 trains on them (the default preset's 40,000 grids against the earlier 4,000)
    build(tmp_path / "other", train_images=96, test_images=8, train_clips=8, test_clips=4, frames=4)
    assert load_image(tmp_path / "other" / "images" / "train_00063.png").tobytes() == \
        load_image(tmp_path / "data" / "images" / "train_00063.png").tobytes()
    build_base(tmp_path / "other", tmp_path / "c", sizes)
    other, tower = load_file(tmp_path / "c" / "vision_tower" / "model.safetensors"), weights["vision_tower"][0]
    assert not all(torch.equal(other[key], tower[key]) for key in tower)
