"""AuxK's dead-feature top-k from the main encoder pass: the encoders, the op, its gradients, the step.

The folded auxiliary selection must equal the masked selection (`topk_encode` with ``mask=dead``)
exactly, on every backend and dtype, with ties, short rows, no dead feature and every feature dead;
the main selection must not change. A training step with AuxK on must match the two-pass formulation
(a second, masked encoder pass) computed in float64 by dense autograd, and run one encoder GEMM.
"""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flashsae import TopKSAE, ops
from flashsae.kernels import chunked_encode, torch_encode
from flashsae.kernels.registry import get_backend
from flashsae.rowgrad import RowGrad
from flashsae.sae.architecture import Architecture
from flashsae.sae.trainer import Trainer
from tests.encoder_checks import (
    BF16, FP16, FP32, FP64, assert_exact_topk, assert_reference_order, make_dyadic_inputs, make_inputs,
)
from tests.grads import touched_rows
from tests.oracles import UNFOLDED_TORCH, unfolded_torch

# Each folding backend's encoder pair, called directly: (with_aux, plain).
FOLDED = {
    "torch": (torch_encode.topk_encode_with_aux, torch_encode.topk_encode),
    "torch-static": (functools.partial(torch_encode.topk_encode_with_aux, static=True),
                     functools.partial(torch_encode.topk_encode, static=True)),
    "triton": (functools.partial(chunked_encode.topk_encode_with_aux, poison=True),
               functools.partial(chunked_encode.topk_encode, poison=True)),
}
# (B, d, F, k, aux_k, dtype): odd shapes, every dtype.
CASES = [
    (7, 40, 1000, 5, 32, FP32),
    (13, 33, 2051, 32, 64, BF16),
    (3, 40, 777, 5, 9, FP16),
    (1, 16, 100, 1, 100, FP32),
    (9, 24, 1500, 37, 20, FP64),
]


def dead_mask(n_features: int, fraction: float, seed: int) -> torch.Tensor:
    return torch.rand(n_features, generator=torch.Generator().manual_seed(seed)) < fraction


def masked(b: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    return b.masked_fill(~dead, float("-inf"))


def assert_folded_equals_masked(backend, x, W, b, b_pre, k, aux_k, dead, **options):
    """The folded pair equals the plain top-k and the masked top-aux_k of the same backend, bit for bit."""
    with_aux, plain = FOLDED[backend]
    vals, idx, aux_vals, aux_idx = with_aux(x, W, b, k, aux_k, dead, b_pre, **options)
    ref_vals, ref_idx = plain(x, W, b, k, b_pre, **options)
    ref_aux_vals, ref_aux_idx = plain(x, W, masked(b, dead), aux_k, b_pre, **options)
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals), "the main selection changed"
    assert aux_vals.dtype == x.dtype and aux_idx.dtype == torch.int64 and aux_idx.shape == (x.shape[0], aux_k)
    assert torch.equal(aux_idx, ref_aux_idx), f"{(aux_idx != ref_aux_idx).sum()} aux slots differ"
    assert torch.equal(aux_vals, ref_aux_vals)
    return vals, idx, aux_vals, aux_idx


@pytest.mark.parametrize("backend,B,d,F,k,aux_k,dtype", [
    (backend, *case) for backend in FOLDED for case in CASES if not (backend == "triton" and case[-1] == FP64)
])  # the Triton encoders take no float64
def test_folded_aux_selection_equals_the_masked_selection(backend, B, d, F, k, aux_k, dtype):
    x, W, b, b_pre = make_inputs(B, d, F, dtype, seed=B + d + F)
    dead = dead_mask(F, 0.3, seed=F)
    _, _, aux_vals, aux_idx = assert_folded_equals_masked(backend, x, W, b, b_pre, k, aux_k, dead)
    assert_exact_topk(aux_vals, aux_idx, x, W, masked(b, dead), b_pre, aux_k)
    fired = aux_vals > 0
    assert dead[aux_idx[fired]].all(), "a live feature fired in the aux selection"


