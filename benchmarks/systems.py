"""Every system the suite times, built at one shape: the hardware floor, plain torch, SAELens,
sparsify and flashsae.

A system is a dict of named `Op`s. An op is ``target(*setup())``: ``setup`` (not timed) draws the
next input batch from a rotating pool, clears gradients and runs whatever must precede the
timed part; ``target`` is the timed part. Every training step is forward + MSE-type loss +
backward + the decoder-norm upkeep + an Adam step, with learning rate `LR` and Adam moments in
the parameters' dtype (bf16 on GPU, fp32 on CPU).
"""
from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from . import traffic
from .shapes import Shape

# sparsify picks its decoder at import: its Triton one needs a GPU, the eager one
# (embedding_bag) runs anywhere. Decided before sparsify is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")

LR = 1e-4
CPU_POOL_BYTES = 64 << 20  # input pool size on CPU: past a server core's share of L3
MAX_POOL_BATCHES = 64


@dataclass
class Op:
    """One timed operation: ``target(*setup())``; ``bytes_moved`` for memory-bound floors."""

    target: Callable[..., Any]
    setup: Callable[[], tuple] = tuple
    bytes_moved: int | None = None


class System:
    """Named ops at one shape plus the bytes held by its parameters and optimizer state."""

    def __init__(self, ops: dict[str, Op], modules: list[Any], notes: str = "") -> None:
        self.ops, self.modules, self.notes = ops, modules, notes

    def state_bytes(self) -> int:
        """Parameters + optimizer state (moments, step counts), in bytes."""
        total = 0
        for module in self.modules:
            if isinstance(module, torch.optim.Optimizer):
                for state in module.state.values():
                    total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t))
            else:
                total += sum(p.numel() * p.element_size() for p in module.parameters())
        return total


def pool_bytes(device: str) -> int:
    """Bytes a rotating input pool spans: twice the L2 on CUDA, `CPU_POOL_BYTES` on CPU."""
    if device == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 0) or (50 << 20)
        return 2 * l2
    return CPU_POOL_BYTES


class Rotation:
    """Cycles through a list of items, one per call."""

    def __init__(self, items: list[Any]) -> None:
        self.items, self.i = items, 0

    def __call__(self) -> Any:
        item = self.items[self.i % len(self.items)]
        self.i += 1
        return item


def input_pool(shape: Shape, device: str, seed: int = 0) -> Rotation:
    """Random activations x [B, d] (unit Gaussian), enough batches to span `pool_bytes` (at least 2)."""
    batch_bytes = shape.B * shape.d * torch.finfo(shape.torch_dtype).bits // 8
    n = min(MAX_POOL_BATCHES, max(2, math.ceil(pool_bytes(device) / batch_bytes)))
    g = torch.Generator(device=device).manual_seed(seed)
    return Rotation([torch.randn(shape.B, shape.d, generator=g, device=device).to(shape.torch_dtype) for _ in range(n)])


def _moment_dtype(shape: Shape) -> torch.dtype:
    return torch.bfloat16 if shape.torch_dtype == torch.bfloat16 else torch.float32


