"""RowGrad: float32 compact gradients through autograd, merging, and every optimizer; masked row writes."""
from __future__ import annotations

import pytest
import torch

from flashsae import TopKSAE, ops
from flashsae.rowgrad import RowGrad, RowPart, write_rows_
from tests.grads import row_values


def part(rows, values, valid=None):
    rows = torch.tensor(rows)
    values = torch.as_tensor(values, dtype=torch.float32)
    valid = torch.ones(rows.shape[0], dtype=torch.bool) if valid is None else torch.tensor(valid)
    return RowPart(rows, values, valid)


def dense_of(like, *parts):
    out = torch.zeros(like.shape, dtype=torch.float64)
    for rows, values, valid in parts:
        out.index_add_(0, rows[valid], values[valid].double())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_parts_merge_into_distinct_rows_summed_rank_by_rank(dtype):
    like = torch.zeros(9, 3, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    a = part([4, 1, 0, 0], torch.randn(4, 3, generator=g), [True, True, False, False])  # padding aliases row 0
    a = a._replace(values=a.values * a.valid[:, None])
    b = part([0, 4, 7], torch.randn(3, 3, generator=g))
    grad = RowGrad(like, [a, b])
    assert grad.shape == like.shape and grad.dtype == dtype and len(grad.parts) == 2
    rows, values, valid = grad.rows_values_valid()
    assert rows[valid].tolist() == [0, 1, 4, 7] and values.dtype == torch.float32
    torch.testing.assert_close(values[valid].double(), dense_of(like, a, b)[[0, 1, 4, 7]], rtol=0, atol=1e-6)
    assert not values[~valid].any()
    assert torch.equal(grad.to_dense(), dense_of(like, a, b).to(dtype)), "rounded to the param's dtype once"


def test_autograd_accumulates_two_uses_as_parts_and_keeps_float32():
    W = torch.nn.Parameter(torch.randn(30, 8).bfloat16())
    b = torch.zeros(30, dtype=torch.bfloat16, requires_grad=True)
    x = torch.randn(5, 8).bfloat16()
    total = 0
    for _ in range(2):  # two encoder calls on one W: two parts, accumulated without rounding
        vals, idx = ops.topk_encode(x, W, b, 3, backend="torch", sparse_grad=True)
        total = total + vals.float().sum()
    total.backward()
    assert isinstance(W.grad, RowGrad) and len(W.grad.parts) == 2 and W.grad.dtype == torch.bfloat16
    ops.topk_encode(x, W, b, 3, backend="torch", sparse_grad=True)[0].float().sum().backward()
    assert len(W.grad.parts) == 3, "a later backward adds a part"
    assert row_values(W.grad)[1].dtype == torch.float32
    dense = torch.zeros(30, 8, dtype=torch.float64)
    for _ in range(3):
        Wd = W.detach().double().requires_grad_()
        pre = torch.relu(x.double() @ Wd.T + b.detach().double())
        pre.gather(1, torch.topk(pre, 3).indices).sum().backward()
        dense += Wd.grad
    torch.testing.assert_close(W.grad.to_dense(torch.float64), dense, rtol=1e-5, atol=1e-5)


def test_in_place_scaling_and_zeroing_work_and_other_changes_raise():
    like = torch.zeros(6, 2)
    grad = RowGrad(like, [part([1, 3], [[1.0, 2.0], [3.0, 4.0]])])
    grad.mul_(2.0)
    grad.div_(torch.tensor(4.0))
    assert torch.equal(grad.to_dense()[[1, 3]], torch.tensor([[0.5, 1.0], [1.5, 2.0]]))
    with pytest.raises(RuntimeError, match="in place"):
        grad.clamp_(max=0.0)
    with pytest.raises(RuntimeError, match="in place"):
        grad.add_(torch.ones(6, 2))
    grad.zero_()
    assert not grad.to_dense().any()


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.Adam(ps, lr=0.1),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    lambda ps: torch.optim.AdamW(ps, lr=0.1),
], ids=["Adam", "SGD", "AdamW"])
def test_torch_optimizers_and_grad_clipping_see_the_dense_gradient(make_opt):
    torch.manual_seed(0)
    sparse = TopKSAE(8, 40, 3, backend="torch", sparse_grad=True)
    dense = TopKSAE(8, 40, 3, backend="torch", sparse_grad=False)
    dense.load_state_dict(sparse.state_dict())
    opt_s, opt_d = make_opt(sparse.parameters()), make_opt(dense.parameters())
    for step in range(3):
        x = torch.randn(6, 8, generator=torch.Generator().manual_seed(step))
        for sae, opt in ((sparse, opt_s), (dense, opt_d)):
            opt.zero_grad()
            (sae(x).x_hat - x).pow(2).sum().backward()
            torch.nn.utils.clip_grad_norm_(sae.parameters(), 0.5)
            opt.step()
    assert isinstance(sparse.W_dec.grad, RowGrad)
    for (name, a), b in zip(sparse.named_parameters(), dense.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_masked_row_writes_change_only_valid_rows_even_when_padding_names_a_written_row(dtype):
    dst = (torch.arange(24).reshape(6, 4) * 3 - 7).to(dtype)
    before = dst.clone()
    rows = torch.tensor([2, 0, 5, 0, 0])
    valid = torch.tensor([True, True, True, False, False])  # padding names row 0, which is also written
    new = torch.full((5, 4), 100).to(dtype)
    new[1] = -1
    write_rows_(dst, rows, new, valid)
    expected = before.clone()
    expected[2], expected[0], expected[5] = 100, -1, 100
    assert torch.equal(dst, expected)
    dst = before.clone()  # padding naming row 0 when row 0 is not written: row 0 keeps its value
    write_rows_(dst, torch.tensor([3, 0, 0]), new[:3], torch.tensor([True, False, False]))
    expected = before.clone()
    expected[3] = 100
    assert torch.equal(dst, expected)
    write_rows_(dst, torch.tensor([4]), torch.full((1, 4), 9).to(dtype), None)
    assert (dst[4] == 9).all()
