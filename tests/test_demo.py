"""The README's first command runs and shows a real compression."""

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_and_compresses():
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-m", "llava_voco.demo.mask"], capture_output=True, text=True, env=env,
                         timeout=300, check=True).stdout
    assert "sequence: prefix 33, vision 16, VoCo 1, text 14" in out
    assert re.search(r"text\s+all\s+none\s+all\s+causal", out)
    assert "50 positions with vision, 34 after dropping it" in out
    difference = float(re.search(r"full masked forward: ([0-9.e+-]+)", out).group(1))
    assert difference < 1e-5
