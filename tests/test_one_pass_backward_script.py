"""scripts/one_pass_backward.py checks each structure of the fused backward against float64,
then times them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "one_pass_backward.py"


def test_one_pass_backward_reports_every_structure_of_a_shape():
    # 200 rows: no structure's row tile divides them, so the float64 check covers the tail too.
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--rounds", "1", "200,4,16,16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    header, row = out.splitlines()
    assert header.split()[:4] == ["N,G,K,O", "parts", "one_pass_groups", "one_pass_rows"], out
    shape, parts, *one_pass = row.split()
    assert shape == "200,4,16,16" and float(parts) > 0, out
    rates, ratios = one_pass[0::2], one_pass[1::2]
    assert len(rates) == len(ratios) == 2, out
    assert all(float(r) > 0 for r in rates) and all(r.endswith("x") and float(r[:-1]) > 0 for r in ratios), out


def test_one_pass_backward_refuses_a_malformed_shape():
    run = subprocess.run([sys.executable, str(SCRIPT), "4,2,16"], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2 and "'4,2,16'" in run.stderr, run.stderr
