"""DigitGrid: LLaVA-format data made from scikit-learn's bundled handwritten digits (docs/design.md §5).

    python -m llava_voco.demo.digitgrid build --out playground/data/digitgrid [--train-images 4000]
        [--test-images 400] [--train-clips 1000] [--test-clips 100] [--frames 4] [--seed 0]

Writes, under ``--out``:
    split.json                 which of the 1,797 digit images are train and which are test (disjoint,
                               stratified by digit, seeded), and the settings used
    images/{train,test}_NNNNN.png   2 x 2 grids of digits, each 8 x 8 digit upscaled to a 16 x 16 cell (32 px)
    clips/{train,test}_NNNNN/FFF.png  clips: one digit per 32 x 32 frame
    train.json, test.json      LLaVA-format samples, multi-turn: the digit at a position, the sum, how many
                               times a digit appears, the largest digit (images); the digit in frame i and
                               the sum (clips, ``"video"`` samples with a ``<video>`` placeholder)
    test_questions.jsonl       LLaVA eval questions for the test split (``question_id``, ``image``, ``text``,
                               plus ``answer`` and ``category`` for scoring); test_video_questions.jsonl too
    labels.json                for every image and clip, the digits and source digit indices it was made of
Answers are short exact strings, so accuracy is exact match.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

POSITIONS = ("top left", "top right", "bottom left", "bottom right")
CELL = 16  # pixels per digit (8 x 8 upscaled 2x)
GRID_SIZE = 2 * CELL


def load_digits_split(seed: int = 0, test_fraction: float = 0.25):
    """The 1,797 digits (``[n, 8, 8]`` values 0..16, labels) and a stratified train/test split of indices."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in range(10):
        indices = np.flatnonzero(digits.target == label)
        rng.shuffle(indices)
        cut = int(round(len(indices) * test_fraction))
        test.extend(indices[:cut].tolist())
        train.extend(indices[cut:].tolist())
    return digits.images, digits.target, sorted(train), sorted(test)


def digit_cell(pixels: np.ndarray) -> np.ndarray:
    """An 8 x 8 digit (0..16) as a 16 x 16 uint8 gray cell."""
    return np.kron(pixels / 16.0 * 255.0, np.ones((2, 2))).round().astype(np.uint8)


def grid_image(cells: list[np.ndarray]) -> Image.Image:
    """Four cells in reading order: top left, top right, bottom left, bottom right."""
    top, bottom = np.hstack(cells[:2]), np.hstack(cells[2:])
    gray = np.vstack([top, bottom])
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


def frame_image(cell: np.ndarray) -> Image.Image:
    gray = np.kron(cell, np.ones((2, 2), dtype=np.uint8))
    return Image.fromarray(np.stack([gray] * 3, axis=-1))


def image_questions(digits: list[int], rng: np.random.Generator, turns: int) -> list[tuple[str, str, str]]:
    """(category, question, answer) about a 2 x 2 grid with ``digits`` in reading order."""
    pool = []
    for position, digit in zip(POSITIONS, digits):
        pool.append(("position", f"Which digit is at the {position}?", str(digit)))
    pool.append(("sum", "What is the sum of the digits?", str(sum(digits))))
    asked = int(rng.choice(digits)) if rng.random() < 0.5 else int(rng.integers(10))
    pool.append(("count", f"How many times does the digit {asked} appear?", str(digits.count(asked))))
    pool.append(("largest", "What is the largest digit?", str(max(digits))))
    order = rng.permutation(len(pool))[:turns]
    return [pool[i] for i in order]


def clip_questions(digits: list[int], rng: np.random.Generator, turns: int) -> list[tuple[str, str, str]]:
    pool = [("frame", f"Which digit is in frame {i + 1}?", str(d)) for i, d in enumerate(digits)]
    pool.append(("sum", "What is the sum of the digits in the clip?", str(sum(digits))))
    order = rng.permutation(len(pool))[:turns]
    return [pool[i] for i in order]


