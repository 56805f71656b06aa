"""scripts/template_ab.py compiles a revision's template beside this one's, checks both and reports them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "template_ab.py"


def test_template_ab_reports_forward_and_backward_against_a_revision():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--against", "HEAD", "--rounds", "1", "24,2,16,16"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=True,
    ).stdout
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [row[:2] for row in rows] == [["24,2,16,16", "forward"], ["24,2,16,16", "backward"]], out
    assert all(float(row[6].rstrip("x")) > 0 for row in rows), out


def test_template_ab_refuses_an_unknown_revision():
    run = subprocess.run([sys.executable, str(SCRIPT), "--against", "no-such-revision", "24,2,16,16"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "no-such-revision" in run.stderr