def _mse(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (x_hat.float() - x.float()).pow(2).sum(-1).mean()


# --- the hardware floor ------------------------------------------------------------------------

def floor(shape: Shape, device: str) -> System:
    """``matmul``: the dense encoder product x @ W_enc.T (cuBLAS / CPU BLAS through torch).
    ``copy``: a device-memory copy of B*k*d elements, the rows the sparse decoder gathers."""
    dtype, xs = shape.torch_dtype, input_pool(shape, device)
    W_enc = torch.randn(shape.F, shape.d, device=device, dtype=dtype)
    n = shape.B * shape.k * shape.d
    item = torch.finfo(dtype).bits // 8
    n_src = min(8, max(2, math.ceil(pool_bytes(device) / (n * item))))
    sources = Rotation([torch.randn(n, device=device, dtype=dtype) for _ in range(n_src)])
    dst = torch.empty(n, device=device, dtype=dtype)
    ops = {
        "matmul": Op(lambda x: x @ W_enc.T, lambda: (xs(),)),
        "copy": Op(lambda src: dst.copy_(src), lambda: (sources(),), bytes_moved=2 * n * item),
    }
    return System(ops, [])


# --- plain torch -------------------------------------------------------------------------------

class DenseTorchSAE(torch.nn.Module):
    """The plain torch TopK SAE: dense matmul, torch.topk, a dense [B, F] z and z @ W_dec."""

    def __init__(self, shape: Shape, device: str) -> None:
        super().__init__()
        W = torch.randn(shape.F, shape.d, device=device, dtype=shape.torch_dtype)
        for rows in W.split(1 << 16):  # unit rows, without an fp32 copy of the whole matrix
            rows.div_(rows.float().norm(dim=1, keepdim=True).to(rows.dtype))
        self.W_dec = torch.nn.Parameter(W)
        self.W_enc = torch.nn.Parameter(W.clone())
        self.b_enc = torch.nn.Parameter(torch.zeros(shape.F, device=device, dtype=shape.torch_dtype))
        self.b_dec = torch.nn.Parameter(torch.zeros(shape.d, device=device, dtype=shape.torch_dtype))
        self.k = shape.k

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The peers' encoder: the dense [B, F] pre-activations, then torch.topk -> (pre, vals, idx)."""
        pre = torch.relu((x - self.b_dec) @ self.W_enc.T + self.b_enc)
        vals, idx = pre.topk(self.k, dim=1)
        return pre, vals, idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre, vals, idx = self.encode(x)
        z = torch.zeros_like(pre).scatter(1, idx, vals)
        return z @ self.W_dec + self.b_dec

    @torch.no_grad()
    def remove_parallel_grads_(self) -> None:
        W, g = self.W_dec.float(), self.W_dec.grad.float()
        self.W_dec.grad.copy_(g - (g * W).sum(1, keepdim=True) * W)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.float().norm(dim=1, keepdim=True).to(self.W_dec.dtype))


def dense_torch(shape: Shape, device: str) -> System:
    """Plain torch: DenseTorchSAE + torch.optim.Adam, decoder rows kept on the unit sphere."""
    sae, xs = DenseTorchSAE(shape, device), input_pool(shape, device)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)

    def step(x: torch.Tensor) -> None:
        _mse(sae(x), x).backward()
        sae.remove_parallel_grads_()
        opt.step()
        sae.normalize_decoder_()

    ops = {"step": Op(step, _zeroing(opt, xs)), "encode": Op(sae.encode, lambda: (xs(),))}
    return System(ops, [sae, opt])


def _zeroing(opt: torch.optim.Optimizer, xs: Rotation) -> Callable[[], tuple]:
    """A setup that sets gradients to None (as zero_grad does between steps) and draws x."""

    def setup() -> tuple:
        opt.zero_grad(set_to_none=True)
        return (xs(),)

    return setup


# --- peers -------------------------------------------------------------------------------------

def saelens(shape: Shape, device: str) -> System:
    """SAELens's TopKTrainingSAE (config defaults, no dead latents so no aux loss) stepped as its
    SAETrainer._train_step does: training_forward_pass -> loss.backward -> clip_grad_norm_(1.0)
    -> torch.optim.Adam.step -> zero_grad. Its firing-statistics bookkeeping is left out."""
    from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    cfg = TopKTrainingSAEConfig(d_in=shape.d, d_sae=shape.F, k=shape.k, dtype=shape.dtype, device=device)
    sae = TopKTrainingSAE(cfg)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.9, 0.999))
    xs = input_pool(shape, device)

    def step(x: torch.Tensor) -> None:
        out = sae.training_forward_pass(
            TrainStepInput(sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=0, is_logging_step=False)
        )
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return System({"step": Op(step, _zeroing(opt, xs))}, [sae, opt],
                  notes="TopKTrainingSAE(TopKTrainingSAEConfig defaults: rescale_acts_by_decoder_norm=True)")


