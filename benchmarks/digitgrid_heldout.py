"""DigitGrid held-out re-evaluation: fresh grids and clips from the test digits, asked and scored here,
independently of the demo's builder and scorer, through the eval entry's command line.

    python benchmarks/digitgrid_heldout.py [--runs-dir playground/runs/digitgrid] [--rows full,voco1]
        [--images 500] [--clips 300] [--seed 1000] [--out playground/runs/digitgrid/heldout.json]

The demo's report scores each checkpoint on the test questions its builder wrote. This script checks that
figure from the outside: it reads which digit images are test images from the data's ``split.json``, draws
new grids and clips from them with its own random generator (``--seed``), renders them with numpy from
scikit-learn's ``load_digits`` (each digit upscaled 2x into a 16 px cell of a 2 x 2 grid; 4x for a 32 px
clip frame), asks each question kind (the mix of answers the demo trains on) with its answer worked out here from the
digits' scikit-learn labels, writes a
LLaVA question file, runs ``python -m llava_voco.eval.model_vqa`` on each checkpoint (the report's
``--conv-mode``), and scores exact match itself (spaces and a final full stop stripped). It prints, per row,
its accuracy here against the report's for the same checkpoint (the main run's seed), per kind and overall.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

CORNERS = ("top left", "top right", "bottom left", "bottom right")


def cell(pixels: np.ndarray, scale: int) -> np.ndarray:
    """An 8 x 8 digit (0..16) upscaled ``scale`` times as uint8 gray."""
    return np.kron(pixels * (255.0 / 16.0), np.ones((scale, scale))).round().astype(np.uint8)


def rgb(gray: np.ndarray) -> Image.Image:
    return Image.fromarray(np.repeat(gray[:, :, None], 3, axis=2))


def image_question(kind: str, rng: np.random.Generator) -> tuple[list[int], str, str]:
    """Digits for a grid (reading order), a question of ``kind`` about it and its answer. The mix of answers
    is the one the demo trains on (yes half the time, counts 0-2 a third each, a digit shown once for
    'where'), drawn here with other code and another generator."""
    digits = list(rng.integers(0, 10, size=4))
    if kind in ("presence", "count"):
        asked = int(rng.integers(10))
        times = int(rng.integers(2)) if kind == "presence" else int(rng.integers(3))
        digits = [int(rng.choice([d for d in range(10) if d != asked])) for _ in range(4)]
        for corner in rng.permutation(4)[:times]:
            digits[corner] = asked
        if kind == "presence":
            return digits, f"Is there a {asked}?", f"{asked} {'yes' if times else 'no'}"
        return digits, f"How many {asked}s are there?", f"{asked} {['none', 'once', 'twice'][times]}"
    digits = [int(d) for d in digits]
    if kind == "largest":
        return digits, "What is the largest digit?", str(max(digits))
    if kind == "where":
        digits = [int(d) for d in rng.permutation(10)[:4]]
        corner = int(rng.integers(4))
        return digits, f"Where is the {digits[corner]}?", f"{digits[corner]} {CORNERS[corner]}"
    corner = int(rng.integers(4))
    return digits, f"Which digit is at the {CORNERS[corner]}?", f"{CORNERS[corner]} {digits[corner]}"


def clip_question(kind: str, frames: int, rng: np.random.Generator) -> tuple[list[int], str, str]:
    if kind == "presence":
        asked = int(rng.integers(10))
        digits = [int(rng.choice([d for d in range(10) if d != asked])) for _ in range(frames)]
        if rng.integers(2):
            digits[int(rng.integers(frames))] = asked
        return digits, f"Is there a {asked} in the clip?", f"{asked} {'yes' if asked in digits else 'no'}"
    if kind == "count":
        asked, times = int(rng.integers(10)), int(rng.integers(3))
        digits = [int(rng.choice([d for d in range(10) if d != asked])) for _ in range(frames)]
        for frame in rng.permutation(frames)[:times]:
            digits[frame] = asked
        return digits, f"How many frames show a {asked}?", f"{asked} {['none', 'once', 'twice'][times]}"
    digits = [int(d) for d in rng.integers(0, 10, size=frames)]
    frame = int(rng.integers(frames))
    return digits, f"Which digit is in frame {frame + 1}?", f"frame {frame + 1} {digits[frame]}"


def write_questions(out: Path, test_indices: list[int], images: int, clips: int, frames: int, seed: int):
    """Draws the grids and clips from the test digit images and writes the two question files."""
    data = load_digits()
    test_indices = np.asarray(test_indices)
    by_digit = {d: test_indices[data.target[test_indices] == d] for d in range(10)}
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    questions, video_questions = [], []
    kinds = ("presence", "count", "largest", "where", "position")
    for index in range(images):
        kind = kinds[index % len(kinds)]
        digits, text, answer = image_question(kind, rng)
        sources = [int(rng.choice(by_digit[d])) for d in digits]
        assert [int(data.target[i]) for i in sources] == digits
        cells = [cell(data.images[i], 2) for i in sources]
        name = f"images/heldout_{index:05d}.png"
        rgb(np.vstack([np.hstack(cells[:2]), np.hstack(cells[2:])])).save(out / name)
        questions.append({"question_id": f"heldout_{index}", "image": name, "text": text, "answer": answer,
                          "category": kind})
    clip_kinds = ("presence", "frame", "count")
    for index in range(clips):
        kind = clip_kinds[index % len(clip_kinds)]
        digits, text, answer = clip_question(kind, frames, rng)
        folder = out / f"clips/heldout_{index:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        for frame, digit in enumerate(digits):
            rgb(cell(data.images[int(rng.choice(by_digit[digit]))], 4)).save(folder / f"{frame:03d}.png")
        video_questions.append({"question_id": f"heldout_clip_{index}", "video": str(folder.relative_to(out)),
                                "text": text, "answer": answer, "category": kind})
    for name, records in (("questions.jsonl", questions), ("video_questions.jsonl", video_questions)):
        (out / name).write_text("".join(json.dumps(record) + "\n" for record in records))
    return questions, video_questions


def score(questions: list[dict], answers_file: Path) -> dict:
    """Exact match per kind and overall, computed here."""
    answers = {}
    for line in answers_file.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            answers[record["question_id"]] = record["text"]
    right, total = defaultdict(int), defaultdict(int)
    for question in questions:
        given = answers[question["question_id"]].strip().rstrip(".").strip()
        right[question["category"]] += given == question["answer"]
        total[question["category"]] += 1
    return {"categories": {kind: right[kind] / total[kind] for kind in total},
            "overall": sum(right.values()) / sum(total.values()), "questions": sum(total.values())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs-dir", default="playground/runs/digitgrid")
    parser.add_argument("--rows", default="full,pool1,llamavid,voco1,voco1+kd,voco4")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--clips", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--out", default=None, help="default: <runs-dir>/heldout.json")
    args = parser.parse_args(argv)
    runs = Path(args.runs_dir)
    report = json.loads((runs / "report.json").read_text())
    data_dir = (runs / report["base"]["data"]).resolve()
    split = json.loads((data_dir / "split.json").read_text())
    conv_mode = next(line for line in (runs / "full" / "command.txt").read_text().split(" --")
                     if line.startswith("version ")).split()[1]
    work = runs / "heldout"
    questions, video_questions = write_questions(work, split["test_digit_indices"], args.images, args.clips,
                                                 split["frames_per_clip"], args.seed)
    results = {}
    for row in args.rows.split(","):
        checkpoint = runs / row
        results[row] = {}
        for kind, records, file in (("images", questions, "questions.jsonl"), ("clips", video_questions, "video_questions.jsonl")):
            if kind == "clips" and row not in report["video_rows"]:
                continue
            answers = work / f"answers_{row}_{kind}.jsonl"
            answers.unlink(missing_ok=True)
            subprocess.run([sys.executable, "-m", "llava_voco.eval.model_vqa", "--model-path", str(checkpoint),
                            "--question-file", str(work / file), "--image-folder", str(work), "--answers-file",
                            str(answers), "--conv-mode", conv_mode, "--max-new-tokens", "6", "--batch-size", "16"],
                           check=True, capture_output=True)
            mine = score(records, answers)
            reported = next(run for run in report["rows" if kind == "images" else "video_rows"][row]["per_seed"]
                            if run["checkpoint"] == row)
            results[row][kind] = {"heldout": mine, "report": {"categories": reported["categories"],
                                                              "overall": reported["overall"]}}
            cells = " ".join(f"{c} {100 * v:.1f}/{100 * reported['categories'].get(c, float('nan')):.1f}"
                             for c, v in mine["categories"].items())
            print(f"{row:>9} {kind:>6}: overall {100 * mine['overall']:.1f} here / {100 * reported['overall']:.1f} "
                  f"in the report ({cells})", flush=True)
    out = Path(args.out or runs / "heldout.json")
    out.write_text(json.dumps({"seed": args.seed, "images": args.images, "clips": args.clips, "rows": results}, indent=1))
    return results


if __name__ == "__main__":
    main()
