"""Tuning logs: where they live, what makes one usable, and listing them.

A log is MetaSchedule's own JSON database (one workload file, one record file, one JSON
object a line) plus a small ``tvmgroup.json`` that says what was tuned, with which TVM and
for which target. Layout, under a root (the user's ``$TVMGROUP_HOME/tuning_logs`` or the
package's ``tuning_logs/``)::

    <target key>/<op>-<layout>-g<G>-k<K>-o<O>-<dtype>-<bias|nobias>/n<rows>[-generic]/
        database_workload.json
        database_tuning_record.json
        tvmgroup.json

Records are appended one line per measured schedule, so a run cut short by Ctrl-C or a
kill leaves a log whose complete lines still load; a torn last line is skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import tvm
import tvm_ffi

from tvmgroup.compute import OpSpec, ir_module

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"
META = "tvmgroup.json"
FORMAT = 1
FAILED_RUN_SECS = 1e9  # MetaSchedule records a failed build or run as 1e10 seconds


class LogError(ValueError):
    """A log that cannot serve a kernel: corrupt, truncated, foreign or failing its check."""


def run_dir_name(rows: int, space: str = "template") -> str:
    return f"n{rows}" if space == "template" else f"n{rows}-{space}"


def log_dir(root: Path, target_key: str, spec: OpSpec, rows: int, space: str = "template") -> Path:
    return Path(root) / target_key / spec.key / run_dir_name(rows, space)


@dataclass
class TuningLog:
    """One log directory and its metadata (read leniently: validation is :func:`best_record`)."""

    path: Path
    target_key: str
    spec_key: str
    rows: int
    space: str
    meta: dict = field(default_factory=dict)

    @property
    def trials(self) -> int:
        """Trials measured so far: the larger of the recorded count and the record lines."""
        return max(int(self.meta.get("trials", 0) or 0), count_records(self.path))


def _parse_run_dir(name: str) -> tuple[int, str] | None:
    if not name.startswith("n"):
        return None
    rows, _, space = name[1:].partition("-")
    if not rows.isdigit():
        return None
    return int(rows), space or "template"


def read_meta(path: Path) -> dict:
    try:
        meta = json.loads((Path(path) / META).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _replace_file(destination: Path, text: str) -> None:
    """Writes ``destination`` through a temporary file beside it, which a failed write (a
    full disk) removes again: the old file stays whole and nothing is left behind."""
    tmp = destination.parent / f".{destination.name}.tmp{os.getpid()}"
    try:
        tmp.write_text(text)
        os.replace(tmp, destination)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_meta(path: Path, meta: dict) -> None:
    """Atomically replaces the log's ``tvmgroup.json``."""
    _replace_file(Path(path) / META, json.dumps(meta, indent=1, sort_keys=True) + "\n")


def count_records(path: Path) -> int:
    try:
        with open(Path(path) / RECORDS, "rb") as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def find_logs(root: Path, *, spec_key: str | None = None, target_key: str | None = None) -> list[TuningLog]:
    """Every log directory under ``root``, optionally only one spec or one target key."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for tdir in sorted(p for p in root.iterdir() if p.is_dir()):
        if target_key is not None and tdir.name != target_key:
            continue
        for sdir in sorted(p for p in tdir.iterdir() if p.is_dir()):
            if spec_key is not None and sdir.name != spec_key:
                continue
            for rdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
                parsed = _parse_run_dir(rdir.name)
                if parsed is None or not (rdir / RECORDS).exists():
                    continue
                found.append(TuningLog(rdir, tdir.name, sdir.name, parsed[0], parsed[1], read_meta(rdir)))
    return found


def mean_secs(run_secs) -> float:
    try:
        values = [float(s) for s in run_secs]
    except (TypeError, ValueError):
        return math.inf
    if not values or any(not math.isfinite(v) or v <= 0 for v in values):
        return math.inf
    mean = sum(values) / len(values)
    return mean if mean < FAILED_RUN_SECS else math.inf


def read_records(path: Path) -> list[tuple[int, list]]:
    """``(workload index, record JSON)`` of every complete, well-formed record line.

    Lines that are not such JSON (a torn last line, bytes that are not UTF-8) are skipped.
    """
    out = []
    with open(Path(path) / RECORDS, "rb") as f:
        for line in f:
            try:
                index, record = json.loads(line)
                if isinstance(index, int) and isinstance(record, list) and len(record) >= 2:
                    out.append((index, record))
            except (ValueError, TypeError):  # UnicodeDecodeError is a ValueError
                continue
    return out


@dataclass(frozen=True)
class BestRecord:
    record: tvm.s_tir.meta_schedule.database.TuningRecord
    seconds: float
    digest: str  # hash of the trace JSON: changes whenever the chosen schedule does


def check_meta(log: TuningLog, spec: OpSpec) -> None:
    """Raises :class:`LogError` unless the log's metadata says it was made for ``spec``."""
    meta = log.meta
    if not meta:
        raise LogError(f"{log.path}: missing or unreadable {META}")
    if meta.get("format") != FORMAT:
        raise LogError(f"{log.path}: log format {meta.get('format')!r}, expected {FORMAT}")
    if meta.get("tvm_version") != tvm.__version__:
        raise LogError(f"{log.path}: made with TVM {meta.get('tvm_version')!r}, this is TVM {tvm.__version__}")
    if meta.get("spec_key") != spec.key:
        raise LogError(f"{log.path}: tuned for {meta.get('spec_key')!r}, expected {spec.key!r}")
    if meta.get("rows") != log.rows:
        raise LogError(f"{log.path}: tuned rows {meta.get('rows')!r} do not match its directory (n{log.rows})")


