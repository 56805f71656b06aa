"""Forked children after the parent ran kernels on several TVM threads."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import os, sys, torch
    from tvmgroup import GroupedLinear
    torch.manual_seed(0)
    layer = GroupedLinear(4, 64, 64)  # large enough for the parallel (not the serial) build
    X = torch.randn(8, 256, 256)

    def ref(x):
        g, o, k = layer.weight.shape
        y = torch.einsum("ngk,gok->ngo", x.double().view(-1, g, k), layer.weight.double()) + layer.bias.double()
        return y.reshape(x.shape[0], g * o)

    class Items(torch.utils.data.Dataset):
        def __len__(self):
            return len(X)

        def __getitem__(self, i):
            with torch.no_grad():
                return i, layer(X[i])

    with torch.no_grad():
        layer(X[0])  # the parent starts its thread pool with TVM_NUM_THREADS threads
    if sys.argv[1] == "fork":
        want = ref(X[1])
        pid = os.fork()
        if pid == 0:
            with torch.no_grad():
                got = layer(X[1])  # torch's thread count as the parent left it
            # GNU OpenMP, which torch runs on, hangs in a forked child whose parent ran a
            # parallel region: torch's own ops need one thread here (DataLoader workers too).
            torch.set_num_threads(1)
            err = (got.double() - want).abs().max().item()
            os._exit(0 if err < 1e-4 else 3)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, status
    else:
        loader = torch.utils.data.DataLoader(Items(), batch_size=2, num_workers=2,
                                             multiprocessing_context="fork")
        worst = 0.0
        for idx, y in loader:
            for j, i in enumerate(idx.tolist()):
                worst = max(worst, (y[j].double() - ref(X[i])).abs().max().item())
        assert worst < 1e-4, worst
    with torch.no_grad():  # the parent still works, with its pool
        assert (layer(X[2]).double() - ref(X[2])).abs().max().item() < 1e-4
    print("OK", os.environ.get("TVM_NUM_THREADS"))
    """
)


def _run_in_own_group(args: list[str], env: dict, timeout: float) -> tuple[int, str, str]:
    """Runs ``args``; on timeout kills its whole process group, so that a hung forked child
    (the failure this file tests for) cannot outlive the test and spin on a core."""
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"timed out after {timeout} s (a forked child hung?): {err[-2000:]}")
    return proc.returncode, out, err


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
@pytest.mark.parametrize("how", ["fork", "dataloader"])
def test_forked_children_run_the_layer(how):
    env = dict(os.environ, TVM_NUM_THREADS="2", TVMGROUP_QUIET="1")
    code, out, err = _run_in_own_group([sys.executable, "-c", SCRIPT, how], env, timeout=300)
    assert code == 0, err[-2000:]
    assert out.strip().splitlines()[-1] == "OK 2"  # the parent kept its threads


@pytest.mark.parametrize("preset", [None, "1"])
def test_tvm_pool_matches_torch_unless_the_user_says(preset):
    code = (
        "import os, torch, tvm, tvmgroup.kernel\n"
        "print(os.environ['TVM_NUM_THREADS'], torch.get_num_threads(), tvm.get_global_func('runtime.NumThreads')())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    if preset is not None:
        env["TVM_NUM_THREADS"] = preset
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    env_value, torch_threads, tvm_threads = out.stdout.split()
    expected = preset or torch_threads
    assert env_value == expected and tvm_threads == expected
