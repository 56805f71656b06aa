"""The package as a user imports it: the run-time stands apart from the tuner."""

from __future__ import annotations

import subprocess
import sys


def test_run_time_imports_no_tuning_module():
    """``import tvmgroup`` and a forward and backward call load nothing from the tuner or CLI."""
    code = (
        "import sys, torch, tvmgroup\n"
        "layer = tvmgroup.GroupedLinear(2, 4, 4)\n"
        "layer(torch.randn(5, 8, requires_grad=True)).sum().backward()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[:2] in (['tvmgroup', 'tuning'], ['tvmgroup', 'commands'])))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_tuner_is_importable_on_its_own():
    """The reverse direction exists: the tuner imports the run-time."""
    code = "import sys, tvmgroup.tuning.tune; print('tvmgroup.lookup' in sys.modules or 'tvmgroup.logs' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "True"