class SAELensTopKAlgorithm(torch.nn.Module):
    """SAELens 6.54.12's TopKTrainingSAE step written out in plain torch, for a machine without the
    package: W_enc [d, F] (SAELens's layout), W_dec [F, d] kaiming-uniform with W_enc = W_dec.T,
    zero biases; with its config defaults (apply_b_dec_to_input, rescale_acts_by_decoder_norm, no
    sparse activations, no hooks doing anything): hidden_pre = ((x - b_dec) @ W_enc + b_enc) *
    |W_dec rows|, top-k (unsorted) then ReLU scattered into a dense [B, F] tensor, decode
    (acts / |W_dec rows|) @ W_dec + b_dec, loss = squared error summed over d, averaged over tokens.
    """

    def __init__(self, shape: Shape, device: str) -> None:
        super().__init__()
        W_dec = torch.empty(shape.F, shape.d, device=device, dtype=shape.torch_dtype)
        torch.nn.init.kaiming_uniform_(W_dec)
        self.W_dec = torch.nn.Parameter(W_dec)
        self.W_enc = torch.nn.Parameter(W_dec.T.clone().contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(shape.F, device=device, dtype=shape.torch_dtype))
        self.b_dec = torch.nn.Parameter(torch.zeros(shape.d, device=device, dtype=shape.torch_dtype))
        self.k = shape.k

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        norms = self.W_dec.norm(dim=-1)
        hidden_pre = ((x - self.b_dec) @ self.W_enc + self.b_enc) * norms
        values, indices = torch.topk(hidden_pre, k=self.k, dim=-1, sorted=False)
        acts = torch.zeros_like(hidden_pre).scatter(-1, indices, values.relu())
        x_hat = (acts * (1 / norms)) @ self.W_dec + self.b_dec
        return torch.nn.functional.mse_loss(x_hat, x, reduction="none").sum(dim=-1).mean()


def saelens_algorithm(shape: Shape, device: str) -> System:
    """`SAELensTopKAlgorithm` stepped as SAETrainer._train_step does: loss.backward ->
    clip_grad_norm_(1.0) -> torch.optim.Adam.step -> zero_grad. A re-implementation, timed only
    where the sae-lens package cannot be imported; labelled as such in every report."""
    sae, xs = SAELensTopKAlgorithm(shape, device), input_pool(shape, device)
    opt = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.9, 0.999))

    def step(x: torch.Tensor) -> None:
        sae.loss(x).backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        opt.step()

    return System({"step": Op(step, _zeroing(opt, xs))}, [sae, opt],
                  notes="SAELens 6.54.12's TopKTrainingSAE step re-implemented in plain torch (package not importable)")


def sparsify(shape: Shape, device: str) -> System:
    """sparsify's SparseCoder (activation="topk", normalize_decoder=True) stepped as its Trainer
    does with optimizer="adam": set_decoder_norm_to_unit_norm -> forward -> fvu.backward ->
    remove_gradient_parallel_to_decoder_directions -> torch.optim.Adam.step -> zero_grad."""
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify import utils as sparsify_utils

    cfg = SparseCoderConfig(activation="topk", num_latents=shape.F, k=shape.k, normalize_decoder=True)
    sae = SparseCoder(shape.d, cfg, device=device, dtype=shape.torch_dtype)
    opt = torch.optim.Adam(sae.parameters(), lr=LR)
    xs = input_pool(shape, device)

    def step(x: torch.Tensor) -> None:
        sae.set_decoder_norm_to_unit_norm()
        out = sae(x)
        (out.fvu + out.auxk_loss + out.multi_topk_fvu / 8).backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()

    decoder = sparsify_utils.decoder_impl.__name__
    return System({"step": Op(step, _zeroing(opt, xs))}, [sae, opt],
                  notes=f"SparseCoder(SparseCoderConfig(activation='topk')), decoder={decoder}")