# A log serves only where its best schedule ran at least this much faster than the default
# schedule measured in the same run (the first trial of every log): a smaller gain is within
# a machine's run-to-run noise, and the default then serves (no first-use check to pay).
MIN_GAIN_OVER_DEFAULT = 1.02


def default_seconds(meta: dict) -> float | None:
    """The default schedule's latency a log recorded (``default_seconds`` in its metadata),
    or None where it has none or holds anything but a positive finite number."""
    value = meta.get("default_seconds") if isinstance(meta, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and value > 0 else None


def best_beats(best_seconds: float, default: float | None) -> bool:
    """Whether a best latency beat the default's by MIN_GAIN_OVER_DEFAULT; True where no
    default was recorded (a log made before logs recorded it)."""
    return default is None or best_seconds * MIN_GAIN_OVER_DEFAULT <= default


CONFIRMED = "confirmed"  # tvmgroup.json: the best schedule against the default, timed as the layer runs them


@dataclass(frozen=True)
class Confirmation:
    """A log's best schedule (the record whose trace hashes to ``digest``) and the default,
    timed as the layer runs kernels (:mod:`tvmgroup.tuning.confirm`): medians, in seconds."""

    digest: str
    best_seconds: float
    default_seconds: float

    def to_meta(self) -> dict:
        return {"digest": self.digest, "best_seconds": self.best_seconds, "default_seconds": self.default_seconds}


def confirmation(meta: dict, digest: str) -> Confirmation | None:
    """The confirmation ``meta`` records for the best record ``digest``; None where it has
    none, holds anything but positive finite numbers, or confirmed another record (the log's
    best changed since)."""
    entry = meta.get(CONFIRMED) if isinstance(meta, dict) else None
    if not isinstance(entry, dict) or entry.get("digest") != digest:
        return None
    values = [entry.get("best_seconds"), entry.get("default_seconds")]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values):
        return None
    return Confirmation(digest, float(values[0]), float(values[1]))


def confirmed_or_searched_beats(best_seconds: float, default: float | None, confirmed: Confirmation | None) -> bool:
    """Whether a best beat the default: by the timings that confirmed it where there are
    some, else by the search's own measurements (``best_seconds``, ``default``)."""
    if confirmed is not None:
        return best_beats(confirmed.best_seconds, confirmed.default_seconds)
    return best_beats(best_seconds, default)


def beats_default(log: TuningLog, best: BestRecord) -> bool:
    """Whether ``log``'s best record beat the default (:func:`confirmed_or_searched_beats`,
    with the confirmation the log records for that record)."""
    return confirmed_or_searched_beats(best.seconds, default_seconds(log.meta), confirmation(log.meta, best.digest))


def best_record(log: TuningLog, spec: OpSpec) -> BestRecord:
    """The fastest valid record of ``spec`` in ``log``; :class:`LogError` if there is none."""
    from tvm.s_tir.meta_schedule.database import TuningRecord, Workload

    check_meta(log, spec)
    try:
        records = read_records(log.path)
        workload_lines = (log.path / WORKLOADS).read_text().splitlines()
    except OSError as err:
        raise LogError(f"{log.path}: unreadable ({err})") from None
    ranked = sorted(((mean_secs(r[1]), i, r) for i, r in records), key=lambda t: t[0])
    ranked = [t for t in ranked if math.isfinite(t[0])]
    if not ranked:
        raise LogError(f"{log.path}: no successfully measured record")
    seconds, index, record = ranked[0]
    expected = ir_module(spec, log.rows)
    try:
        workload = Workload.from_json(json.loads(workload_lines[index]))
        if not tvm_ffi.structural_equal(workload.mod, expected):
            raise LogError(f"{log.path}: its workload is not {spec.key} at {log.rows} rows")
        parsed = TuningRecord.from_json(record, workload)
    except LogError:
        raise
    except Exception as err:  # malformed JSON, a foreign TVM's IR: unusable, never fatal
        raise LogError(f"{log.path}: cannot parse its best record ({type(err).__name__}: {err})") from None
    digest = hashlib.sha256(json.dumps(record[0], sort_keys=True).encode()).hexdigest()[:16]
    return BestRecord(parsed, seconds, digest)


def prune(path: Path, keep: int) -> int:
    """Rewrites the record file with only its ``keep`` fastest records; returns how many remain."""
    records = read_records(path)
    ranked = sorted(records, key=lambda r: mean_secs(r[1][1]))
    kept = [r for r in ranked if math.isfinite(mean_secs(r[1][1]))][:keep]
    _replace_file(Path(path) / RECORDS, "".join(json.dumps(list(r), separators=(",", ":")) + "\n" for r in kept))
    return len(kept)
