"""flashsae: Triton kernels for million-feature TopK sparse autoencoders."""
from . import ops
from .sae.model import SAEOutput, TopKSAE

__all__ = ["ops", "TopKSAE", "SAEOutput"]
__version__ = "0.1.0"
