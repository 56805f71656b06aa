"""Times layout="groups_last" against what a user would write instead, on (B, L, C) series.

For each shape x (B, K, G) -> y (B, O, G) it times, interleaved (one batch of calls of
each formulation per round, so load on the machine hits all alike), the forward pass and
the forward+backward pass (gradients of x, weight and bias) of:

* ``groups_last``: ``grouped_linear(x, w, b, layout="groups_last")``, x and y read and
  written in place;
* ``permute+last``: x permuted to features last (a copy), ``layout="last"``, y permuted
  back to (B, O, G) and made contiguous (a copy);
* ``einsum``: ``torch.einsum("nkg,gok->nog", x, w) + b``.

Every formulation is first checked against a float64 einsum. Prints the median time per
call after warm-up and each one's ratio to ``groups_last``.

    python scripts/groups_last_timing.py [--repeats 21] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time

import torch

from tvmgroup import grouped_linear

SHAPES = [((64, 96, 7), 24), ((32, 336, 21), 96), ((256, 64, 16), 64)]  # x (B, K, G), O


def groups_last(x, w, b):
    return grouped_linear(x, w, b, layout="groups_last")


def permute_last(x, w, b):
    batch, k, g = x.shape
    y = grouped_linear(x.transpose(1, 2).reshape(batch, g * k), w, b, layout="last")
    return y.view(batch, g, -1).transpose(1, 2).contiguous()


def einsum(x, w, b):
    return torch.einsum("nkg,gok->nog", x, w) + b.t()


FORMULATIONS = {"groups_last": groups_last, "permute+last": permute_last, "einsum": einsum}


def _check(fn, x, w, b) -> None:
    want = torch.einsum("nkg,gok->nog", x.double(), w.double()) + b.double().t()
    got = fn(x, w, b)
    err = (got.double() - want).abs().max().item()
    if got.shape != want.shape or err > 1e-3 * (1 + want.abs().max().item()):
        raise SystemExit(f"{fn.__name__}: wrong result (shape {tuple(got.shape)}, error {err:.3e})")


def _timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _calls_for(fn, budget: float = 0.02) -> int:
    once = max(_timed(fn, 3), 1e-6)
    return max(1, int(budget / once))


def run(repeats: int) -> None:
    for (batch, k, g), o in SHAPES:
        torch.manual_seed(0)
        x = torch.randn(batch, k, g)
        w = torch.randn(g, o, k) / k**0.5
        b = torch.randn(g, o)
        gy = torch.randn(batch, o, g)
        steps = {}
        for name, fn in FORMULATIONS.items():
            _check(fn, x, w, b)
            xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))

            def fwd(fn=fn):
                with torch.no_grad():
                    fn(x, w, b)

            def fwd_bwd(fn=fn, xs=xs, ws=ws, bs=bs):
                xs.grad = ws.grad = bs.grad = None
                fn(xs, ws, bs).backward(gy)

            steps[(name, "forward")] = fwd
            steps[(name, "forward+backward")] = fwd_bwd
        calls = {key: _calls_for(step) for key, step in steps.items()}  # also the warm-up
        for step in steps.values():
            _timed(step, 5)
        samples = {key: [] for key in steps}
        for _ in range(repeats):
            for key, step in steps.items():
                samples[key].append(_timed(step, calls[key]))
        print(f"\nx {(batch, k, g)} -> y {(batch, o, g)}  (G={g}, K={k}, O={o}, rows={batch})")
        for phase in ("forward", "forward+backward"):
            base = statistics.median(samples[("groups_last", phase)])
            for name in FORMULATIONS:
                med = statistics.median(samples[(name, phase)])
                print(f"  {phase:17s} {name:13s} {med * 1e6:9.1f} us   {med / base:5.2f}x groups_last")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed rounds per formulation (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    print(f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}, {platform.python_version()}")
    run(args.repeats)


if __name__ == "__main__":
    main()
