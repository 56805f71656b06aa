"""tvmgroup: grouped (block-diagonal) linear layers for PyTorch with TVM-generated kernels."""

from tvmgroup.functional import grouped_linear
from tvmgroup.layer import GroupedLinear

__version__ = "0.1.0"
__all__ = ["GroupedLinear", "grouped_linear", "__version__"]
