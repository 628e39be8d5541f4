"""The backend registry: names, resolution by device, overrides, and lazy Triton imports."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
import torch

from flashsae import ops
from flashsae.kernels import reference, torch_encode
from flashsae.kernels.registry import (
    Backend,
    backend_names,
    get_backend,
    override_backend,
    register_backend,
    resolve_backend,
)
from flashsae.optim import SparseAdam

PRIMITIVES = ("topk_encode", "gather_rows", "row_dots", "segment_rows", "sparse_adam_step_")
ROOT = Path(__file__).resolve().parents[1]


def test_names_are_auto_and_the_table():
    assert backend_names() == ("auto", "torch", "triton", "triton-fused")
    assert ops.BACKENDS == backend_names()


def test_the_triton_backends_share_the_row_and_adam_kernels_and_differ_in_the_encoder():
    chunked, fused = get_backend("triton", "cpu"), get_backend("triton-fused", "cpu")
    assert chunked.topk_encode.__module__ == "flashsae.kernels.chunked_encode"
    assert fused.topk_encode.__module__ == "flashsae.kernels.fused_encode"
    for primitive in PRIMITIVES[1:]:
        assert getattr(chunked, primitive) is getattr(fused, primitive), primitive
    assert get_backend("torch", "cpu").float_dtypes[-1] == torch.float64
    assert torch.float64 not in chunked.float_dtypes + fused.float_dtypes


@pytest.mark.parametrize("name", ["torch", "triton", "triton-fused"])
def test_every_backend_provides_every_primitive(name):
    backend = get_backend(name, "cpu")
    assert isinstance(backend, Backend) and backend.name == name
    assert all(callable(getattr(backend, p)) for p in PRIMITIVES)
    assert get_backend(name, "cpu") is backend, "built once, then cached"


@pytest.mark.parametrize(
    "call",
    [
        lambda: resolve_backend("cuda", torch.device("cpu")),
        lambda: get_backend("Torch", "cpu"),
        lambda: ops.topk_encode(torch.randn(2, 8), torch.randn(5, 8), torch.randn(5), 2, backend="cuda"),
        lambda: ops.sparse_decode(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.randn(5, 8),
                                  torch.randn(8), backend=None),
        lambda: SparseAdam([torch.nn.Parameter(torch.randn(3, 2))], backend="gpu"),
    ],
)
def test_unknown_name_is_an_error_naming_the_argument(call):
    with pytest.raises(ValueError, match=r"backend must be one of auto, torch, triton, triton-fused, got"):
        call()


@pytest.mark.parametrize("device,expected", [("cpu", "torch"), ("cuda", "triton"), ("cuda:1", "triton"), ("meta", "torch")])
def test_auto_is_triton_on_cuda_and_torch_elsewhere(device, expected):
    assert resolve_backend("auto", torch.device(device)) == expected
    assert resolve_backend("auto", device) == expected


def test_explicit_names_resolve_to_themselves():
    assert resolve_backend("torch", "cuda") == "torch"
    assert resolve_backend("triton", "cuda") == "triton"
    assert resolve_backend("triton", "cpu") == "triton"  # conftest sets TRITON_INTERPRET=1
    assert resolve_backend("triton-fused", "cuda") == "triton-fused"


def test_triton_on_cpu_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    expected = (
        "backend='triton' needs CUDA tensors (got device cpu); on CPU set TRITON_INTERPRET=1 "
        "before importing triton to use the interpreter, or use backend='torch'"
    )
    with pytest.raises(ValueError) as info:
        resolve_backend("triton", torch.device("cpu"))
    assert str(info.value) == expected
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        get_backend("triton", "cpu")
    with pytest.raises(ValueError, match="backend='triton-fused' needs CUDA tensors"):
        resolve_backend("triton-fused", "cpu")
    assert resolve_backend("auto", "cpu") == "torch" and resolve_backend("torch", "cpu") == "torch"


def counting_backend(calls: Counter) -> Backend:
    """The torch backend with every primitive counting its calls."""
    def counted(name):
        fn = getattr(torch_encode if name == "topk_encode" else reference, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)

        return wrapper

    return Backend(name="counting", **{p: counted(p) for p in PRIMITIVES})


def test_ops_and_optimizer_run_only_through_backend_primitives():
    calls: Counter = Counter()
    g = torch.Generator().manual_seed(0)
    x, W_enc, b_enc = torch.randn(6, 8, generator=g), torch.randn(20, 8, generator=g), torch.randn(20, generator=g)
    b_pre, W_dec, b_dec = torch.randn(8, generator=g), torch.randn(20, 8, generator=g), torch.randn(8, generator=g)
    leaves = [torch.nn.Parameter(t.clone()) for t in (x, W_enc, b_enc, b_pre, W_dec, b_dec)]
    with override_backend("counting", counting_backend(calls)):
        assert "counting" in backend_names()
        vals, idx = ops.topk_encode(*leaves[:3], 4, b_pre=leaves[3], backend="counting", sparse_grad=True)
        x_hat = ops.sparse_decode(vals, idx, leaves[4], leaves[5], backend="counting", sparse_grad=True)
        assert calls == Counter(topk_encode=1, gather_rows=1)
        x_hat.square().sum().backward()
        assert calls == Counter(topk_encode=1, gather_rows=2, row_dots=1, segment_rows=2)
        SparseAdam(leaves[1:], backend="counting").step()
        assert calls["sparse_adam_step_"] == 5
    with torch.no_grad():
        ref_vals, ref_idx = ops.topk_encode(x, W_enc, b_enc, 4, b_pre=b_pre, backend="torch")
    assert torch.equal(idx, ref_idx) and torch.equal(vals.detach(), ref_vals)


def test_override_replaces_an_entry_and_restores_the_table():
    torch_backend = get_backend("torch", "cpu")
    calls: Counter = Counter()
    with override_backend("torch", counting_backend(calls)):
        assert get_backend("torch", "cpu").name == "counting"
        assert get_backend("auto", "cpu").name == "counting", "auto resolves to the overridden entry"
        ops.topk_encode(torch.randn(2, 8), torch.randn(5, 8), torch.randn(5), 2)
        assert calls["topk_encode"] == 1
    assert get_backend("torch", "cpu") is torch_backend
    assert backend_names() == ("auto", "torch", "triton", "triton-fused")


def test_override_restores_the_table_when_the_block_raises():
    triton_entry = get_backend("triton", "cpu")
    with pytest.raises(RuntimeError, match="inside"):
        with override_backend("triton", dataclasses.replace(triton_entry, name="patched")):
            assert get_backend("triton", "cpu").name == "patched"
            raise RuntimeError("inside")
    assert get_backend("triton", "cpu") is triton_entry


def test_a_new_name_is_known_only_inside_its_override():
    built = []

    def factory():
        built.append(1)
        return dataclasses.replace(get_backend("torch", "cpu"), name="lazy")

    with override_backend("lazy", factory):
        assert backend_names() == ("auto", "torch", "triton", "triton-fused", "lazy")
        assert not built, "a factory runs on first use, not on registration"
        assert get_backend("lazy", "cpu").name == "lazy" and get_backend("lazy", "cpu").name == "lazy"
        assert len(built) == 1
    assert "lazy" not in backend_names()
    with pytest.raises(ValueError, match="backend must be one of"):
        get_backend("lazy", "cpu")


def test_override_of_a_new_triton_backend_follows_the_triton_device_rule(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with override_backend("triton-experimental", get_backend("torch", "cpu"), uses_triton=True):
        with pytest.raises(ValueError, match="backend='triton-experimental' needs CUDA tensors"):
            resolve_backend("triton-experimental", "cpu")
        assert resolve_backend("triton-experimental", "cuda") == "triton-experimental"
    with override_backend("torch-experimental", get_backend("torch", "cpu")):
        assert resolve_backend("torch-experimental", "cpu") == "torch-experimental"
    with override_backend("triton", get_backend("torch", "cpu")):  # an override keeps the entry's device rule
        with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
            resolve_backend("triton", "cpu")


@pytest.mark.parametrize("name", ["auto", "", 3])
def test_register_rejects_bad_names(name):
    with pytest.raises(ValueError, match="name must be a non-empty string"):
        register_backend(name, lambda: get_backend("torch", "cpu"), uses_triton=False)


def test_triton_is_not_imported_when_only_the_torch_backend_runs():
    """The ops and every torch primitive, in a fresh interpreter. (Not via a torch.optim.Optimizer:
    its constructor imports torch._dynamo, which imports triton on its own.)"""
    script = textwrap.dedent(
        """
        import sys
        import torch
        from flashsae import ops
        from flashsae.kernels.registry import get_backend

        W_enc, b_enc, W_dec, b_dec = (torch.randn(*s, requires_grad=True) for s in ((40, 8), (40,), (40, 8), (8,)))
        x = torch.randn(5, 8)
        for backend in ("auto", "torch"):
            vals, idx = ops.topk_encode(x, W_enc, b_enc, 3, backend=backend, sparse_grad=True)
            x_hat = ops.sparse_decode(vals, idx, W_dec, b_dec, backend=backend, sparse_grad=True)
            (x_hat - x).square().sum().backward()
            rows, values, valid = W_dec.grad.rows_values_valid()
            moments = [torch.zeros_like(W_dec) for _ in range(2)]
            get_backend(backend, "cpu").sparse_adam_step_(
                W_dec.detach(), values, rows, valid, *moments, torch.zeros(40, dtype=torch.long),
                lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, unit_norm=True,
            )
        print("torch only:", "triton" in sys.modules)
        from flashsae.kernels.registry import get_backend
        get_backend("triton", "cpu")
        print("after the triton backend:", "triton" in sys.modules)
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "torch only: False" in done.stdout, done.stdout
    assert "after the triton backend: True" in done.stdout, "the check itself must see a triton import"


def test_a_backend_built_without_an_aux_encoder_does_not_fold_aux():
    """``topk_encode_with_aux`` defaults to None: a new backend that names only the five primitives runs
    AuxK as a second, masked encoder pass."""
    base = get_backend("torch", "cpu")
    plain = Backend("plain", base.topk_encode, base.gather_rows, base.row_dots, base.segment_rows,
                    base.sparse_adam_step_)
    assert plain.topk_encode_with_aux is None and not plain.folds_aux
    assert plain.float_dtypes == (torch.float32, torch.bfloat16, torch.float16)
