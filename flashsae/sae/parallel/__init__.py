"""Training on several processes (torchrun): the process group and the strategies the one step is given.

- `process_group`: joining torchrun's group; rank/world helpers.
- `strategy`: `SingleProcess`, the base every strategy refines, and `make_strategy`.
- `data`: `DataParallel` (each rank a slice of every batch; gradients summed over ranks).
- `feature`: `FeatureParallel` and `FeatureParallelSAE` (each rank a slice of the dictionary).
"""
from .data import DataParallel
from .feature import FeatureParallel, FeatureParallelSAE, feature_split
from .process_group import DistInfo, init_distributed
from .strategy import STRATEGIES, SingleProcess, make_strategy

__all__ = [
    "DataParallel", "DistInfo", "FeatureParallel", "FeatureParallelSAE", "STRATEGIES", "SingleProcess",
    "feature_split", "init_distributed", "make_strategy",
]
