"""Data- and feature-parallel training on 2 CPU processes (gloo) against a single-process run."""
from __future__ import annotations


import pytest
import torch

from flashsae import ops
from flashsae.kernels.keys import EMPTY_KEY, pack_keys
from flashsae.sae.architecture import Architecture
from flashsae.sae.losses import add_aux_k_grads_, aux_k_loss_from_selection
from flashsae.sae.model import TopKSAE
from flashsae.sae.parallel import process_group
from flashsae.sae.parallel.data import allreduce_gradients
from flashsae.sae.parallel.feature import FeatureParallelSAE, feature_split, merge_candidates
from flashsae.sae.parallel.strategy import SingleProcess, make_strategy
from flashsae.sae.store import InMemorySource
from flashsae.rowgrad import RowGrad
from flashsae.sae.trainer import Trainer
from tests.grads import row_values
from tests.ranks import rank_main, run_ranks

WORLD = 2
D_MODEL, K, LOCAL_BATCH, STEPS = 16, 4, 12, 3
F_DP, F_FP = 64, 101  # 101: an uneven feature split (51 + 50)
SEED, EPOCH = 11, 0
TIMEOUT_S = 80


def make_sae(n_features: int, sparse_grad: bool) -> TopKSAE:
    torch.manual_seed(0)
    sae = TopKSAE(D_MODEL, n_features, K, backend="torch", sparse_grad=sparse_grad)
    with torch.no_grad():
        sae.W_enc.add_(0.2 * torch.randn_like(sae.W_enc))
        sae.b_enc.copy_(0.1 * torch.randn(n_features))
        sae.b_dec.copy_(0.1 * torch.randn(D_MODEL))
    return sae


def exact_grid(gen: torch.Generator, shape: tuple[int, ...], scale: float) -> torch.Tensor:
    """Small multiples of ``scale`` (a power of two): their dot products are exact in fp32 in any
    summation order, so a slice's pre-activations equal the whole dictionary's bit for bit."""
    return torch.randint(-3, 4, shape, generator=gen).float() * scale


def make_data() -> torch.Tensor:
    gen = torch.Generator().manual_seed(123)
    return torch.randn(LOCAL_BATCH * WORLD * STEPS + 5, D_MODEL, generator=gen)


def make_optimizer(model: torch.nn.Module, sparse_grad: bool):
    # torch's Adam takes no sparse gradients; SGD (no momentum) does.
    if sparse_grad:
        return torch.optim.SGD(model.parameters(), lr=0.05)
    return torch.optim.Adam(model.parameters(), lr=1e-2)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.to_dense().clone() for n, p in model.named_parameters()}


def sparse_kinds(model: torch.nn.Module) -> dict[str, bool]:
    return {n: isinstance(p.grad, RowGrad) for n, p in model.named_parameters()}


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def run_training(model, sparse_grad: bool, batches, strategy: SingleProcess) -> dict:
    """Train STEPS product steps; record step-1 gradients, their kinds, the losses and the final weights."""
    trainer = Trainer(model, make_optimizer(model, sparse_grad), strategy=strategy)
    out: dict = {"losses": []}
    for step, x in zip(range(STEPS), batches):
        trainer.step(x)
        out["losses"].append(trainer.read_metrics()["mse"])
        if step == 0:
            out["grads"], out["sparse"] = grads(model), sparse_kinds(model)
    out["state"] = state(model)
    return out


def tie_forward_case() -> tuple[TopKSAE, torch.Tensor]:
    """Exact arithmetic with many exact ties (some across the split: 51..53 copy 0..2) and mostly
    negative biases, so many rows have fewer than K positives (zero-filled slots)."""
    gen = torch.Generator().manual_seed(5)
    sae = make_sae(F_FP, False)
    with torch.no_grad():
        sae.W_enc.copy_(exact_grid(gen, (F_FP, D_MODEL), 0.25))
        sae.W_enc[51:54] = sae.W_enc[0:3]
        sae.b_enc.copy_(exact_grid(gen, (F_FP,), 0.125) - 2.0)
        sae.b_dec.zero_()
    return sae, exact_grid(gen, (40, D_MODEL), 0.5)


AUX_K = 6