def conversation(placeholder: str, questions: list[tuple[str, str, str]]) -> list[dict]:
    turns = []
    for index, (_, question, answer) in enumerate(questions):
        turns.append({"from": "human", "value": (placeholder + "\n" if index == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def build(out: str | os.PathLike, train_images: int = 4000, test_images: int = 400, train_clips: int = 1000,
          test_clips: int = 100, frames: int = 4, turns: int = 3, seed: int = 0) -> dict:
    """Write the data set under ``out``; returns its summary (also in ``split.json``)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    pixels, targets, train_pool, test_pool = load_digits_split(seed)
    rng = np.random.default_rng(seed + 1)
    labels: dict[str, dict] = {}
    summary = {"seed": seed, "train_digit_indices": train_pool, "test_digit_indices": test_pool,
               "cell_pixels": CELL, "image_pixels": GRID_SIZE, "frames_per_clip": frames}
    for split, pool, n_images, n_clips in (("train", train_pool, train_images, train_clips),
                                           ("test", test_pool, test_images, test_clips)):
        samples, eval_questions, eval_video_questions = [], [], []
        for index in range(n_images):
            sources = [int(i) for i in rng.choice(pool, size=4)]
            digits = [int(targets[i]) for i in sources]
            name = f"images/{split}_{index:05d}.png"
            grid_image([digit_cell(pixels[i]) for i in sources]).save(out / name)
            labels[name] = {"digits": digits, "sources": sources}
            questions = image_questions(digits, rng, turns)
            samples.append({"id": f"{split}_image_{index:05d}", "image": name,
                            "conversations": conversation("<image>", questions)})
            for q_index, (category, question, answer) in enumerate(questions):
                eval_questions.append({"question_id": f"{split}_image_{index:05d}_{q_index}", "image": name,
                                       "text": question, "answer": answer, "category": category})
        for index in range(n_clips):
            sources = [int(i) for i in rng.choice(pool, size=frames)]
            digits = [int(targets[i]) for i in sources]
            folder = f"clips/{split}_{index:05d}"
            (out / folder).mkdir(exist_ok=True)
            for frame, source in enumerate(sources):
                frame_image(digit_cell(pixels[source])).save(out / folder / f"{frame:03d}.png")
            labels[folder] = {"digits": digits, "sources": sources}
            questions = clip_questions(digits, rng, turns)
            samples.append({"id": f"{split}_clip_{index:05d}", "video": folder,
                            "conversations": conversation("<video>", questions)})
            for q_index, (category, question, answer) in enumerate(questions):
                eval_video_questions.append({"question_id": f"{split}_clip_{index:05d}_{q_index}", "video": folder,
                                             "text": question, "answer": answer, "category": category})
        (out / f"{split}.json").write_text(json.dumps(samples, indent=1))
        if split == "test":
            (out / "test_questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in eval_questions))
            (out / "test_video_questions.jsonl").write_text(
                "".join(json.dumps(q) + "\n" for q in eval_video_questions))
        summary[f"{split}_samples"] = len(samples)
    (out / "labels.json").write_text(json.dumps(labels))
    (out / "split.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="DigitGrid: LLaVA-format data from scikit-learn's digits")
    commands = parser.add_subparsers(dest="command", required=True)
    builder = commands.add_parser("build", help="write images, clips, train/test JSON and eval questions")
    builder.add_argument("--out", default="playground/data/digitgrid")
    builder.add_argument("--train-images", type=int, default=4000)
    builder.add_argument("--test-images", type=int, default=400)
    builder.add_argument("--train-clips", type=int, default=1000)
    builder.add_argument("--test-clips", type=int, default=100)
    builder.add_argument("--frames", type=int, default=4)
    builder.add_argument("--turns", type=int, default=3)
    builder.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = build(args.out, args.train_images, args.test_images, args.train_clips, args.test_clips, args.frames,
                    args.turns, args.seed)
    print(f"wrote {args.out}: {summary['train_samples']} train and {summary['test_samples']} test samples "
          f"from {len(summary['train_digit_indices'])} / {len(summary['test_digit_indices'])} digit images")


if __name__ == "__main__":
    main()
