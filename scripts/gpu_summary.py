"""Summarises a ``scripts/gpu_check.sh`` output folder into ``summary.json`` and ``summary.md``.

    python3 scripts/gpu_summary.py OUTDIR

Reads what the steps left there: ``steps.jsonl`` (one line per step: name, exit status, seconds,
limit), the pytest JUnit files ``<step>.xml``, the bench's ``bench.json`` files (one per dtype)
and ``tuning_logs.tar``. A file that is missing, cut short by a time limit or malformed is
reported as such, never fatal: a run that failed half-way still gets its summary. Only the
standard library is used, so it runs wherever the GPU run does; nothing read is executed.
"""

from __future__ import annotations

import json
import sys
import tarfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

MAX_READ_BYTES = 64 << 20  # a file larger than this is not what the steps write
TIMED_OUT = (124, 137)


def _read_json(path: Path) -> tuple[object | None, str | None]:
    """(data, None), or (None, why it could not be read)."""
    try:
        if path.stat().st_size > MAX_READ_BYTES:
            return None, f"{path.name} is larger than {MAX_READ_BYTES} bytes"
        return json.loads(path.read_text()), None
    except FileNotFoundError:
        return None, f"{path.name} is missing"
    except (OSError, ValueError) as err:
        return None, f"{path.name} is unreadable: {type(err).__name__}: {err}"


def read_steps(out: Path) -> list[dict]:
    """The steps in the order they ran, each with a ``status``: ok, failed, timed out, skipped."""
    steps = []
    try:
        lines = (out / "steps.jsonl").read_text().splitlines()
    except OSError:
        return steps
    for line in lines:
        try:
            entry = json.loads(line)
            step = {"name": str(entry["name"]), "rc": int(entry["rc"]), "seconds": float(entry["seconds"]),
                    "limit_s": int(entry.get("limit_s", 0))}
        except (ValueError, KeyError, TypeError):
            steps.append({"name": "?", "rc": None, "seconds": 0.0, "limit_s": 0, "status": "unreadable",
                          "detail": line[:200]})
            continue
        if entry.get("skipped"):
            step["status"], step["detail"] = "skipped", str(entry["skipped"])
        elif step["rc"] == 0:
            step["status"] = "ok"
        elif step["rc"] in TIMED_OUT:
            step["status"] = "timed out"
        else:
            step["status"] = "failed"
        steps.append(step)
    return steps


def read_junit(path: Path) -> dict | None:
    """Counts of a pytest JUnit XML file and the names of what failed (None if absent)."""
    if not path.exists():
        return None
    try:
        if path.stat().st_size > MAX_READ_BYTES:
            return {"error": f"{path.name} is larger than {MAX_READ_BYTES} bytes"}
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError) as err:
        return {"error": f"{path.name} is unreadable: {err}"}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    failed = []
    for suite in root.iter("testsuite"):
        for key in counts:
            try:
                counts[key] += int(suite.get(key, 0))
            except ValueError:
                pass
    for case in root.iter("testcase"):
        problem = case.find("failure") if case.find("failure") is not None else case.find("error")
        if problem is not None:
            message = (problem.get("message") or "").strip().splitlines()
            failed.append(f"{case.get('classname', '')}::{case.get('name', '')}: {message[0][:300] if message else ''}")
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts["failed"] = failed
    return counts


def _median(timing: object) -> float | None:
    if isinstance(timing, dict) and isinstance(timing.get("median_ms"), (int, float)):
        return float(timing["median_ms"])
    return None


def read_bench(path: Path) -> dict:
    """One bench.json boiled down: machine, ceilings, per shape each formulation's status and medians."""
    data, error = _read_json(path)
    if error or not isinstance(data, dict):
        return {"error": error or f"{path.name} is not a JSON object"}
    shapes = []
    for entry in data.get("shapes") or []:
        try:
            s = entry["shape"]
            label = f"{s['n']},{s['groups']},{s['in_features']},{s['out_features']}"
            results = [{"name": str(r["name"]), "status": str(r["status"]), "message": str(r.get("message", ""))[:300],
                        "forward_ms": _median(r.get("forward")), "forward_backward_ms": _median(r.get("forward_backward"))}
                       for r in entry["results"]]
        except (KeyError, TypeError):
            shapes.append({"shape": "?", "error": "malformed shape entry"})
            continue
        shapes.append({"shape": label, "results": results, "tvmgroup_speedup": entry.get("tvmgroup_speedup")})
    options = data.get("options") if isinstance(data.get("options"), dict) else {}
    machine = data.get("machine") if isinstance(data.get("machine"), dict) else {}
    return {"dtype": options.get("dtype", "float32"), "device": options.get("device", "cpu"),
            "gpu": machine.get("gpu_name"), "ceilings": data.get("ceilings"), "shapes": shapes}