def aux_case() -> tuple[TopKSAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`tie_forward_case` with sparse gradients, a residual on an exact grid, and dead features on
    both sides of the split (51): the AuxK selection is exact, ties included."""
    sae, x = tie_forward_case()
    sae.sparse_grad = True
    x = x[:3]  # few tokens: most local candidates that lose the merge win for no other token either
    residual = exact_grid(torch.Generator().manual_seed(9), tuple(x.shape), 0.25)
    dead = torch.zeros(F_FP, dtype=torch.bool)
    dead[torch.cat([torch.arange(0, 30, 2), torch.arange(45, F_FP, 3)])] = True
    return sae, x, residual, dead


def variant_case() -> tuple[TopKSAE, torch.Tensor, torch.Tensor]:
    """A Matryoshka skip transcoder (levels split across the ranks' slices) on exact arithmetic: inputs
    x and targets y on grids, so every level's sum is exact in any order."""
    gen = torch.Generator().manual_seed(21)
    arch = Architecture(matryoshka_widths=(20, 60, F_FP), transcoder=True, skip_connection=True, d_out=D_MODEL - 4)
    sae = TopKSAE(D_MODEL, F_FP, K, backend="torch", arch=arch, sparse_grad=True)
    with torch.no_grad():
        sae.W_enc.copy_(exact_grid(gen, (F_FP, D_MODEL), 0.25))
        sae.b_enc.copy_(exact_grid(gen, (F_FP,), 0.125))
        sae.W_dec.copy_(exact_grid(gen, (F_FP, D_MODEL - 4), 0.25))
        sae.b_dec.copy_(exact_grid(gen, (D_MODEL - 4,), 0.25))
        sae.W_skip.copy_(exact_grid(gen, (D_MODEL - 4, D_MODEL), 0.125))
    return sae, exact_grid(gen, (10, D_MODEL), 0.5), exact_grid(gen, (10, D_MODEL - 4), 0.5)


def variant_step(model: TopKSAE, x: torch.Tensor, y: torch.Tensor) -> dict:
    """The levels, and the gradients of their summed squared error against y."""
    out = model(x)
    (out.levels.float() - y).pow(2).sum().backward()
    return {"levels": out.levels.detach(), "grads": grads(model)}


def fold_step(model: TopKSAE, x: torch.Tensor, dead: torch.Tensor) -> dict:
    """One pass with AuxK's selection from the main encoder pass: both selections, and the row gradients of
    the squared error plus the AuxK loss."""
    out, aux = model.forward_with_aux(x, dead, AUX_K)
    residual = (x - out.x_hat).detach()
    ((out.x_hat - x).pow(2).sum() + aux_k_loss_from_selection(model, aux, residual, dead)).backward()
    return {"idx": out.idx, "aux_idx": aux.idx, "aux_vals": aux.vals.detach(), "grads": sparse_rows(model)}


def sparse_rows(model: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(rows, values) of every parameter's `RowGrad`, ascending by row."""
    return {name: row_values(getattr(model, name).grad) for name in ("W_enc", "b_enc", "W_dec")}


def _rank_body(info: process_group.DistInfo) -> dict:
    rank, result = info.rank, {}
    assert info.world_size == WORLD and process_group.is_main() == (rank == 0)
    data, feature = make_strategy("data", info), make_strategy("feature", info)
    assert (data.name, feature.name) == ("data", "feature")
    source = InMemorySource(make_data())
    for sparse in (False, True):
        local = source.batches(LOCAL_BATCH, seed=SEED, epoch=EPOCH, rank=rank, world_size=WORLD, prefetch=0)
        result[f"dp_{sparse}"] = run_training(make_sae(F_DP, sparse), sparse, local, data)
        fp = feature.wrap(make_sae(F_FP, sparse))
        whole = source.batches(LOCAL_BATCH * WORLD, seed=SEED, epoch=EPOCH, prefetch=0)
        result[f"fp_{sparse}"] = run_training(fp, sparse, whole, feature)
        full = feature.full_model(fp)
        result[f"fp_{sparse}"]["gathered"] = None if full is None else state(full)
    sae, x = tie_forward_case()
    with torch.no_grad():
        result["fp_forward"] = FeatureParallelSAE.from_full(sae)(x)
    sae, x, residual, dead = aux_case()
    fp = FeatureParallelSAE.from_full(sae)
    result["fp_aux"] = {"loss": add_aux_k_grads_(fp, x, residual, dead, AUX_K, 1.0), "grads": sparse_rows(fp)}
    result["fp_fold"] = fold_step(FeatureParallelSAE.from_full(sae), x, dead)
    sae, x, y = variant_case()
    result["fp_variant"] = variant_step(FeatureParallelSAE.from_full(sae), x, y)
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    rank_main(rank, port, out_dir, WORLD, TIMEOUT_S, _rank_body)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_ranks(_worker, tmp_path_factory.mktemp("dist"), WORLD, TIMEOUT_S)


@pytest.fixture(scope="module")
def single() -> dict:
    """The same training in this process: global batches of LOCAL_BATCH * WORLD."""
    torch.set_num_threads(1)
    source = InMemorySource(make_data())
    out = {}
    for sparse in (False, True):
        for name, F in (("dp", F_DP), ("fp", F_FP)):
            batches = source.batches(LOCAL_BATCH * WORLD, seed=SEED, epoch=EPOCH, prefetch=0)
            out[f"{name}_{sparse}"] = run_training(make_sae(F, sparse), sparse, batches, SingleProcess())
    return out


TOL = dict(atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grad", "sparse_grad"])
def test_data_parallel_training_matches_single_process(ranks, single, sparse):
    ref = single[f"dp_{sparse}"]
    for r, res in enumerate(ranks):
        got = res[f"dp_{sparse}"]
        assert all(kind == (sparse and n != "b_dec") for n, kind in got["sparse"].items()), got["sparse"]
        for name, g in ref["grads"].items():
            torch.testing.assert_close(got["grads"][name], g, **TOL, msg=f"rank {r} step-1 grad {name}")
        torch.testing.assert_close(got["losses"], ref["losses"], **TOL)
        for name, w in ref["state"].items():
            torch.testing.assert_close(got["state"][name], w, **TOL, msg=f"rank {r} final {name}")
    for name, w in ranks[0][f"dp_{sparse}"]["state"].items():
        assert torch.equal(ranks[1][f"dp_{sparse}"]["state"][name], w), f"replicas diverged in {name}"


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grad", "sparse_grad"])
def test_feature_parallel_grads_are_slices_of_the_single_process_grads(ranks, single, sparse):
    ref = single[f"fp_{sparse}"]["grads"]
    for r, res in enumerate(ranks):
        offset, n = feature_split(F_FP, WORLD)[r]
        got = res[f"fp_{sparse}"]
        assert all(kind == (sparse and n_ != "b_dec") for n_, kind in got["sparse"].items()), got["sparse"]
        for name, g in ref.items():
            expected = g if name == "b_dec" else g[offset : offset + n]
            torch.testing.assert_close(got["grads"][name], expected, **TOL, msg=f"rank {r} step-1 grad {name}")


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grad", "sparse_grad"])
def test_feature_parallel_training_matches_single_process_and_gathers_a_full_sae(ranks, single, sparse):
    ref = single[f"fp_{sparse}"]
    assert ranks[1][f"fp_{sparse}"]["gathered"] is None
    gathered = ranks[0][f"fp_{sparse}"]["gathered"]
    for r in range(WORLD):
        torch.testing.assert_close(ranks[r][f"fp_{sparse}"]["losses"], ref["losses"], **TOL)
    for name, w in ref["state"].items():
        torch.testing.assert_close(gathered[name], w, **TOL, msg=f"gathered {name}")


def test_feature_parallel_forward_picks_the_single_process_topk_with_ties_and_zero_fill(ranks):
    sae, x = tie_forward_case()
    with torch.no_grad():
        ref = sae(x)
    assert (ref.vals > 0).sum(1).min() < K  # the zero-fill path is exercised
    assert (ref.vals[:, :-1] == ref.vals[:, 1:]).logical_and(ref.vals[:, 1:] > 0).any()  # and positive ties
    for res in ranks:
        got = res["fp_forward"]
        assert torch.equal(got.idx, ref.idx) and torch.equal(got.vals, ref.vals)
        torch.testing.assert_close(got.x_hat, ref.x_hat, **TOL)


def test_feature_parallel_matryoshka_skip_transcoder_equals_the_single_process(ranks):
    """Levels, and gradients: each rank's rows are the single process's slice; b_dec and W_skip whole."""
    sae, x, y = variant_case()
    ref = variant_step(sae, x, y)
    for r, res in enumerate(ranks):
        got = res["fp_variant"]
        assert torch.equal(got["levels"], ref["levels"])
        offset, n = feature_split(F_FP, WORLD)[r]
        for name, grad in ref["grads"].items():
            want = grad[offset : offset + n] if name in ("W_enc", "b_enc", "W_dec") else grad
            torch.testing.assert_close(got["grads"][name], want, **TOL, msg=f"rank {r} {name}")


# In-process checks of the pieces (no process group).


def test_feature_split_covers_all_features_contiguously_with_uneven_counts():
    split = feature_split(101, 4)
    assert split == [(0, 26), (26, 25), (51, 25), (76, 25)]
    with pytest.raises(ValueError, match="n_features >= world_size"):
        feature_split(3, 4)


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merging_local_topk_candidates_equals_the_global_topk(world, dtype):
    gen = torch.Generator().manual_seed(world)
    F, d, k = 23, 7, 6  # with world=5 some ranks hold fewer than k features
    # Exact arithmetic (see exact_grid): the merge must then reproduce the global choice exactly.
    W = exact_grid(gen, (F, d), 0.25).to(dtype)
    b = (exact_grid(gen, (F,), 0.125) - 0.5).to(dtype)
    W[15:18], b[15:18] = W[2:5], b[2:5]  # exact ties across ranks
    x = exact_grid(gen, (29, d), 0.5).to(dtype)
    x[:4] = 0  # rows with few positives: zero-filled slots
    ref_vals, ref_idx = ops.topk_encode(x, W, b, k, backend="torch")
    keys = []
    for offset, n in feature_split(F, world):
        vals, idx = ops.topk_encode(x, W[offset : offset + n], b[offset : offset + n], min(k, n), backend="torch")
        empty = torch.full((x.shape[0], k - min(k, n)), EMPTY_KEY, dtype=torch.int64)
        keys.append(torch.cat([pack_keys(vals, idx + offset), empty], dim=1))
    vals, idx, pos = merge_candidates(torch.cat(keys, dim=1), k)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(vals.to(dtype), ref_vals)
    # A winner's position names the rank that owns its feature (what each rank's won-mask uses).
    offsets = torch.tensor([offset for offset, _ in feature_split(F, world)])
    owner = torch.searchsorted(offsets, idx, right=True) - 1
    assert torch.equal(pos // k, owner)


def test_init_distributed_is_a_single_process_no_op_without_torchrun(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    info = process_group.init_distributed()
    assert (info.rank, info.world_size, info.is_main) == (0, 1, True)
    assert not process_group.is_distributed() and process_group.get_world_size() == 1 and process_group.is_main()
    assert isinstance(make_strategy("feature", info), SingleProcess)  # one rank always trains alone
    sae = make_sae(F_DP, False)
    sae(make_data()[:8]).x_hat.sum().backward()
    before = sae.W_dec.grad.clone()
    allreduce_gradients(sae)  # nothing to reduce with one process
    assert torch.equal(sae.W_dec.grad, before)


def test_feature_parallel_aux_k_selects_and_updates_the_single_process_rows(ranks):
    """Each rank's AuxK gradient rows are exactly the single process's rows in its slice (no local
    candidate that lost the global selection is listed, so SparseAdam leaves it alone)."""
    sae, x, residual, dead = aux_case()
    loss = add_aux_k_grads_(sae, x, residual, dead, AUX_K, 1.0)
    reference = sparse_rows(sae)
    assert reference["W_enc"][0].numel() > 0
    for r, res in enumerate(ranks):
        offset, n = feature_split(F_FP, WORLD)[r]
        torch.testing.assert_close(res["fp_aux"]["loss"], loss, **TOL)
        for name, (rows, values) in reference.items():
            mine = (rows >= offset) & (rows < offset + n)
            got_rows, got_values = res["fp_aux"]["grads"][name]
            assert torch.equal(got_rows, rows[mine] - offset), f"rank {r} {name} rows"
            torch.testing.assert_close(got_values, values[mine], **TOL, msg=f"rank {r} {name} values")


def test_feature_parallel_fold_selects_aux_k_across_ranks_as_one_process(ranks):
    """`forward_with_aux` split over features: the same main and AuxK selections as one process (ties
    across the split included) and each rank's gradient rows the single process's rows in its slice."""
    sae, x, _, dead = aux_case()
    reference = fold_step(sae, x, dead)
    assert (reference["aux_vals"] > 0).any() and (reference["aux_vals"] == 0).any()
    for r, res in enumerate(ranks):
        got = res["fp_fold"]
        assert torch.equal(got["idx"], reference["idx"]) and torch.equal(got["aux_idx"], reference["aux_idx"])
        torch.testing.assert_close(got["aux_vals"], reference["aux_vals"], **TOL)
        offset, n = feature_split(F_FP, WORLD)[r]
        for name, (rows, values) in reference["grads"].items():
            mine = (rows >= offset) & (rows < offset + n)
            got_rows, got_values = got["grads"][name]
            assert torch.equal(got_rows, rows[mine] - offset), f"rank {r} {name} rows"
            torch.testing.assert_close(got_values, values[mine], **TOL, msg=f"rank {r} {name} values")
