"""Batched, streaming truncated SVD of tall activation matrices.

``randomized_svd`` returns the top singular values and right singular vectors of
``A [..., n, d]`` (several activation sites or layers at once via the leading batch
dims) without ever holding more than one row chunk of ``A`` plus a few ``d x l``
matrices. All work is on the d-side: every pass over the data accumulates products
with the Gram matrix ``G = A^T A`` as ``sum_chunks C^T (C X)`` in fp32 (or float64),
upcasting bf16/fp16 chunks one at a time. The products are plain batched torch
matmuls (cuBLAS on GPU).

Passes over the data (one pass = one iteration over all row chunks):
  method="randomized": n_iter + 2
      pass 1            Y = G Omega                         (Omega: d x l Gaussian)
      passes 2..n_iter+1 Y = G qr(Y).Q                      (subspace iteration)
      pass n_iter+2     B = Q^T G Q, Q = qr(Y).Q            (Rayleigh-Ritz)
    then eigh(B) = U diag(w) U^T, S = sqrt(w), V = Q U. Each pass makes two products
    with A, so 2 n_iter + 4 in all. torch.svd_lowrank(niter=n_iter) makes 2 n_iter + 2 and
    its right vectors lie in the same subspace span((A^T A)^(n_iter+1) Omega); the
    Rayleigh-Ritz step here (the best A V V^T with V in that span) is at least as accurate
    as its projection Q Q^T A.
  method="gram": 1
      one pass accumulating the d x d Gram, then eigh (exact up to accumulation error).
  center=True adds no pass: the column mean is accumulated in pass 1 (with a shift by
  the first chunk's mean so the rank-one correction G - n mu mu^T does not cancel
  catastrophically), and later passes subtract the mean from each chunk explicitly.

Default method "gram": it reads the data once (streams from hooks or disk are read once, not
n_iter + 2 times), is exact up to accumulation rounding whatever the spectral decay (activation
spectra are flat: 99% of the variance needs 60-90% of d, where a rank-d/4 sketch converges
slowly), and costs 2 n d^2 flops against (n_iter + 2) 4 n d l for the randomized method, i.e.
less whenever d < 2 (n_iter + 2) l (n = 2M, d = 4096, rank 1024, n_iter 2: 6.7e13 vs 1.4e14).
Its price is a d x d fp32 Gram per batch element (64 MiB at d = 4096) and an O(d^3) eigh.
Use "randomized" for very large d with rank << d.

Accuracy: singular values come from eigenvalues of a Gram, so with fp32 accumulation
a singular value s_i is resolved to about eps_fp32 * s_1^2 / s_i absolute; values below
~3e-4 * s_1 are not meaningful in fp32 (the variances s_i^2 are, to ~1e-7 * s_1^2).
Ask for ``dtype=torch.float64`` when the tail matters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .checks import require_int

__all__ = ["SVDResult", "randomized_svd", "passes_needed"]

Source = Union[Tensor, Callable[[], Iterable[Tensor]], Iterable[Tensor]]

_METHODS = ("randomized", "gram")
_DEFAULT_CHUNK_ROWS = 65536


class SVDResult(NamedTuple):
    """Top singular triplets (right side) of A or of the column-centered A.

    S: [..., rank] descending, >= 0.  V: [..., d, rank] orthonormal columns.
    mean: [..., d] column mean that was subtracted (center=True), else None.
    n_rows: number of rows n seen per batch element.
    frob_sq: [...] squared Frobenius norm of the (centered) A = the sum of *all* squared
      singular values, so S**2 / frob_sq is the explained-variance ratio of each component.
    passes: number of passes made over the data.
    """

    S: Tensor
    V: Tensor
    mean: Optional[Tensor]
    n_rows: int
    frob_sq: Tensor
    passes: int


def passes_needed(method: str = "randomized", n_iter: int = 2) -> int:
    """Number of passes over the data ``randomized_svd`` makes for these settings."""
    if method == "gram":
        return 1
    if method == "randomized":
        return n_iter + 2
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")


class _Stream:
    """Re-iterable view of A as validated, upcast row chunks [..., n_i, d].

    The first pass fixes batch dims, d, n and the device, and checks every chunk for
    NaN/Inf (device-side flags, one host sync at the end of the pass); later passes check
    that the source yields the same shapes and row count.
    """

    def __init__(self, A: Source, chunk_rows: int, dtype: torch.dtype, device) -> None:
        self.dtype = dtype
        self.device = None if device is None else torch.device(device)
        self.batch: Optional[torch.Size] = None
        self.d: Optional[int] = None
        self.n: Optional[int] = None
        self.passes = 0
        if isinstance(A, Tensor):
            if A.ndim < 2:
                raise ValueError(f"A must have shape [..., n, d], got shape {tuple(A.shape)}")
            self._factory = lambda: (A[..., i:i + chunk_rows, :] for i in range(0, A.shape[-2], chunk_rows))
        elif callable(A):
            self._factory = lambda: iter(A())
        elif isinstance(A, Iterator):
            raise ValueError(
                "A is a one-shot iterator (e.g. a generator object), but the SVD reads the data "
                "several times: pass a zero-argument callable that returns a fresh iterator, "
                "or a re-iterable such as a list of chunks")
        elif isinstance(A, Iterable):
            self._factory = lambda: iter(A)
        else:
            raise TypeError(
                f"A must be a tensor [..., n, d], a list of chunks or a zero-argument callable "
                f"returning an iterator of chunks, got {type(A).__name__}")

    def _check(self, c, k: int) -> None:
        if not isinstance(c, Tensor):
            raise TypeError(f"A: chunk {k} must be a torch.Tensor, got {type(c).__name__}")
        if not c.is_floating_point():
            raise ValueError(f"A: chunk {k} must have a floating dtype, got {c.dtype}")
        if c.ndim < 2:
            raise ValueError(f"A: chunk {k} must have shape [..., n_i, d], got {tuple(c.shape)}")
        if self.d is not None and c.shape[-1] != self.d:
            raise ValueError(f"A: chunk {k} has d={c.shape[-1]}, expected d={self.d} (from the first chunk)")
        if self.batch is not None and c.shape[:-2] != self.batch:
            raise ValueError(
                f"A: chunk {k} has batch dims {tuple(c.shape[:-2])}, expected {tuple(self.batch)} "
                f"(from the first chunk)")

    def __iter__(self) -> Iterator[Tensor]:
        first = self.passes == 0
        self.passes += 1
        rows = 0
        flags: list[Tensor] = []
        for k, c in enumerate(self._factory()):
            self._check(c, k)
            if self.d is None:
                self.d, self.batch = c.shape[-1], c.shape[:-2]
                if self.device is None:
                    self.device = c.device
            if c.shape[-2] == 0:
                continue
            c = c.to(device=self.device, dtype=self.dtype, non_blocking=True)
            if first:
                flags.append(torch.isfinite(c).all())
            rows += c.shape[-2]
            yield c
        if first:
            if rows == 0:
                raise ValueError("A yielded no rows")
            bad = (~torch.stack(flags)).nonzero()
            if bad.numel():
                raise ValueError(f"A: chunk {int(bad[0, 0])} contains NaN or Inf")
            self.n = rows
        elif rows != self.n:
            raise ValueError(
                f"A yielded {rows} rows on pass {self.passes} but {self.n} on pass 1: a streaming "
                f"source must produce the same rows on every pass")


def _fix_signs(V: Tensor) -> Tensor:
    """Make the largest-magnitude entry of every column positive (deterministic signs)."""
    idx = V.abs().argmax(dim=-2, keepdim=True)
    s = torch.sign(torch.gather(V, -2, idx))
    return V * torch.where(s == 0, torch.ones_like(s), s)


def _top_eigh(B: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Top ``rank`` eigenpairs of symmetric B [..., m, m], descending; eigh in float64."""
    B = 0.5 * (B + B.transpose(-1, -2))
    w, U = torch.linalg.eigh(B.double())
    w = w.flip(-1)[..., :rank].to(B.dtype)
    U = U.flip(-1)[..., :rank].to(B.dtype)
    return w, U