@pytest.mark.parametrize("backend", FOLDED)
@pytest.mark.parametrize("dtype", [FP32, BF16, FP16])
def test_folded_aux_selection_with_ties_is_the_float64_reference(backend, dtype):
    """Dyadic inputs (exact pre-activations, many ties) across chunks and slices: ties to the lower index."""
    x, W, b, b_pre = make_dyadic_inputs(9, 24, 1500, dtype, seed=5)
    twins = [3, 130, 600, 1100, 1499]
    W[twins] = W[twins[0]].clone()
    b[twins] = 100.0
    dead = dead_mask(1500, 0.4, seed=2)
    dead[twins] = True
    dead[600] = False  # a live twin: in the main selection, never in the aux one
    options = {"torch": {"chunk_size": 97}, "torch-static": {"chunk_size": 97}, "triton": {"n_slices": 5}}[backend]
    vals, idx, aux_vals, aux_idx = assert_folded_equals_masked(backend, x, W, b, b_pre, 11, 23, dead, **options)
    assert_reference_order(aux_vals, aux_idx, x, W, masked(b, dead), b_pre, 23)
    assert torch.equal(aux_idx[:, :4], torch.tensor([3, 130, 1100, 1499]).expand(9, 4))
    assert torch.equal(idx[:, :5], torch.tensor(twins).expand(9, 5))


@pytest.mark.parametrize("backend", FOLDED)
def test_rows_short_of_positive_dead_features_fill_zeros_at_the_lowest_unchosen_indices(backend):
    B, d, F, k, aux_k = 5, 16, 1000, 4, 8
    x, W, b, _ = make_inputs(B, d, F, FP32, seed=5)
    W = W * 0.01
    b = torch.full((F,), -10.0)
    b[[700, 2, 5, 6]] = torch.tensor([5.0, 3.0, 4.0, 2.0])
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[700, 6, 900]] = True  # two positive dead features, one dead at -10
    _, _, aux_vals, aux_idx = assert_folded_equals_masked(backend, x, W, b, None, k, aux_k, dead)
    assert torch.equal(aux_idx, torch.tensor([700, 6, 0, 1, 2, 3, 4, 5]).expand(B, aux_k))
    assert (aux_vals[:, :2] > 0).all() and (aux_vals[:, 2:] == 0).all() and not torch.signbit(aux_vals).any()


@pytest.mark.parametrize("backend", FOLDED)
def test_no_dead_feature_and_every_feature_dead(backend):
    x, W, b, b_pre = make_dyadic_inputs(7, 16, 700, FP32, seed=3)
    none = torch.zeros(700, dtype=torch.bool)
    vals, idx, aux_vals, aux_idx = assert_folded_equals_masked(backend, x, W, b, b_pre, 9, 30, none)
    assert torch.equal(aux_idx, torch.arange(30).expand(7, 30)) and (aux_vals == 0).all()
    every = torch.ones(700, dtype=torch.bool)
    vals, idx, aux_vals, aux_idx = assert_folded_equals_masked(backend, x, W, b, b_pre, 9, 30, every)
    assert torch.equal(aux_idx[:, :9], idx) and torch.equal(aux_vals[:, :9], vals)
    assert_reference_order(aux_vals, aux_idx, x, W, b, b_pre, 30)


@pytest.mark.parametrize("backend", FOLDED)
def test_no_tokens_give_empty_aux_outputs(backend):
    x, W, b, b_pre = make_inputs(0, 16, 50, BF16, seed=1)
    out = FOLDED[backend][0](x, W, b, 7, 11, dead_mask(50, 0.5, 0), b_pre)
    assert [tuple(t.shape) for t in out] == [(0, 7), (0, 7), (0, 11), (0, 11)]


