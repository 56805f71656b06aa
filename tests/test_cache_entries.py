"""``tvmgroup cache``: listing and clearing the kernel cache; stale entries; nothing loaded."""

from __future__ import annotations

import json

import pytest
import torch

from tvmgroup import cli, grouped_linear, lookup
from tvmgroup.cache_entries import clear, list_entries
from tvmgroup.kernel import KERNELS


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("TVMGROUP_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("TVMGROUP_QUIET", "1")
    KERNELS.clear()
    lookup.forget()
    # Two kernels: a serial forward (a small call) and a parallel one (a large call).
    w, b = torch.randn(2, 8, 8), torch.randn(2, 8)
    grouped_linear(torch.randn(3, 16), w, b)
    grouped_linear(torch.randn(4096, 16), w, b)
    yield tmp_path / "home"
    KERNELS.clear()
    lookup.forget()


def test_list_shows_each_kernel(home, capsys):
    entries = list_entries()
    assert sorted(e.variant for e in entries) == ["parallel", "serial"]
    assert {e.spec_key for e in entries} == {"forward-last-g2-k8-o8-float32-bias"}
    assert all(e.schedule == "default" and e.row_tile and e.size > 0 and not e.stale for e in entries)
    assert cli.main(["cache", "list"]) == 0
    out = capsys.readouterr().out
    assert "forward-last-g2-k8-o8-float32-bias" in out and "serial" in out and "2 kernels" in out


def test_stale_and_unreadable_entries_are_listed_not_loaded(home, capsys):
    first, second = list_entries()
    meta_path = first.stem.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["key"] = meta["key"].replace("|default|", "|default|0000")  # another code version
    meta_path.write_text(json.dumps(meta))
    meta["spec"] = "forward\x1b[2J"  # a terminal control sequence is not printed
    meta_path.write_text(json.dumps(meta))
    second.stem.with_suffix(".json").write_text("{not json")
    entries = {e.stem: e for e in list_entries()}
    assert entries[first.stem].stale and entries[second.stem].stale
    assert entries[first.stem].spec_key == entries[second.stem].spec_key == "?"
    assert cli.main(["cache"]) == 0
    assert "2 stale" in capsys.readouterr().out


def test_clear_stale_keeps_the_good_entries(home, capsys):
    first, second = list_entries()
    meta_path = first.stem.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta["key"] = meta["key"] + "x"
    meta_path.write_text(json.dumps(meta))
    assert cli.main(["cache", "clear", "--stale"]) == 0
    assert "removed 1 stale entries" in capsys.readouterr().out
    assert [e.stem for e in list_entries()] == [second.stem]
    assert not any(first.stem.parent.glob(first.stem.name + "*"))


def test_clear_removes_everything_and_kernels_rebuild(home, capsys):
    orphan = next(iter(list_entries())).stem.parent / "forward-orphan-0000-main.so"
    orphan.write_bytes(b"a library whose writer was killed")
    assert cli.main(["cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out
    assert list_entries() == []
    assert not orphan.exists()
    assert not any(p.is_file() for p in (home / "kernels").rglob("*"))
    KERNELS.clear()
    lookup.forget()
    x, w = torch.randn(3, 16), torch.randn(2, 8, 8)
    torch.testing.assert_close(grouped_linear(x, w), torch.einsum("ngk,gok->ngo", x.view(3, 2, 8), w).reshape(3, 16))
    assert len(list_entries()) == 1


def test_empty_cache_and_misuse(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TVMGROUP_HOME", str(tmp_path / "nothing"))
    assert cli.main(["cache"]) == 0
    assert "no cached kernels" in capsys.readouterr().out
    assert clear() == (0, 0)
    assert cli.main(["cache", "list", "--stale"]) == 2
    assert "--stale goes with `tvmgroup cache clear`" in capsys.readouterr().err
