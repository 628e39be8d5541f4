"""flashsae: Triton kernels for million-feature TopK sparse autoencoders."""
from . import analysis, linalg, ops, optim
from .sae import asi
from .sae.architecture import Architecture
from .sae.model import SAEOutput, TopKSAE

__all__ = ["ops", "optim", "linalg", "analysis", "asi", "TopKSAE", "SAEOutput", "Architecture"]
__version__ = "0.1.0"