def read_benches(out: Path) -> dict[str, dict]:
    """Every bench.json under OUTDIR, keyed by its folder relative to OUTDIR (bench/bfloat16, ...)."""
    return {str(p.parent.relative_to(out)): read_bench(p) for p in sorted(out.glob("**/bench.json"))}


def read_tuning(out: Path) -> dict:
    """The files in tuning_logs.tar, and what each log's tvmgroup.json says it holds."""
    path = out / "tuning_logs.tar"
    if not path.exists():
        return {"error": "tuning_logs.tar is missing"}
    try:
        with tarfile.open(path) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            logs = {}
            for m in members:
                if m.name.endswith("/tvmgroup.json") and m.size < MAX_READ_BYTES:
                    try:
                        meta = json.loads(tar.extractfile(m).read())
                        logs[m.name] = {k: meta.get(k) for k in ("spec_key", "target_key", "rows", "space", "trials")
                                        if isinstance(meta, dict)}
                    except (ValueError, AttributeError):
                        logs[m.name] = {"error": "unreadable meta"}
    except (OSError, tarfile.TarError) as err:
        return {"error": f"tuning_logs.tar is unreadable: {err}"}
    return {"files": len(members), "bytes": sum(m.size for m in members), "logs": logs}


def summarise(out: Path) -> dict:
    steps = read_steps(out)
    tests = {name: read_junit(out / f"{name}.xml") for name in ("gpu_tests", "smoke_tests")}
    summary = {
        "steps": steps,
        "tests": {k: v for k, v in tests.items() if v is not None},
        "bench": read_benches(out),
        "tuning": read_tuning(out),
    }
    summary["ok"] = bool(steps) and all(s["status"] in ("ok", "skipped") for s in steps)
    return summary


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_markdown(summary: dict) -> str:
    lines = ["# GPU check", "", f"All steps ok: **{'yes' if summary['ok'] else 'no'}**", "",
             "| step | status | exit | seconds | limit s |", "|---|---|---:|---:|---:|"]
    for s in summary["steps"]:
        status = s["status"] + (f" ({s['detail']})" if s.get("detail") else "")
        lines.append(f"| {s['name']} | {status} | {s['rc']} | {s['seconds']:.1f} | {s['limit_s']} |")
    for name, t in summary["tests"].items():
        lines += ["", f"## {name}", ""]
        if "error" in t:
            lines.append(t["error"])
            continue
        lines.append(f"{t['passed']} passed, {t['failures']} failed, {t['errors']} errors, {t['skipped']} skipped "
                     f"of {t['tests']}")
        lines += [f"- {f}" for f in t["failed"][:30]]
    for where, bench in summary["bench"].items():
        lines += ["", f"## {where}", ""]
        if "error" in bench:
            lines.append(bench["error"])
            continue
        ceilings = bench.get("ceilings") or {}
        lines.append(f"{bench['device']} {bench.get('gpu') or ''}, {bench['dtype']}; GEMM "
                     f"{ceilings.get('sgemm_gflops', 0):.0f} GFLOP/s, copy {ceilings.get('copy_gbs', 0):.0f} GB/s")
        for shape in bench["shapes"]:
            lines += ["", f"N,G,K,O = {shape['shape']}", "",
                      "| formulation | status | fwd ms | fwd+bwd ms | note |", "|---|---|---:|---:|---|"]
            for r in shape.get("results", []):
                note = r["message"].replace("|", "/")
                lines.append(f"| {r['name']} | {r['status']} | {_ms(r['forward_ms'])} | "
                             f"{_ms(r['forward_backward_ms'])} | {note} |")
    tuning = summary["tuning"]
    lines += ["", "## tuning", "", tuning.get("error") or f"{tuning['files']} files, {tuning['bytes']} bytes"]
    for name, meta in tuning.get("logs", {}).items():
        lines.append(f"- {name}: {json.dumps(meta)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python3 scripts/gpu_summary.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if not out.is_dir():
        print(f"gpu_summary: {out} is not a directory", file=sys.stderr)
        return 2
    summary = summarise(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    text = format_markdown(summary)
    (out / "summary.md").write_text(text)
    print(text, end="")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