def randomized_svd(
    A: Source,
    rank: int,
    *,
    oversample: int = 10,
    n_iter: int = 2,
    center: bool = False,
    method: str = "gram",
    seed: Optional[int] = None,
    dtype: torch.dtype = torch.float32,
    chunk_rows: int = _DEFAULT_CHUNK_ROWS,
    device: Union[str, torch.device, None] = None,
) -> SVDResult:
    """Top-``rank`` singular values and right singular vectors of A (optionally centered).

    A: one of
      - a tensor [..., n, d] of any floating dtype (read in row chunks of ``chunk_rows``),
      - a re-iterable of chunks (e.g. a list) [..., n_i, d],
      - a zero-argument callable returning a fresh iterator of chunks on every call (the
        randomized method reads the data ``n_iter + 2`` times; a generator *object* is
        rejected because it can only be read once).
      Chunks may differ in n_i and dtype (fp32/bf16/fp16/fp64); batch dims and d must match.
    rank: number of components, 1 <= rank <= min(n, d).
    oversample, n_iter: sketch width l = min(rank + oversample, d) and number of subspace
      iterations (method="randomized" only). n_iter >= 2 is advisable for slowly decaying
      spectra.
    center: subtract the column mean (per batch element) first; returned as ``mean``.
    method: "gram" (default: one pass, d x d Gram + eigh, exact up to accumulation
      rounding; fewer flops whenever d < 2 (n_iter + 2) l) or "randomized"
      (n_iter + 2 passes, O(d l) memory; for very large d with rank << d).
    seed: seeds the Gaussian test matrix (randomized); None uses torch's global RNG.
    dtype: accumulation and output dtype, torch.float32 or torch.float64.
    device: where to compute (chunks are moved there); default: the first chunk's device.

    Returns SVDResult(S [..., rank], V [..., d, rank], mean [..., d] | None, n_rows,
    frob_sq [...], passes), all in ``dtype``.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    for name, val, lo in (("rank", rank, 1), ("oversample", oversample, 0), ("n_iter", n_iter, 0),
                          ("chunk_rows", chunk_rows, 1)):
        require_int(name, val, lo)

    stream = _Stream(A, chunk_rows, dtype, device)
    if method == "gram":
        return _gram_svd(stream, rank, center)
    return _randomized(stream, rank, oversample, n_iter, center, seed)


def _check_rank(stream: _Stream, rank: int) -> None:
    if rank > min(stream.n, stream.d):
        raise ValueError(f"rank must be <= min(n, d) = min({stream.n}, {stream.d}), got {rank}")


def _first_pass(stream: _Stream, rank: int, center: bool, make_rhs):
    """Pass 1: accumulate G_s = sum (C - s)^T (C - s) X (X = make_rhs(d, batch) or G itself
    when X is None) and the column sums; s is the first chunk's mean when centering (a shift
    that keeps the rank-one correction small), else 0.

    Returns (acc, X, mean, shift_delta): with center, the centered product is
    acc - n * delta (delta^T X), delta = mean - s.
    """
    acc = X = s = colsum = None
    for c in stream:
        if acc is None:
            if stream.d < rank:
                raise ValueError(f"rank must be <= min(n, d); d = {stream.d} < rank = {rank}")
            X = make_rhs(stream)
            if center:
                s = c.mean(dim=-2, keepdim=True)
                colsum = torch.zeros_like(s)
        if center:
            c = c - s
            colsum += c.sum(dim=-2, keepdim=True)
        p = c.transpose(-1, -2) @ (c if X is None else c @ X)
        acc = p if acc is None else acc.add_(p)
    _check_rank(stream, rank)
    if not center:
        return acc, X, None, None
    delta = colsum / stream.n                          # [..., 1, d]
    mean = (s + delta).squeeze(-2)
    rhs = delta if X is None else delta @ X            # [..., 1, l] or [..., 1, d]
    acc = acc - stream.n * delta.transpose(-1, -2) @ rhs
    return acc, X, mean, delta


def _gram_svd(stream: _Stream, rank: int, center: bool) -> SVDResult:
    G, _, mean, _ = _first_pass(stream, rank, center, lambda st: None)
    frob_sq = torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)
    w, V = _top_eigh(G, rank)
    S = w.clamp_min(0).sqrt()
    return SVDResult(S, _fix_signs(V), mean, stream.n, frob_sq, stream.passes)


def _randomized(stream: _Stream, rank: int, oversample: int, n_iter: int, center: bool,
                seed: Optional[int]) -> SVDResult:
    def omega(st: _Stream) -> Tensor:
        l = min(rank + oversample, st.d)
        gen = None
        if seed is not None:
            gen = torch.Generator(device=st.device)
            gen.manual_seed(seed)
        return torch.randn(*st.batch, st.d, l, generator=gen, device=st.device, dtype=st.dtype)

    Y, _, mean, _ = _first_pass(stream, rank, center, omega)
    mu = None if mean is None else mean.unsqueeze(-2)

    def apply_gram(Q: Tensor, want_frob: bool = False):
        """One pass: G Q = sum (C - mu)^T ((C - mu) Q) [..., d, l] (+ squared Frobenius norm)."""
        out = torch.zeros_like(Q)
        frob = torch.zeros(Q.shape[:-2], dtype=Q.dtype, device=Q.device)
        for c in stream:
            if mu is not None:
                c = c - mu
            out.add_(c.transpose(-1, -2) @ (c @ Q))
            if want_frob:
                frob += c.square().sum(dim=(-2, -1))
        return out, frob

    for _ in range(n_iter):
        Q = torch.linalg.qr(Y).Q
        Y, _ = apply_gram(Q)
    Q = torch.linalg.qr(Y).Q
    GQ, frob_sq = apply_gram(Q, want_frob=True)
    w, U = _top_eigh(Q.transpose(-1, -2) @ GQ, rank)
    S = w.clamp_min(0).sqrt()
    V = Q @ U
    return SVDResult(S, _fix_signs(V), mean, stream.n, frob_sq, stream.passes)
