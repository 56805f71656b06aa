"""scripts/per_call.py runs and reports both formulations."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "per_call.py"


def test_per_call_script_reports_both_formulations():
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--rows", "3", "--groups", "2", "--in-features", "5", "--out-features", "4",
         "--threads", "1"],
        capture_output=True, text=True, timeout=300, check=True,
    ).stdout
    lines = {line.split(":")[0]: line for line in out.splitlines()}
    for mode in ("forward", "forward+backward"):
        assert "tvmgroup" in lines[mode] and "einsum + bias" in lines[mode], out
