"""A block-diagonal MLP (4 blocks), in plain PyTorch and with tvmgroup.

The model follows the packed MLP of Packed-Ensembles (Laurent et al., "Packed-Ensembles for
Efficient Uncertainty Estimation", ICLR 2023; public code: the torch-uncertainty library),
whose layers are block-diagonal: M = 4 independent sub-networks packed in one network, each
layer a grouped 1x1 convolution ``nn.Conv1d(M*in, M*out, kernel_size=1, groups=M)`` applied
to the features seen as ``(batch, M*in, 1)``. Every block sees the whole input; the output
is ``(batch, M, classes)``, one prediction per block.

The tvmgroup version makes each layer one ``GroupedLinear(M, in, out)``: the first with
``layout="shared"``, which reads the one input ``(batch, in)`` for every block (no repeat),
the others with ``layout="ensemble"`` on ``(M, batch, features)``: no reshape to a length-1
sequence. Run
``python examples/block_diagonal_mlp.py`` to compare the two on random data, ``--time`` to
time a forward and backward pass of each.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from tvmgroup import GroupedLinear

from example_timing import forward_backward_seconds  # examples/example_timing.py, beside this script


class PackedMLP(nn.Module):
    """The original: block-diagonal layers as grouped 1x1 convolutions."""

    def __init__(self, in_features: int, hidden: int, classes: int, blocks: int = 4) -> None:
        super().__init__()
        self.blocks, self.classes = blocks, classes
        sizes = [in_features, hidden, hidden, classes]
        self.layers = nn.ModuleList(
            [nn.Conv1d(blocks * i, blocks * o, kernel_size=1, groups=blocks) for i, o in zip(sizes, sizes[1:])]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, blocks, classes)
        h = x.repeat(1, self.blocks).unsqueeze(-1)  # (B, blocks*in, 1)
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))
        return self.layers[-1](h).view(x.shape[0], self.blocks, self.classes)


class GroupedMLP(nn.Module):
    """The same model with one ``GroupedLinear`` (groups = blocks) per layer, blocks first."""

    def __init__(self, in_features: int, hidden: int, classes: int, blocks: int = 4) -> None:
        super().__init__()
        self.blocks, self.classes = blocks, classes
        sizes = [in_features, hidden, hidden, classes]
        layouts = ["shared"] + ["ensemble"] * (len(sizes) - 2)  # (B, in) -> (blocks, B, hidden) -> ...
        self.layers = nn.ModuleList(
            [GroupedLinear(blocks, i, o, layout=lay) for i, o, lay in zip(sizes, sizes[1:], layouts)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, in) -> (B, blocks, classes)
        h = x  # read by every block in place
        for layer in self.layers[:-1]:
            h = torch.relu(layer(h))
        return self.layers[-1](h).transpose(0, 1)  # (blocks, B, classes) -> (B, blocks, classes)

    @classmethod
    def from_original(cls, model: PackedMLP) -> "GroupedMLP":
        """A port computing what ``model`` computes, with a copy of its parameters."""
        convs = model.layers
        blocks = model.blocks
        in_features, hidden = convs[0].in_channels // blocks, convs[0].out_channels // blocks
        port = cls(in_features, hidden, model.classes, blocks)
        port = port.to(device=convs[0].weight.device, dtype=convs[0].weight.dtype)
        port.load_state_dict(ported_state(model))
        return port


def ported_state(model: PackedMLP) -> dict[str, torch.Tensor]:
    """The original's parameters (or anything shaped like them) as the port's state dict: a
    grouped convolution's weight ``(M*out, in, 1)`` is ``(M, out, in)`` in the same order."""
    state = {}
    for i, conv in enumerate(model.layers):
        blocks = model.blocks
        state[f"layers.{i}.weight"] = conv.weight.detach().reshape(blocks, conv.out_channels // blocks, -1)
        state[f"layers.{i}.bias"] = conv.bias.detach().reshape(blocks, -1)
    return state


def classification_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each block trained on the labels, as the sub-networks of a packed ensemble are."""
    logits = model(x)
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.repeat_interleave(model.blocks))


# ---------------------------------------------------------------------------------------------
# timing (run by hand with --time; tests only check that it runs)


def time_forward_backward(
    batch: int = 512, in_features: int = 64, hidden: int = 256, classes: int = 10, blocks: int = 4,
    calls: int = 20, warmup: int = 3,
) -> dict[str, float]:
    """Median seconds of a forward and backward pass (cross-entropy loss) of the original and
    the tvmgroup model, after ``warmup`` calls."""
    original = PackedMLP(in_features, hidden, classes, blocks)
    models = {"original": original, "tvmgroup": GroupedMLP.from_original(original)}
    x, labels = torch.randn(batch, in_features), torch.randint(classes, (batch,))
    return forward_backward_seconds(models, lambda model: classification_loss(model, x, labels), calls, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="time both formulations (real sizes)")
    args = parser.parse_args()
    torch.manual_seed(0)
    original = PackedMLP(in_features=20, hidden=32, classes=5)
    port = GroupedMLP.from_original(original)
    x = torch.randn(16, 20)
    err = (original(x) - port(x)).abs().max().item()
    print(f"largest difference of the logits: {err:.3e}")
    if args.time:
        for name, seconds in time_forward_backward().items():
            print(f"{name:>9}: {seconds * 1e3:.3f} ms per forward + backward")


if __name__ == "__main__":
    main()
