"""``tvmgroup demo`` on a small shape: it checks the layer against Conv1d and exits 0."""

from __future__ import annotations

import re

import pytest

from tvmgroup.cli import main

SMALL = ["--rows", "13", "--groups", "3", "--in-features", "5", "--out-features", "4"]


def test_demo_agrees_with_conv1d(capsys):
    assert main(["demo", *SMALL]) == 0
    out = capsys.readouterr().out
    err = float(re.search(r"max \|GroupedLinear - Conv1d\| = (\S+) over 195 inputs", out).group(1))
    assert err < 1e-5
    assert "forward, rows=13 groups=3 5->4: Conv1d" in out and "tvmgroup" in out


def test_demo_rejects_a_bad_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--rows", "many"])
    assert exit_info.value.code == 2
    assert "invalid int value: 'many'" in capsys.readouterr().err


def test_demo_reports_errors_without_a_traceback(capsys):
    assert main(["demo", "--rows", "13", "--groups", "0"]) == 2
    assert "tvmgroup demo: error:" in capsys.readouterr().err


def test_no_command_is_an_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2

