"""tvmgroup: grouped (block-diagonal) linear layers for PyTorch with TVM-generated kernels."""

from tvmgroup.functional import grouped_linear
from tvmgroup.layer import GroupedLinear
from tvmgroup.lookup import UntunedShapeWarning, schedule_info

__version__ = "0.1.0"
__all__ = ["GroupedLinear", "grouped_linear", "schedule_info", "UntunedShapeWarning", "__version__"]
