#!/usr/bin/env python3
"""Generate the generated part of the upstream LLaVA patch series (patches/README.md).

The VoCo mask rule (docs/design.md §2.2) is defined once, in ``llava_voco/model/voco_mask.py`` (torch only,
no transformers import, so that it runs beside LLaVA's pinned transformers). The first patch of
``patches/llava-v1.2.2/`` adds that file to a LLaVA checkout as ``llava/model/voco_mask.py``: a verbatim
copy with a generated header. This script writes that patch, in ``git format-patch`` form, so that
``git am`` and ``patch -p1`` both take it. The other patches are hand-made commits (patches/README.md,
"Regenerating") and only call the module's public API (``VoCoLayout.from_input_ids``, ``dense_mask``).

    python scripts/make_patches.py            # rewrite the patch after voco_mask.py changed
    python scripts/make_patches.py --check    # exit 1 when the committed patch is stale

``tests/test_patches.py`` fails when the committed patch differs from what this script writes. Standard
library only, and the output is byte-for-byte deterministic (fixed author, date and commit line).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "llava_voco" / "model" / "voco_mask.py"
SERIES_DIR = ROOT / "patches" / "llava-v1.2.2"
TARGET_PATH = "llava/model/voco_mask.py"  # where the copy lands in the LLaVA checkout
PATCH_NAME = "0001-voco-add-llava-model-voco_mask.py-the-VoCo-mask-rule.patch"

HEADER = (
    "# GENERATED FILE: do not edit. llava-voco's scripts/make_patches.py copied it verbatim from\n"
    "# llava_voco/model/voco_mask.py, the one definition of the VoCo mask rule (llava-voco's\n"
    "# docs/design.md section 2.2). Change it there and regenerate the patch series.\n"
)

SUBJECT = "voco: add llava/model/voco_mask.py, the VoCo mask rule"
BODY = """\
The VoCo attention rule and the token layout it reads (VoCoLayout), copied
verbatim from llava-voco's llava_voco/model/voco_mask.py by its
scripts/make_patches.py. Torch only: it imports nothing from transformers, so
it runs with the transformers this LLaVA version pins.

Rule: once image m's last VoCo token has been passed, no later token may
attend to image m's vision tokens ('official' mode: text after the last VoCo
token also sees nothing before the first one).

The patched LLaVA code builds the layout with VoCoLayout.from_input_ids and
the 4D mask with VoCoLayout.dense_mask; nothing else restates the rule.
"""
AUTHOR = "llava-voco <llava-voco@users.noreply.github.com>"
DATE = "Thu, 1 Jan 2026 00:00:00 +0000"


def generated_file(source: Path = SOURCE) -> bytes:
    """The content of ``llava/model/voco_mask.py`` in the patched checkout."""
    return HEADER.encode() + source.read_bytes()


def blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def make_patch(source: Path = SOURCE) -> bytes:
    """The whole patch (``git format-patch -N`` layout) adding the generated file."""
    content = generated_file(source)
    text = content.decode("utf-8")
    lines = text.splitlines(keepends=True)
    hunk = []
    for line in lines:
        if line.endswith("\n"):
            hunk.append("+" + line)
        else:
            hunk.append("+" + line + "\n\\ No newline at end of file\n")
    count = len(lines)
    parts = [
        "From 0000000000000000000000000000000000000000 Mon Sep 17 00:00:00 2001\n",
        f"From: {AUTHOR}\n",
        f"Date: {DATE}\n",
        f"Subject: [PATCH] {SUBJECT}\n",
        "\n",
        BODY,
        "---\n",
        f" {TARGET_PATH} | {count} +\n",
        f" 1 file changed, {count} insertions(+)\n",
        f" create mode 100644 {TARGET_PATH}\n",
        "\n",
        f"diff --git a/{TARGET_PATH} b/{TARGET_PATH}\n",
        "new file mode 100644\n",
        f"index 0000000..{blob_id(content)[:7]}\n",
        "--- /dev/null\n",
        f"+++ b/{TARGET_PATH}\n",
        f"@@ -0,0 +1,{count} @@\n",
        *hunk,
        "-- \n",
        "llava-voco scripts/make_patches.py\n",
        "\n",
    ]
    return "".join(parts).encode("utf-8")


def write(output_dir: Path = SERIES_DIR, source: Path = SOURCE) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    target = output_dir / PATCH_NAME
    target.write_bytes(make_patch(source))
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=SERIES_DIR, help="series folder (default: %(default)s)")
    parser.add_argument("--source", type=Path, default=SOURCE, help="the module to carry (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="compare with the committed patch; write nothing")
    args = parser.parse_args(argv)
    if args.check:
        target = args.output_dir / PATCH_NAME
        if not target.exists() or target.read_bytes() != make_patch(args.source):
            print(f"{target} is stale: run python scripts/make_patches.py", file=sys.stderr)
            return 1
        print(f"{target} is up to date")
        return 0
    print(write(args.output_dir, args.source))
    return 0


if __name__ == "__main__":
    sys.exit(main())