# --- flashsae ----------------------------------------------------------------------------------

def flashsae(shape: Shape, device: str, backend: str = "auto") -> System:
    """flashsae.TopKSAE(sparse_grad=True) + flashsae.optim.SparseAdam(unit_norm=[W_dec]) on kernel
    ``backend``; ops ``encode`` (ops.topk_encode, without the host-side NaN check the training step
    skips too), ``decode`` (ops.sparse_decode), ``backward``, ``optimizer`` (SparseAdam.step) and the
    full ``step``: `flashsae.sae.trainer.Trainer.step`, the step `flashsae train` runs (AuxK off: no
    feature is dead in a benchmark), and the same step with AuxK on, one pass and two (`aux_k_steps`). On
    CUDA, when the trainer module offers ``CapturedStep``, also
    ``step_graph``: the same step replayed from a CUDA graph (recorded at its first call, a warm-up
    round); and ``encode-fused``: the opt-in fused encoder ("triton-fused") on the same inputs, so one
    run compares the two Triton encoders."""
    from flashsae import TopKSAE, ops
    from flashsae.kernels.registry import resolve_backend
    from flashsae.optim import SparseAdam
    from flashsae.sae import trainer as trainer_module
    from flashsae.sae.trainer import Trainer

    dtype = shape.torch_dtype
    sae = TopKSAE(shape.d, shape.F, shape.k, dtype=dtype, device=device, backend=backend, sparse_grad=True)
    opt = SparseAdam(sae.parameters(), lr=LR, moment_dtype=_moment_dtype(shape), unit_norm=[sae.W_dec],
                     backend=backend)
    xs = input_pool(shape, device)
    touched = fired_features(sae, xs.items[:4])
    item, moment_item = torch.finfo(dtype).bits // 8, torch.finfo(_moment_dtype(shape)).bits // 8
    master = dtype == torch.bfloat16

    def encode(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sae.encode(x, check_finite=False)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        vals, idx = encode(x)
        return _mse(sae.decode(vals, idx), x)

    with torch.no_grad():
        codes = Rotation([tuple(t.detach() for t in encode(x)) for x in xs.items[:4]])

    def after_backward() -> tuple:
        opt.zero_grad(set_to_none=True)
        loss_of(xs()).backward()
        return ()

    trainer = Trainer(sae, opt)
    aux_steps = aux_k_steps(sae, opt, shape, device, xs)

    B, k, d = shape.B, shape.k, shape.d
    ops_ = {
        "encode": Op(encode, lambda: (xs(),)),
        "decode": Op(sae.decode, codes, bytes_moved=traffic.decode_bytes(B, k, d, item)),
        "backward": Op(lambda loss: loss.backward(), lambda: (opt.zero_grad(set_to_none=True), (loss_of(xs()),))[1],
                       bytes_moved=traffic.backward_bytes(B, k, d, touched, item)),
        "optimizer": Op(opt.step, after_backward,
                        bytes_moved=traffic.optimizer_bytes(touched, d, item, moment_item, master)),
        "step": Op(trainer.step, _zeroing(opt, xs)),
        **{name: Op(step, _zeroing(opt, xs)) for name, step in aux_steps.items()},
    }
    captured_step = getattr(trainer_module, "CapturedStep", None)
    if captured_step is not None and device == "cuda":
        ops_["step_graph"] = Op(_replayed(captured_step, trainer), lambda: (xs(),))
    notes = (f"backend={resolve_backend(sae.backend, torch.device(device))}; {touched} distinct features fire per "
             f"step (mean over 4 batches); master weights={'bf16 + int16 low bits' if master else 'none needed'}")
    if device == "cpu":
        from flashsae.kernels import cpu_native

        notes += f"; C++ CPU kernels {'on' if cpu_native.kernels() is not None else 'off (torch ops)'}"
    if device == "cuda":
        ops_["encode-fused"] = Op(
            lambda x: ops.topk_encode(x, sae.W_enc, sae.b_enc, shape.k, b_pre=sae.b_dec, backend="triton-fused",
                                      check_finite=False),
            lambda: (xs(),))
        notes += "; " + encoder_plans(shape)
    return System(ops_, [sae, opt], notes=notes)


# AuxK's k in the AuxK steps (Gao et al.'s value; at most F).
AUX_K = 512
# The backend name under which the AuxK steps' second variant runs the masked second encoder pass.
TWO_PASS_BACKEND = "two-pass-aux"


def aux_k_steps(sae: Any, opt: Any, shape: Shape, device: str, xs: Rotation) -> dict[str, Callable]:
    """`Trainer.step` with AuxK on, two ways: ``step-auxk`` (the dead features' top-k from the main encoder
    pass, what `flashsae train` runs) and ``step-auxk-2pass`` (the same step on the same backend declared
    not to fold, so the dead features' top-k takes a second, masked encoder pass), side by side.

    The dead set is the features that did not fire in the last batch (a one-batch window, after one
    untimed step), so the aux selection runs over a realistic mix of live and dead features.
    """
    import dataclasses

    from flashsae.kernels.registry import get_backend, register_backend, resolve_backend
    from flashsae.sae.trainer import Trainer

    resolved = resolve_backend(sae.backend, torch.device(device))
    unfolded = dataclasses.replace(get_backend(resolved, device), topk_encode_with_aux=None)
    register_backend(TWO_PASS_BACKEND, lambda: unfolded, uses_triton=resolved != "torch")
    trainer = Trainer(sae, opt, aux_k=min(AUX_K, shape.F), dead_window=shape.B)
    trainer.step(xs())
    opt.zero_grad(set_to_none=True)

    def two_pass(x: torch.Tensor) -> None:
        own, sae.backend = sae.backend, TWO_PASS_BACKEND
        try:
            trainer.step(x)
        finally:
            sae.backend = own

    return {"step-auxk": trainer.step, "step-auxk-2pass": two_pass}


def encoder_plans(shape: Shape) -> str:
    """The two Triton encoders' plans at ``shape``, for the notes of a CUDA run."""
    from flashsae.kernels.chunked_encode import select_plan
    from flashsae.kernels.fused_encode import encode_plan

    chunked = select_plan(shape.B, shape.F, shape.k)
    fused = encode_plan(shape.B, shape.F, shape.d, shape.k, dtype=shape.torch_dtype)
    return (f"chunked encoder: {chunked.chunk} features per GEMM ({4 * shape.B * chunked.chunk / 2**20:.0f} MiB fp32 "
            f"buffer), {chunked.n_slices} slices, lists of {chunked.capacity} keys "
            f"({chunked.list_bytes(shape.B) / 2**20:.1f} MiB); fused encoder: {fused['n_ranges']} feature ranges, "
            f"{fused['programs']} programs in {fused['waves']} waves, lists {fused['list_bytes'] / 2**20:.1f} MiB")


@torch.no_grad()
def fired_features(sae: Any, batches: list[torch.Tensor]) -> int:
    """U: the mean number of distinct features that fire in one batch (sets the sparse ops' traffic)."""
    counts = []
    for x in batches:
        vals, idx = sae.encode(x)
        counts.append(torch.unique(idx[vals > 0]).numel())
    return round(sum(counts) / len(counts))


def _replayed(captured_step: Callable[..., Any], trainer: Any) -> Callable[[torch.Tensor], None]:
    """A step function that records ``captured_step(trainer, x)`` at its first call and replays it after."""
    graph: list[Any] = []

    def step(x: torch.Tensor) -> None:
        if graph:
            graph[0](x)
        else:
            graph.append(captured_step(trainer, x))

    return step


BUILDERS: dict[str, Callable[[Shape, str], System]] = {
    "floor": floor,
    "torch": dense_torch,
    "sae_lens": saelens,
    "sparsify": sparsify,
    "flashsae": flashsae,
    "flashsae (repeat)": flashsae,
}
