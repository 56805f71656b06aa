"""An ensemble critic with a gradient diversity loss, in plain PyTorch and with tvmgroup.

The model is the Q-ensemble of EDAC (An et al., "Uncertainty-Based Offline Reinforcement
Learning with Diversified Q-Ensemble", NeurIPS 2021) as written in public implementations
such as CORL (github.com/tinkoff-ai/CORL, ``algorithms/offline/edac.py``): E critics of
4 layers (hidden 256), each layer a "vectorized linear" whose weight is ``(E, in, out)`` and
whose input is ``(E, batch, in)``, computed as ``x @ weight + bias``. Its diversity loss
penalises aligned action gradients of the members, ``dQ_i/da``, which are made with
``create_graph=True`` and then differentiated into the parameters: a double backward.

The tvmgroup version makes each layer one ``GroupedLinear(E, in, out, layout="ensemble",
weight_layout="in_out", bias_layout="broadcast")``: the same input ``(E, batch, in)``, the same
parameters, stored as the original stores them (its checkpoints load as they are). Run ``python examples/ensemble_critic.py`` to compare the two on
random data, ``--time`` to time one critic update (forward, diversity loss, backward) of
each.
"""

from __future__ import annotations

import argparse
import math

import torch
from torch import nn

from tvmgroup import GroupedLinear

from example_timing import forward_backward_seconds  # examples/example_timing.py, beside this script


# ---------------------------------------------------------------------------------------------
# the original formulation


