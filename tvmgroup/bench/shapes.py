"""Benchmark shapes (N rows, G groups, K -> O features) and their work and traffic counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass

BYTES_PER_ELEMENT = 4  # float32


@dataclass(frozen=True)
class Shape:
    """``n`` rows, ``groups`` groups of ``in_features`` -> ``out_features``; in the default
    layout ``x`` is ``(n, groups*in_features)`` and ``y`` ``(n, groups*out_features)``
    (:mod:`tvmgroup.bench.inputs` has the others)."""

    n: int
    groups: int
    in_features: int
    out_features: int

    @property
    def label(self) -> str:
        return f"N={self.n} G={self.groups} K={self.in_features} O={self.out_features}"

    @property
    def short(self) -> str:
        return f"{self.n},{self.groups},{self.in_features},{self.out_features}"

    def flops(self, backward: bool) -> int:
        """Forward: one multiply-add per (row, group, in, out); backward adds grad_x and grad_W."""
        forward = 2 * self.n * self.groups * self.in_features * self.out_features
        return 3 * forward if backward else forward

    def bytes_moved(self, backward: bool, element_size: int = BYTES_PER_ELEMENT, x_elements: int | None = None) -> int:
        """Bytes if every tensor is read or written exactly once (the memory floor's traffic).

        Forward: x, W, b read, y written. Forward+backward adds grad_y read and grad_x, grad_W,
        grad_b written (x and W count once although the backward pass reads them again).
        ``x_elements``: the size of x (and grad_x) where it is not ``N*G*K`` (one input read by
        every group is ``N*K``).
        """
        n, g, k, o = self.n, self.groups, self.in_features, self.out_features
        x, y, w, b = n * g * k if x_elements is None else x_elements, n * g * o, g * o * k, g * o
        elements = x + y + w + b
        if backward:
            elements += y + x + w + b  # grad_y, grad_x, grad_W, grad_b
        return elements * element_size

    def to_dict(self) -> dict:
        return asdict(self)


# Shapes from real use. Group counts near 100 with small groups are where nn.Conv1d(groups=G)
# is slowest relative to the work it does; the last four are layers of real models, where
# PyTorch's batched GEMM is at its best.
DEFAULT_SHAPES: tuple[Shape, ...] = (
    Shape(4096, 32, 64, 64),
    Shape(4096, 8, 100, 100),
    Shape(1024, 100, 16, 16),
    Shape(4096, 96, 16, 16),
    Shape(2048, 100, 32, 32),
    Shape(256, 10, 256, 256),  # ensemble critic: 10 members, hidden 256, batch 256
    Shape(256, 7, 200, 200),  # dynamics-model ensemble: 7 members, hidden 200
    Shape(768, 5, 512, 512),  # ensemble with hidden 512, batch 768
    Shape(512, 4, 384, 384),  # block-diagonal MLP: 4 blocks of a 1536-wide layer
)

# On a GPU the CPU set leaves most of the chip idle; these fill it (N = 65536 rows), the last
# three at the sizes of real models: an ensemble critic at a large batch, a per-channel head
# of a time-series model (a batch of 4096, 321 channels, 96 steps -> 96) and an equal-capacity MoE layer.
GPU_SHAPES: tuple[Shape, ...] = (
    Shape(65536, 8, 32, 32),
    Shape(65536, 8, 64, 64),
    Shape(65536, 8, 128, 128),
    Shape(65536, 10, 256, 256),
    Shape(4096, 321, 96, 96),
    Shape(16384, 8, 512, 1024),
)

DEFAULT_SHAPES_BY_DEVICE: dict[str, tuple[Shape, ...]] = {
    "cpu": DEFAULT_SHAPES,
    "cuda": DEFAULT_SHAPES + GPU_SHAPES,
}

# Keeps a mistyped shape from allocating the machine's whole memory.
MAX_ELEMENTS = 1 << 28


_COUNTS = {2: "two", 3: "three", 4: "four", 5: "five"}


def parse_positive_ints(text: str, names: tuple[str, ...], option: str) -> list[int]:
    """Parses comma-separated positive integers, one per name; ValueErrors say what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != len(names):
        raise ValueError(
            f"{option} expects {','.join(names)} ({_COUNTS.get(len(names), len(names))} comma-separated integers), "
            f"got {text!r}"
        )
    values = []
    for name, part in zip(names, parts):
        try:
            value = int(part)
        except ValueError:
            raise ValueError(f"{option} {text!r}: {name} must be an integer, got {part!r}") from None
        if value < 1:
            raise ValueError(f"{option} {text!r}: {name} must be positive, got {value}")
        values.append(value)
    return values


def parse_shape(text: str) -> Shape:
    """Parses ``N,G,K,O`` (four positive integers); raises ValueError saying what is wrong."""
    shape = Shape(*parse_positive_ints(text, ("N", "G", "K", "O"), "--shape"))
    largest = shape.n * shape.groups * max(shape.in_features, shape.out_features)
    if largest > MAX_ELEMENTS:
        raise ValueError(
            f"--shape {text!r} is too large: an activation of {largest} elements (limit {MAX_ELEMENTS})"
        )
    return shape
