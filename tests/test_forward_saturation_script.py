"""scripts/forward_saturation.py checks the served kernel, then reports hot, cold and layer rows."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "forward_saturation.py"


def test_forward_saturation_reports_each_row_of_a_shape():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "1", "--working-mb", "1", "24,2,16,16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    lines = out.splitlines()
    assert lines[0].startswith("24,2,16,16:") and "GFLOP/s" in lines[0], out
    rows = [line.split() for line in lines[1:]]
    assert [row[0] for row in rows] == ["hot", "cold", "layer"], out
    assert all(float(row[1]) > 0 and row[2] == "ms" for row in rows), out


def test_forward_saturation_refuses_a_malformed_shape():
    run = subprocess.run([sys.executable, str(SCRIPT), "24,2,16"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "'24,2,16'" in run.stderr, run.stderr
