"""A full sparse training step of an F = 2^18 SAE never allocates an F x d tensor; the dense one does."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from flashsae import TopKSAE
from flashsae.kernels import torch_encode
from flashsae.kernels.registry import get_backend, override_backend
from flashsae.optim import SparseAdam
from flashsae.rowgrad import RowGrad
from flashsae.sae.trainer import Trainer

F, D, K, B = 1 << 18, 64, 4, 8


class AllocationRecorder(TorchDispatchMode):
    """Records, for every op run inside the block, how many elements its outputs newly allocated.

    An output whose storage is one of the op's inputs' (a view, an in-place or out= op, ``set_``
    onto a given storage) allocated nothing; a sparse COO or CSR output counts its indices and values, a
    `RowGrad` the new tensors of its parts. ``largest`` is (elements, op name).
    """

    def __init__(self) -> None:
        super().__init__()
        self.largest: tuple[int, str] = (0, "")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _plain_tensors(tree_flatten((args, kwargs))[0])
        known = {_storage_ptr(t) for t in inputs if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        known |= {t.data_ptr() for t in inputs if isinstance(t, (torch.UntypedStorage, torch.TypedStorage))}
        out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            if t.is_sparse:
                n = t._indices().numel() + t._values().numel()
            elif t.layout == torch.sparse_csr:
                n = t.crow_indices().numel() + t.col_indices().numel() + t.values().numel()
            elif isinstance(t, RowGrad):
                n = sum(p.numel() for p in _plain_tensors([t]) if _storage_ptr(p) not in known)
            elif _storage_ptr(t) in known:
                continue
            else:
                n = t.untyped_storage().nbytes() // t.element_size()
            if n > self.largest[0]:
                self.largest = (n, str(func))
        return out


def _plain_tensors(items: list) -> list:
    """``items`` with every `RowGrad` replaced by the tensors of its parts."""
    return [x for item in items for x in (
        [t for part in item.parts for t in part] if isinstance(item, RowGrad) else [item])]


def _storage_ptr(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def largest_allocation_of_second_step(sparse_grad: bool, backend: str) -> tuple[int, str]:
    """The largest allocation of the product step (`Trainer.step`) once the optimizer moments exist."""
    g = torch.Generator().manual_seed(0)
    sae = TopKSAE(D, F, K, backend=backend, sparse_grad=sparse_grad)
    sae.reset_parameters(generator=g)
    if sparse_grad:
        opt = SparseAdam(sae.parameters(), lr=1e-3, backend=backend, unit_norm=[sae.W_dec])
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    trainer = Trainer(sae, opt)
    trainer.step(torch.randn(B, D, generator=g))  # creates the optimizer moments
    x = torch.randn(B, D, generator=g)
    with AllocationRecorder() as rec:
        trainer.step(x)
    return rec.largest


@pytest.fixture
def torch_encoder_forward():
    """The interpreter cannot sweep 2^18 features in test time: the Triton variant keeps the torch
    encoder forward (it allocates O(B * chunk)) and runs every sparse part through Triton."""
    triton = get_backend("triton", "cpu")
    with override_backend("triton", dataclasses.replace(triton, topk_encode=torch_encode.topk_encode)):
        yield


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sparse_training_step_never_allocates_f_by_d(backend, torch_encoder_forward):
    n, op = largest_allocation_of_second_step(sparse_grad=True, backend=backend)
    assert n < F * D, f"{op} allocated {n} elements >= F * d = {F * D}"


def test_dense_training_step_is_caught_allocating_f_by_d():
    """The detector works: the dense-gradient step (dense grads + torch Adam) allocates F x d tensors."""
    n, op = largest_allocation_of_second_step(sparse_grad=False, backend="torch")
    assert n >= F * D, f"expected an F x d allocation, largest was {n} ({op})"
