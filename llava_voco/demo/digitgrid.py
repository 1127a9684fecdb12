"""DigitGrid: LLaVA-format data made from scikit-learn's bundled handwritten digits (docs/design.md §5).

    python -m llava_voco.demo.digitgrid build --out playground/data/digitgrid [--train-images 4000]
        [--test-images 400] [--train-clips 1000] [--test-clips 100] [--frames 4] [--seed 0] [--turns 1]

Writes, under ``--out``:
    split.json                 which of the 1,797 digit images are train and which are test (disjoint,
                               stratified by digit, seeded), and the settings used
    images/{train,test}_NNNNN.png   2 x 2 grids of digits, each 8 x 8 digit upscaled to a 16 x 16 cell (32 px)
    clips/{train,test}_NNNNN/FFF.png  clips: one digit per 32 x 32 frame
    train.json, test.json      LLaVA-format samples: each image (clip) drawn for one question of its kind
                               (``IMAGE_KINDS``: is there a d, how many d, the largest digit, where is d, which
                               digit is at a corner; ``CLIP_KINDS``: is there a d, the digit in frame i, in
                               how many frames is d), answers balanced; train samples ask ``--turns`` kinds about it
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


IMAGE_KINDS = ("presence", "count", "largest", "where", "position")
CLIP_KINDS = ("presence", "frame", "count")
COUNTS = ("none", "once", "twice")  # how many times the asked digit is shown (count answers)
CAPTION_QUESTIONS = {False: "What digits are shown?", True: "What digits are in the clip?"}


def caption(digits: list[int], clip: bool = False) -> tuple[str, str]:
    """The train-only last turn: every digit in reading (frame) order, "3 5 0 9". Four answers per image
    that each name one place, as LLaVA's caption stage does for real images: with it the demo's LLM read
    positions after 500 steps (94%, against 26-38% without; docs/experiments/digitgrid-2026-12-06.md)."""
    return CAPTION_QUESTIONS[clip], " ".join(str(d) for d in digits)


def ask(kind: str, digits: list[int], subject: int | None = None, clip: bool = False) -> tuple[str, str]:
    """(question, answer) of ``kind`` about ``digits`` (reading or frame order), the one place each kind's
    wording lives. ``subject``: the asked digit (presence, count, where), the cell (position) or
    the frame index (frame). Answers name their subject first, then the value (design §5)."""
    if kind == "presence":
        return f"Is there a {subject}{' in the clip' if clip else ''}?", f"{subject} " + ("yes" if subject in digits else "no")
    if kind == "count":
        question = f"How many frames show a {subject}?" if clip else f"How many {subject}s are there?"
        return question, f"{subject} {COUNTS[digits.count(subject)]}"
    if kind == "largest":
        return "What is the largest digit?", str(max(digits))
    if kind == "where":
        return f"Where is the {subject}?", f"{subject} {POSITIONS[digits.index(subject)]}"
    if kind == "position":
        return f"Which digit is at the {POSITIONS[subject]}?", f"{POSITIONS[subject]} {digits[subject]}"
    if kind == "frame":
        return f"Which digit is in frame {subject + 1}?", f"frame {subject + 1} {digits[subject]}"
    raise ValueError(f"unknown question kind {kind!r}")


def counted_digits(places: int, rng: np.random.Generator) -> tuple[list[int], int]:
    """(digits, the asked digit) for a count question: 0, 1 or 2 of the ``places`` hold it, a third each."""
    subject, times = int(rng.integers(10)), int(rng.integers(3))
    others = [d for d in range(10) if d != subject]
    digits = [int(rng.choice(others)) for _ in range(places)]
    for place in rng.choice(places, size=times, replace=False):
        digits[int(place)] = subject
    return digits, subject


def grid_question(kind: str, rng: np.random.Generator) -> tuple[list[int], str, str]:
    """(the four digits in reading order, question, answer) of one ``kind`` about a 2 x 2 grid. The grid is
    drawn for its question so that the answers are balanced: what answering without the image gets (the
    text prior) stays low and differs by kind, and every answer needs the grid."""
    if kind not in IMAGE_KINDS:
        raise ValueError(f"unknown image question kind {kind!r}; choose from {IMAGE_KINDS}")
    digits, subject = [int(d) for d in rng.integers(10, size=4)], None
    if kind == "presence":  # yes half the time: the digit in one or more cells, else in none
        subject = int(rng.integers(10))
        others = [d for d in range(10) if d != subject]
        digits = [int(rng.choice(others)) for _ in range(4)]
        if rng.random() < 0.5:
            digits[int(rng.integers(4))] = subject
    elif kind == "count":
        digits, subject = counted_digits(4, rng)
    elif kind == "where":  # a digit that is in exactly one cell
        digits = [int(d) for d in rng.choice(10, size=4, replace=False)]
        subject = digits[int(rng.integers(4))]
    elif kind == "position":
        subject = int(rng.integers(4))
    return (digits, *ask(kind, digits, subject))


def clip_question(kind: str, frames: int, rng: np.random.Generator) -> tuple[list[int], str, str]:
    """(the digit of each frame, question, answer) of one ``kind`` about a clip, balanced as ``grid_question``."""
    if kind not in CLIP_KINDS:
        raise ValueError(f"unknown clip question kind {kind!r}; choose from {CLIP_KINDS}")
    digits = [int(d) for d in rng.integers(10, size=frames)]
    if kind == "presence":
        subject = int(rng.integers(10))
        digits = [int(rng.choice([d for d in range(10) if d != subject])) for _ in range(frames)]
        if rng.random() < 0.5:
            digits[int(rng.integers(frames))] = subject
    elif kind == "frame":
        subject = int(rng.integers(frames))
    else:
        digits, subject = counted_digits(frames, rng)
    return (digits, *ask(kind, digits, subject, clip=True))


def question_about(kind: str, digits: list[int], rng: np.random.Generator, clip: bool = False) -> tuple[str, str] | None:
    """(question, answer) of ``kind`` about a grid (or clip) already drawn, with the asked digit chosen to keep
    the answers near balanced (yes half the time, counts 0-2); None where the kind cannot be asked (no digit
    shown exactly once, for 'where')."""
    subject = None
    if kind == "presence":
        absent = [d for d in range(10) if d not in digits]
        subject = int(rng.choice(digits)) if rng.random() < 0.5 or not absent else int(rng.choice(absent))
    elif kind == "count":
        by_count = {c: [d for d in range(10) if digits.count(d) == c] for c in range(3)}
        times = int(rng.choice([c for c in range(3) if by_count[c]]))
        subject = int(rng.choice(by_count[times]))
    elif kind == "where":
        once = [d for d in digits if digits.count(d) == 1]
        if not once:
            return None
        subject = int(rng.choice(once))
    elif kind == "position":
        subject = int(rng.integers(4))
    elif kind == "frame":
        subject = int(rng.integers(len(digits)))
    return ask(kind, digits, subject, clip)


def conversation(placeholder: str, questions: list[tuple[str, str]]) -> list[dict]:
    turns = []
    for index, (question, answer) in enumerate(questions):
        turns.append({"from": "human", "value": (f"{placeholder}\n" if index == 0 else "") + question})
        turns.append({"from": "gpt", "value": answer})
    return turns


def training_questions(kinds: tuple[str, ...], primary: str, digits: list[int], first: tuple[str, str],
                       turns: int, rng: np.random.Generator, clip: bool = False,
                       with_caption: bool = False) -> list[tuple[str, str]]:
    """The question the grid was drawn for, then ``turns - 1`` of the other kinds about the same grid (in a
    random order): more answers per training step for little more text; ``with_caption``: then the caption.
    The caption comes last so that the first question after the image is a test question's kind, as in
    evaluation (placed first, the model answered every test question with a list of digits)."""
    questions = [first]
    for kind in rng.permutation([k for k in kinds if k != primary])[:turns - 1]:
        asked = question_about(str(kind), digits, rng, clip)
        if asked is not None:
            questions.append(asked)
    if with_caption:
        questions.append(caption(digits, clip))
    return questions


def build(out: str | os.PathLike, train_images: int = 4000, test_images: int = 400, train_clips: int = 1000,
          test_clips: int = 100, frames: int = 4, seed: int = 0, turns: int = 1, caption: bool = False) -> dict:
    """Write the data set under ``out``; returns its summary (also in ``split.json``). Each image (or clip) is
    drawn for one question, the kinds taking turns so that each is an equal share; that question is the test
    question, and in training the first of ``turns`` questions about it."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    pixels, targets, train_pool, test_pool = load_digits_split(seed)
    rng = np.random.default_rng(seed + 1)
    labels: dict[str, dict] = {}
    summary = {"seed": seed, "train_digit_indices": train_pool, "test_digit_indices": test_pool,
               "cell_pixels": CELL, "image_pixels": GRID_SIZE, "frames_per_clip": frames,
               "image_kinds": list(IMAGE_KINDS), "clip_kinds": list(CLIP_KINDS), "train_turns": turns,
               "train_caption": caption}
    for split, pool, n_images, n_clips in (("train", train_pool, train_images, train_clips),
                                           ("test", test_pool, test_images, test_clips)):
        by_label = [[i for i in pool if targets[i] == label] for label in range(10)]
        samples, eval_questions, eval_video_questions = [], [], []
        for index in range(n_images):
            kind = IMAGE_KINDS[index % len(IMAGE_KINDS)]
            digits, question, answer = grid_question(kind, rng)
            sources = [int(rng.choice(by_label[d])) for d in digits]
            name = f"images/{split}_{index:05d}.png"
            grid_image([digit_cell(pixels[i]) for i in sources]).save(out / name)
            labels[name] = {"digits": digits, "sources": sources}
            asked = training_questions(IMAGE_KINDS, kind, digits, (question, answer), turns, rng,
                                       with_caption=caption) \
                if split == "train" else [(question, answer)]
            samples.append({"id": f"{split}_image_{index:05d}", "image": name,
                            "conversations": conversation("<image>", asked)})
            eval_questions.append({"question_id": f"{split}_image_{index:05d}", "image": name, "text": question,
                                   "answer": answer, "category": kind})
        for index in range(n_clips):
            kind = CLIP_KINDS[index % len(CLIP_KINDS)]
            digits, question, answer = clip_question(kind, frames, rng)
            sources = [int(rng.choice(by_label[d])) for d in digits]
            folder = f"clips/{split}_{index:05d}"
            (out / folder).mkdir(exist_ok=True)
            for frame, source in enumerate(sources):
                frame_image(digit_cell(pixels[source])).save(out / folder / f"{frame:03d}.png")
            labels[folder] = {"digits": digits, "sources": sources}
            asked = training_questions(CLIP_KINDS, kind, digits, (question, answer), turns, rng, clip=True,
                                       with_caption=caption) \
                if split == "train" else [(question, answer)]
            samples.append({"id": f"{split}_clip_{index:05d}", "video": folder,
                            "conversations": conversation("<video>", asked)})
            eval_video_questions.append({"question_id": f"{split}_clip_{index:05d}", "video": folder,
                                         "text": question, "answer": answer, "category": kind})
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
    builder.add_argument("--seed", type=int, default=0)
    builder.add_argument("--turns", type=int, default=1, help="questions per train sample (test samples: one)")
    builder.add_argument("--caption", action="store_true",
                         help="train samples start with a caption turn listing the digits in reading order")
    args = parser.parse_args(argv)
    summary = build(args.out, args.train_images, args.test_images, args.train_clips, args.test_clips, args.frames,
                    args.seed, args.turns, args.caption)
    print(f"wrote {args.out}: {summary['train_samples']} train and {summary['test_samples']} test samples "
          f"from {len(summary['train_digit_indices'])} / {len(summary['test_digit_indices'])} digit images")


if __name__ == "__main__":
    main()
