"""DigitGrid side run: how much ``full`` depends on the base models it starts from (issue 16).

    python benchmarks/digitgrid_stage0.py [--only stage0-1200,tower-4k-clips] [--jobs 1]
        [--data-dir playground/data/digitgrid] [--runs-dir playground/runs/digitgrid_stage0]

The default preset's ``full`` read 91.0% of test positions in a side run and 55.3% in the default run of
2026-12-03 with the same command, data and training seed; only the base models differed (built from the
earlier 4,000-grid data, whose train clips differ: stage 0 also trains on clip frames). Base building is
bit-reproducible (same data and sizes: the same tower and LLM weights), so the gap is the base, not chance
in one build. Each variant here builds or assembles a base, trains ``full`` with the default preset's
command (training seed 0, ``llava_voco.demo.runner.train_command``) and scores it on the demo's test
questions through the eval entry:

* ``stage0-1200``: stage 0 three times longer (1,200 steps);
* ``tower-4k-clips``: the demo's LLM and tokenizer with the tower of the 4,000-grid base (``--tower-from``),
  which separates the tower from the tokenizer.

The default base's own ``full`` is the demo's row (``playground/runs/digitgrid/full``), not retrained here.
Prints a table and writes ``stage0.json`` in the runs folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from llava_voco.demo.models import BaseSizes, build_base
from llava_voco.demo.runner import METHODS, PRESETS, method_tasks, run_tasks, score


@dataclass(frozen=True)
class Variant:
    name: str
    what: str
    sizes: BaseSizes | None = None  # a base built with these sizes from the demo's data
    tower_from: bool = False  # the demo's base with --tower-from's vision tower


VARIANTS = (
    Variant("stage0-1200", "stage 0 for 1,200 steps (400)", replace(BaseSizes(), vision_pretrain_steps=1200)),
    Variant("tower-4k-clips", "the tower of the base built from the 4,000-grid data", tower_from=True),
)


def prepare_base(variant: Variant, data_dir: Path, demo_base: Path, tower_from: Path, base_dir: Path) -> dict:
    """Builds (or reuses) the variant's base; returns its stage-0 summary."""
    marker = base_dir / "base.json"
    if marker.exists():
        return json.loads(marker.read_text())["stage0"]
    if variant.tower_from:
        shutil.copytree(demo_base, base_dir, dirs_exist_ok=True)
        shutil.rmtree(base_dir / "vision_tower")
        shutil.copytree(tower_from / "vision_tower", base_dir / "vision_tower")
        summary = {**json.loads(demo_base.joinpath("base.json").read_text()),
                   "stage0": json.loads((tower_from / "base.json").read_text())["stage0"],
                   "tower_from": str(tower_from)}
        marker.write_text(json.dumps(summary, indent=1))
        return summary["stage0"]
    return build_base(data_dir, base_dir, variant.sizes)["stage0"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=None, help="comma-separated variants: " + ", ".join(v.name for v in VARIANTS))
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--data-dir", default="playground/data/digitgrid")
    parser.add_argument("--runs-dir", default="playground/runs/digitgrid_stage0")
    parser.add_argument("--demo-base", default="playground/runs/digitgrid/base")
    parser.add_argument("--tower-from", default="playground/runs/digitgrid_levers/base",
                        help="the base built from the 4,000-grid data (benchmarks/digitgrid_levers.py's)")
    args = parser.parse_args(argv)
    variants = [v for v in VARIANTS if args.only is None or v.name in args.only.split(",")]
    if not variants:
        parser.error(f"--only: none of {args.only}; choose from {[v.name for v in VARIANTS]}")
    os.environ.setdefault("WANDB_DISABLED", "true")
    preset, data_dir, runs_dir = PRESETS["default"], Path(args.data_dir), Path(args.runs_dir)
    full = next(m for m in METHODS if m.name == "full")
    started = time.perf_counter()
    stage0, tasks = {}, []
    for variant in variants:
        base_dir = runs_dir / variant.name / "base"
        stage0[variant.name] = prepare_base(variant, data_dir, Path(args.demo_base), Path(args.tower_from), base_dir)
        task = method_tasks(full, preset, data_dir, runs_dir / variant.name, base_dir, seed=preset.seed)
        tasks.append(replace(task, name=variant.name, evaluations=tuple(
            replace(e, name=f"{variant.name}: {e.name}") for e in task.evaluations if "video" not in e.name)))
    summaries = run_tasks(tasks, args.jobs)
    rows = {}
    for variant in variants:
        result = score(full, runs_dir / variant.name, data_dir, "test", "test_questions.jsonl", preset.seed)
        rows[variant.name] = {"what": variant.what, "stage0": stage0[variant.name], "overall": result["overall"],
                              "position": result["categories"]["position"],
                              "train_seconds": summaries[variant.name]["seconds"]}
    lines = ["variant | what | stage-0 token acc. | overall | position | train s"]
    for name, row in rows.items():
        lines.append(f"{name} | {row['what']} | {100 * row['stage0']['token_accuracy_test']:.1f} | "
                     f"{100 * row['overall']:.1f} | {100 * row['position']:.1f} | {row['train_seconds']:.0f}")
    print("\n".join(lines))
    report = {"rows": rows, "seconds": round(time.perf_counter() - started, 1), "machine": os.uname().machine,
              "argv": sys.argv[1:]}
    (runs_dir / "stage0.json").write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