@pytest.mark.parametrize("d", [384, 1024])
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_chunked_dead_lists_at_real_widths(d, dtype):
    """The Triton select's dead lists in the interpreter at real widths, F not a multiple of any block,
    with several chunks, slices and list compactions."""
    F = 3001 if d == 384 else 2087
    x, W, b, b_pre = make_inputs(3, d, F, dtype, seed=d)
    dead = dead_mask(F, 0.25, seed=d)
    options = {"buffer_bytes": 4 * 3 * 640, "n_slices": 3, "headroom": 1}
    _, _, aux_vals, aux_idx = assert_folded_equals_masked("triton", x, W, b, b_pre, 32, 64, dead, **options)
    assert_exact_topk(aux_vals, aux_idx, x, W, masked(b, dead), b_pre, 64)


# ------------------------------------------------------------------------------------------- the op
def _param_grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.to_dense() if isinstance(p.grad, RowGrad) else p.grad


@pytest.mark.parametrize("backend", ["torch", UNFOLDED_TORCH, "triton", "triton-fused"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_op_matches_two_passes_and_aux_gradients_reach_only_w_enc_and_b_enc(backend, sparse_grad):
    """The op (folded, or two passes where the backend does not fold) against two separate selections."""
    with unfolded_torch() if backend == UNFOLDED_TORCH else contextlib.nullcontext():
        _check_op_against_two_selections(backend, sparse_grad)


def _check_op_against_two_selections(backend: str, sparse_grad: bool) -> None:
    x, W, b, b_pre = make_inputs(9, 24, 500, FP32, seed=3)
    dead = dead_mask(500, 0.3, seed=2)
    ours = [t.clone().requires_grad_() for t in (x, W, b, b_pre)]
    vals, idx, aux_vals, aux_idx = ops.topk_encode_with_aux(ours[0], ours[1], ours[2], 7, 20, dead, b_pre=ours[3],
                                                           backend=backend, sparse_grad=sparse_grad)
    ((vals ** 2).sum() + (aux_vals ** 3).sum()).backward()
    ref = [t.clone().requires_grad_() for t in (x, W, b, b_pre)]
    ref_vals, ref_idx = ops.topk_encode(ref[0], ref[1], ref[2], 7, b_pre=ref[3], backend=backend)
    aux_ref = ops.topk_encode(ref[0].detach(), ref[1], ref[2], 20, b_pre=ref[3].detach(), mask=dead, backend=backend)
    ((ref_vals ** 2).sum() + (aux_ref[0] ** 3).sum()).backward()
    assert torch.equal(idx, ref_idx) and torch.equal(aux_idx, aux_ref[1]) and torch.equal(aux_vals, aux_ref[0])
    for got, want in zip(ours, ref):
        torch.testing.assert_close(_param_grad(got), want.grad)
    if sparse_grad:  # compact rows: never an F x d gradient
        for p in ours[1:3]:
            assert isinstance(p.grad, RowGrad) and all(part.values.shape[0] <= 9 * 20 for part in p.grad.parts)


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("which", [("W_enc",), ("b_enc",), ("x", "W_enc", "b_enc", "b_pre")])
def test_aux_output_alone_gives_its_gradients_to_exactly_w_enc_and_b_enc(which, sparse_grad):
    """Only AuxK's output reaches the loss (the main one unused): W_enc and b_enc, where they ask for it,
    get the masked selection's gradient and, as compact rows, touch only the dead features that fired;
    x and b_pre get none (AuxK holds them constant)."""
    x, W, b, b_pre = make_inputs(9, 24, 500, FP32, seed=5)
    dead = dead_mask(500, 0.3, seed=6)
    inputs = {"x": x, "W_enc": W, "b_enc": b, "b_pre": b_pre}
    ours = {name: t.clone().requires_grad_(name in which) for name, t in inputs.items()}
    *_, aux_vals, aux_idx = ops.topk_encode_with_aux(ours["x"], ours["W_enc"], ours["b_enc"], 7, 20, dead,
                                                     b_pre=ours["b_pre"], backend="torch", sparse_grad=sparse_grad)
    (aux_vals ** 3).sum().backward()
    ref = {name: t.clone().requires_grad_(name in which and name in ("W_enc", "b_enc")) for name, t in inputs.items()}
    ref_vals, ref_idx = ops.topk_encode(ref["x"], ref["W_enc"], ref["b_enc"], 20, b_pre=ref["b_pre"], mask=dead,
                                        backend="torch")
    (ref_vals ** 3).sum().backward()
    assert torch.equal(aux_idx, ref_idx)
    fired = torch.unique(aux_idx[aux_vals > 0])
    for name in which:
        if name in ("x", "b_pre"):
            assert ours[name].grad is None, name
            continue
        torch.testing.assert_close(_param_grad(ours[name]), ref[name].grad)
        if sparse_grad:
            assert torch.equal(touched_rows(ours[name].grad), fired), name


def test_op_with_an_unused_aux_output_and_bad_arguments():
    x, W, b, b_pre = make_inputs(5, 16, 60, FP32, seed=4)
    Wp = W.clone().requires_grad_()
    vals, *_ = ops.topk_encode_with_aux(x, Wp, b, 3, 4, dead_mask(60, 0.5, 1), b_pre=b_pre, backend="torch")
    vals.sum().backward()
    ref = W.clone().requires_grad_()
    ops.topk_encode(x, ref, b, 3, b_pre=b_pre, backend="torch")[0].sum().backward()
    torch.testing.assert_close(Wp.grad, ref.grad)
    dead = dead_mask(60, 0.5, 1)
    with pytest.raises(ValueError, match=r"aux_k must be in \[1, n_features=60\], got aux_k=61"):
        ops.topk_encode_with_aux(x, W, b, 3, 61, dead, backend="torch")
    with pytest.raises(TypeError, match="dead must be a bool tensor"):
        ops.topk_encode_with_aux(x, W, b, 3, 4, dead.long(), backend="torch")
    with pytest.raises(ValueError, match="dead"):
        ops.topk_encode_with_aux(x, W, b, 3, 4, dead[:59], backend="torch")


def test_registry_declares_which_backends_fold():
    assert get_backend("torch", "cpu").folds_aux
    assert get_backend("triton", "cpu").folds_aux
    assert not get_backend("triton-fused", "cpu").folds_aux


def test_batch_topk_fold_equals_batch_selection_and_masked_aux():
    x, W, b, b_pre = make_inputs(11, 24, 400, FP32, seed=8)
    dead = dead_mask(400, 0.3, seed=4)
    vals, idx, aux_vals, aux_idx = ops.topk_encode_with_aux(x, W, b, 5, 12, dead, b_pre=b_pre, batch_topk=True,
                                                           backend="torch")
    ref_vals, ref_idx = ops.batch_topk_encode(x, W, b, 5, b_pre=b_pre, backend="torch")
    ref_aux = ops.topk_encode(x, W, b, 12, b_pre=b_pre, mask=dead, backend="torch")
    assert torch.equal(idx, ref_idx) and torch.equal(vals, ref_vals)
    assert torch.equal(aux_idx, ref_aux[1]) and torch.equal(aux_vals, ref_aux[0])


# ------------------------------------------------------------------------------------------ the step
D, F, K, AUX_K, B, COEF, LR = 12, 97, 3, 9, 17, 0.5, 0.05


def _trainer(dtype: torch.dtype, backend: str, sparse_grad: bool, arch: Architecture | None = None) -> Trainer:
    torch.manual_seed(0)
    sae = TopKSAE(D, F, K, dtype=dtype, backend=backend, sparse_grad=sparse_grad, arch=arch)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(F) - 0.1)
        sae.b_dec.copy_(0.1 * torch.randn(D))
    opt = torch.optim.SGD(sae.parameters(), lr=LR)
    return Trainer(sae, opt, aux_k=AUX_K, aux_coef=COEF, dead_window=B)


def _two_pass_float64_step(params: dict, x: torch.Tensor, dead: torch.Tensor) -> dict:
    """The step's new parameters by the two-pass formulation in float64, dense autograd: the main top-k,
    then a second encoder pass with the dead features masked; SGD; decoder rows kept unit norm."""
    p = {n: t.detach().double().requires_grad_() for n, t in params.items()}
    x = x.double()
    pre = torch.relu((x - p["b_dec"]) @ p["W_enc"].T + p["b_enc"])
    idx = torch.sort(pre.detach(), dim=1, descending=True, stable=True).indices[:, :K]
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx))
    x_hat = z @ p["W_dec"] + p["b_dec"]
    loss = (x_hat - x).pow(2).sum() / x.numel()
    residual = (x - x_hat).detach()
    pre_aux = torch.relu((x - p["b_dec"].detach()) @ p["W_enc"].T + p["b_enc"]).masked_fill(~dead, 0.0)
    aux_idx = torch.sort(pre_aux.detach(), dim=1, descending=True, stable=True).indices[:, :AUX_K]
    z_aux = torch.zeros_like(pre_aux).scatter(1, aux_idx, pre_aux.gather(1, aux_idx))
    aux = (residual - z_aux @ p["W_dec"]).pow(2).sum() / residual.pow(2).sum()
    (loss + COEF * aux).backward()
    with torch.no_grad():
        W_dec, g = p["W_dec"], p["W_dec"].grad
        g -= (g * W_dec).sum(1, keepdim=True) * W_dec
        new = {n: t - LR * t.grad for n, t in p.items()}
        new["W_dec"] = new["W_dec"] / new["W_dec"].norm(dim=1, keepdim=True)
    return new


