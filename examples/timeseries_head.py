"""A per-channel linear forecaster (one nn.Linear per channel), in plain PyTorch and with tvmgroup.

The model is DLinear with ``individual=True`` (Zeng et al., "Are Transformers Effective for
Time Series Forecasting?", AAAI 2023; public code: github.com/cure-lab/LTSF-Linear): the
input series ``(batch, seq_len, channels)`` is split into a trend (a moving average) and a
seasonal rest, and each channel's trend and seasonal parts go through that channel's own
``nn.Linear(seq_len, pred_len)``, two ``ModuleList`` s of ``channels`` layers looped over in
Python. The output is ``(batch, pred_len, channels)``.

The tvmgroup version replaces each ``ModuleList`` by one ``GroupedLinear(channels, seq_len,
pred_len, layout="groups_last")``, which takes the series as it is: ``(..., K, G)`` with K the
time steps and G the channels. Run ``python examples/timeseries_head.py`` to compare the two on random data,
``--time`` to time a forward and backward pass of each.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from tvmgroup import GroupedLinear

from example_timing import forward_backward_seconds  # examples/example_timing.py, beside this script


class MovingAverage(nn.Module):
    """The trend: a moving average along time, the ends padded by repeating the edge values."""

    def __init__(self, kernel_size: int = 25) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.pool = nn.AvgPool1d(kernel_size, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, L, C)
        front = x[:, :1, :].expand(-1, (self.kernel_size - 1) // 2, -1)
        end = x[:, -1:, :].expand(-1, self.kernel_size // 2, -1)
        padded = torch.cat([front, x, end], dim=1)
        return self.pool(padded.transpose(1, 2)).transpose(1, 2)


class DLinear(nn.Module):
    """The original: a Linear per channel for each of the two components."""

    def __init__(self, seq_len: int, pred_len: int, channels: int, kernel_size: int = 25) -> None:
        super().__init__()
        self.channels, self.pred_len = channels, pred_len
        self.trend = MovingAverage(kernel_size)
        self.seasonal_heads = nn.ModuleList([nn.Linear(seq_len, pred_len) for _ in range(channels)])
        self.trend_heads = nn.ModuleList([nn.Linear(seq_len, pred_len) for _ in range(channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, pred_len, C)
        trend = self.trend(x)
        seasonal, trend = (x - trend).transpose(1, 2), trend.transpose(1, 2)  # (B, C, L)
        out = x.new_zeros(x.shape[0], self.channels, self.pred_len)
        for c in range(self.channels):
            out[:, c, :] = self.seasonal_heads[c](seasonal[:, c, :]) + self.trend_heads[c](trend[:, c, :])
        return out.transpose(1, 2)


class GroupedDLinear(nn.Module):
    """The same model with one ``GroupedLinear`` (groups = channels) per component, in the
    groups-innermost layout: it reads the ``(B, L, C)`` series and writes ``(B, pred_len, C)``
    as they are, with no transpose or copy around it."""

    def __init__(self, seq_len: int, pred_len: int, channels: int, kernel_size: int = 25) -> None:
        super().__init__()
        self.channels, self.pred_len = channels, pred_len
        self.trend = MovingAverage(kernel_size)
        self.seasonal_heads = GroupedLinear(channels, seq_len, pred_len, layout="groups_last")
        self.trend_heads = GroupedLinear(channels, seq_len, pred_len, layout="groups_last")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, L, C) -> (B, pred_len, C)
        trend = self.trend(x)
        return self.seasonal_heads(x - trend) + self.trend_heads(trend)

    @classmethod
    def from_original(cls, model: DLinear) -> "GroupedDLinear":
        """A port computing what ``model`` computes, with a copy of its parameters."""
        first = model.seasonal_heads[0]
        port = cls(first.in_features, first.out_features, model.channels, model.trend.kernel_size)
        port = port.to(device=first.weight.device, dtype=first.weight.dtype)
        port.load_state_dict(ported_state(model))
        return port


def ported_state(model: DLinear) -> dict[str, torch.Tensor]:
    """The original's parameters (or anything shaped like them) as the port's state dict:
    each ModuleList's weights and biases stacked, ``(C, pred_len, seq_len)`` and ``(C, pred_len)``."""
    state = {}
    for name in ("seasonal_heads", "trend_heads"):
        heads = getattr(model, name)
        state[f"{name}.weight"] = torch.stack([h.weight.detach() for h in heads])
        state[f"{name}.bias"] = torch.stack([h.bias.detach() for h in heads])
    return state


def forecast_loss(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (model(x) - target).pow(2).mean()


# ---------------------------------------------------------------------------------------------
# timing (run by hand with --time; tests only check that it runs)


def time_forward_backward(
    batch: int = 32, seq_len: int = 336, pred_len: int = 96, channels: int = 21, calls: int = 20, warmup: int = 3
) -> dict[str, float]:
    """Median seconds of a forward and backward pass (MSE loss) of the original and the
    tvmgroup model, after ``warmup`` calls. The defaults are the Weather data set's sizes."""
    original = DLinear(seq_len, pred_len, channels)
    models = {"original": original, "tvmgroup": GroupedDLinear.from_original(original)}
    x, target = torch.randn(batch, seq_len, channels), torch.randn(batch, pred_len, channels)
    return forward_backward_seconds(models, lambda model: forecast_loss(model, x, target), calls, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="time both formulations (real sizes)")
    args = parser.parse_args()
    torch.manual_seed(0)
    original = DLinear(seq_len=48, pred_len=12, channels=7)
    port = GroupedDLinear.from_original(original)
    x = torch.randn(8, 48, 7)
    err = (original(x) - port(x)).abs().max().item()
    print(f"largest difference of the forecasts: {err:.3e}")
    if args.time:
        for name, seconds in time_forward_backward().items():
            print(f"{name:>9}: {seconds * 1e3:.3f} ms per forward + backward")


if __name__ == "__main__":
    main()
