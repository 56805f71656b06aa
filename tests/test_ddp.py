"""Data-parallel training: tvmgroup layers under DistributedDataParallel (gloo, 2 processes on
127.0.0.1) end with the parameters of a single process trained on the same global batch.

The ranks meet through a file store (no TCP store server living in one rank) and pass a
barrier before tearing the group down, so neither rank destroys its half of the group while
the other still talks to it.
"""

from __future__ import annotations

import time

import pytest
import torch

from tvmgroup import GroupedLinear

STEPS = 4
GLOBAL_BATCH = 16
WORLD = 2
TIMEOUT_S = 240


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(6, 16), GroupedLinear(4, 4, 4), torch.nn.Tanh(), GroupedLinear(2, 8, 3),
    )


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(STEPS, GLOBAL_BATCH, 6, generator=gen), torch.randn(STEPS, GLOBAL_BATCH, 6, generator=gen)


def _train(model: torch.nn.Module, xs: torch.Tensor, ys: torch.Tensor) -> None:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for x, y in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()  # mean over this process's rows
        opt.step()


def _worker(rank: int, store: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        model = torch.nn.parallel.DistributedDataParallel(_model())
        xs, ys = _data()
        share = GLOBAL_BATCH // WORLD
        # DDP averages the ranks' gradients: the mean over the global batch.
        _train(model, xs[:, rank * share:(rank + 1) * share], ys[:, rank * share:(rank + 1) * share])
        if rank == 0:
            torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, out)
        del model  # drops the reducer's hold on the group, so destroy_process_group frees it
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_matches_one_process_on_the_global_batch(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    monkeypatch.setenv("TVMGROUP_QUIET", "1")
    out = tmp_path / "ddp.pt"
    store = tmp_path / "store"
    context = mp.start_processes(_worker, args=(str(store), str(out)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=1):
            assert time.monotonic() < deadline, f"DDP workers did not finish in {TIMEOUT_S} s"
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
                process.join(10)

    single = _model()
    start = {k: v.detach().clone() for k, v in single.state_dict().items()}
    _train(single, *_data())
    ddp = torch.load(out)
    assert set(ddp) == set(start)
    for name, value in single.state_dict().items():
        assert not torch.equal(value, start[name]), f"{name} did not train"
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