@pytest.mark.parametrize("backend,dtype,sparse_grad", [
    ("torch", FP64, False), ("torch", FP64, True), ("torch", FP32, True), ("triton", FP32, True),
])  # the Triton backend takes no float64
def test_step_with_aux_k_gives_the_two_pass_float64_parameters(backend, dtype, sparse_grad):
    trainer = _trainer(dtype, backend, sparse_grad)
    g = torch.Generator().manual_seed(5)
    trainer.step(torch.randn(B, D, generator=g).to(dtype))  # the window passes: AuxK on from here
    assert trainer._aux_active()
    x = torch.randn(B, D, generator=g).to(dtype)
    dead = trainer.tracker.dead_mask().clone()
    assert 0 < dead.sum() < F
    before = {n: t.detach().clone() for n, t in trainer.model.named_parameters()}
    want = _two_pass_float64_step(before, x, dead)
    trainer.step(x)
    assert trainer.read_metrics()["aux_loss"] > 0
    tol = {FP64: 1e-5, FP32: 2e-4}[dtype]  # the step's losses are summed in fp32
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(param.detach().double(), want[name], rtol=tol, atol=tol, msg=name)
        assert not torch.equal(param.detach(), before[name]), f"{name} did not move"


class EncoderGemms(TorchDispatchMode):
    """Counts the columns of every [B, d] @ [d, c] product (x times a chunk of W_enc rows, transposed)."""

    def __init__(self, n_tokens: int, width: int) -> None:
        super().__init__()
        self.n_tokens, self.width, self.columns = n_tokens, width, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        addmm = (torch.ops.aten.addmm.default, torch.ops.aten.addmm.out)
        if func in (torch.ops.aten.mm.default, torch.ops.aten.mm.out, *addmm):
            a, b = args[1:3] if func in addmm else args[:2]
            if tuple(a.shape) == (self.n_tokens, self.width) and b.shape[0] == self.width:
                self.columns += b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("arch", [None, Architecture(activation="batchtopk")], ids=["topk", "batch-topk"])
def test_aux_k_adds_no_second_pass_over_w_enc(backend, arch):
    trainer = _trainer(FP32, backend, True, arch)
    g = torch.Generator().manual_seed(6)
    trainer.step(torch.randn(B, D, generator=g))
    assert trainer._aux_active()
    counter = EncoderGemms(B, D)
    with counter:
        trainer.step(torch.randn(B, D, generator=g))
    assert trainer.read_metrics()["aux_loss"] > 0
    assert counter.columns == F, f"the step multiplied x by {counter.columns} rows of W_enc, not F={F} once"