class VectorizedLinear(nn.Module):
    """E linear layers applied to E inputs at once: ``(E, B, in) -> (E, B, out)``."""

    def __init__(self, in_features: int, out_features: int, members: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, in_features, out_features))
        self.bias = nn.Parameter(torch.empty(members, 1, out_features))
        for i in range(members):  # each member as nn.Linear would be
            nn.init.kaiming_uniform_(self.weight[i].T, a=math.sqrt(5))
        nn.init.uniform_(self.bias, -1 / math.sqrt(in_features), 1 / math.sqrt(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class VectorizedCritic(nn.Module):
    """E Q-networks Q_i(s, a); returns ``(E, batch)``."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, members: int = 10) -> None:
        super().__init__()
        self.members = members
        self.layers = nn.ModuleList([
            VectorizedLinear(state_dim + action_dim, hidden, members),
            VectorizedLinear(hidden, hidden, members),
            VectorizedLinear(hidden, hidden, members),
            VectorizedLinear(hidden, 1, members),
        ])
        with torch.no_grad():  # EDAC's initialisation
            for layer in self.layers[:-1]:
                layer.bias.fill_(0.1)
            self.layers[-1].weight.uniform_(-3e-3, 3e-3)
            self.layers[-1].bias.uniform_(-3e-3, 3e-3)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([state, action], dim=-1)
        if x.dim() == 2:  # one (s, a) batch for every member
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x).squeeze(-1)


# ---------------------------------------------------------------------------------------------
# the tvmgroup formulation


def _ensemble_layer(members: int, in_features: int, out_features: int) -> GroupedLinear:
    """A ``VectorizedLinear`` as one ``GroupedLinear``: ``(E, B, in) -> (E, B, out)``, weight
    ``(E, in, out)`` and bias ``(E, 1, out)`` as the original keeps them."""
    return GroupedLinear(
        members, in_features, out_features, layout="ensemble", weight_layout="in_out", bias_layout="broadcast"
    )


class GroupedCritic(nn.Module):
    """The same ensemble with one ``GroupedLinear`` per layer (groups = members)."""

    def __init__(self, state_dim: int, action_dim: int, hidden: int = 256, members: int = 10) -> None:
        super().__init__()
        self.members = members
        self.layers = nn.ModuleList([
            _ensemble_layer(members, state_dim + action_dim, hidden),
            _ensemble_layer(members, hidden, hidden),
            _ensemble_layer(members, hidden, hidden),
            _ensemble_layer(members, hidden, 1),
        ])

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([state, action], dim=-1)
        if x.dim() == 2:  # one (s, a) batch for every member: an expanded view (stride 0), read
            x = x.unsqueeze(0).expand(self.members, -1, -1)  # in place by the ensemble kernels
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x).squeeze(-1)

    @classmethod
    def from_original(cls, critic: VectorizedCritic) -> "GroupedCritic":
        """A port computing what ``critic`` computes, with a copy of its parameters."""
        first = critic.layers[0].weight
        members, in_features, hidden = first.shape
        port = cls(in_features, 0, hidden, members).to(device=first.device, dtype=first.dtype)  # only the sum counts
        port.load_state_dict(ported_state(critic))
        return port


def ported_state(critic: VectorizedCritic) -> dict[str, torch.Tensor]:
    """The original's parameters (or anything shaped like them) as the port's state dict: the
    same names and shapes, taken as they are."""
    return {name: value.detach() for name, value in critic.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# the losses (the same code drives both critics)


def diversity_loss(critic: nn.Module, state: torch.Tensor, action: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """EDAC's ensemble-gradient diversity: the mean pairwise cosine similarity of the members'
    action gradients dQ_i/da (each member differentiated at its own copy of the actions)."""
    members = critic.members
    state = state.unsqueeze(0).expand(members, -1, -1)
    action = action.unsqueeze(0).repeat(members, 1, 1).requires_grad_(True)
    q = critic(state, action)  # (E, B)
    (grads,) = torch.autograd.grad(q.sum(), action, create_graph=True)  # (E, B, A)
    grads = grads / (grads.norm(dim=2, keepdim=True) + eps)
    grads = grads.transpose(0, 1)  # (B, E, A)
    similarity = grads @ grads.transpose(1, 2)  # (B, E, E)
    off_diagonal = 1 - torch.eye(members, dtype=similarity.dtype, device=similarity.device)
    return (similarity * off_diagonal).sum(dim=(1, 2)).mean() / (members - 1)


def critic_loss(critic, state, action, target_q, eta: float = 1.0) -> torch.Tensor:
    """TD regression of every member to ``target_q`` plus ``eta`` times the diversity loss."""
    q = critic(state, action)
    return (q - target_q[None]).pow(2).mean(dim=1).sum() + eta * diversity_loss(critic, state, action)


# ---------------------------------------------------------------------------------------------
# timing (run by hand with --time; tests only check that it runs)


def time_forward_backward(
    members: int = 10, hidden: int = 256, batch: int = 256, state_dim: int = 17, action_dim: int = 6,
    calls: int = 20, warmup: int = 3,
) -> dict[str, float]:
    """Median seconds of one critic update's forward and backward (diversity loss included)
    for the original and the tvmgroup critic, after ``warmup`` calls."""
    original = VectorizedCritic(state_dim, action_dim, hidden, members)
    models = {"original": original, "tvmgroup": GroupedCritic.from_original(original)}
    state, action, target = torch.randn(batch, state_dim), torch.randn(batch, action_dim), torch.randn(batch)
    return forward_backward_seconds(models, lambda model: critic_loss(model, state, action, target), calls, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", action="store_true", help="time both formulations (real sizes)")
    args = parser.parse_args()
    torch.manual_seed(0)
    original = VectorizedCritic(11, 3, hidden=64, members=5)
    port = GroupedCritic.from_original(original)
    state, action, target = torch.randn(32, 11), torch.randn(32, 3), torch.randn(32)
    losses = [critic_loss(m, state, action, target) for m in (original, port)]
    print(f"critic loss: original {losses[0].item():.6f}, tvmgroup {losses[1].item():.6f}")
    if args.time:
        for name, seconds in time_forward_backward().items():
            print(f"{name:>9}: {seconds * 1e3:.3f} ms per update (forward + backward)")


if __name__ == "__main__":
    main()
