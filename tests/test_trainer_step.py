"""One `Trainer.step` pinned against a float64 computation by hand: the MSE loss, the AuxK loss on
features forced dead (with its coefficient and its dead-window gate), every gradient, the metrics,
and the parameters after one plain SGD step (which the trainer follows with its decoder upkeep)."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from flashsae.sae.architecture import Architecture
from flashsae.sae.diagnostics import FiringTracker
from flashsae.sae.model import TopKSAE
from flashsae.sae.trainer import NonFiniteError, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny shapes (conftest)

D, F, K, AUX_K, B = 12, 24, 3, 4, 10
LR, AUX_COEF = 0.05, 0.3
WINDOW, TOKENS_BEFORE = 40, 100
# Features forced dead before the step: never fired, or last fired more than WINDOW tokens ago.
NEVER_FIRED, FIRED_LONG_AGO = [1, 7, 15, 22], [4, 11, 18]
POSITIVE_BIAS = [5, 9]
# fp32 arithmetic on O(1) values, against float64.
TOL = dict(rtol=2e-5, atol=2e-6)


def make_sae(sparse_grad: bool) -> TopKSAE:
    """An SAE with a trained-looking encoder (not tied to the decoder), b_dec off zero and negative
    encoder biases but for two features (POSITIVE_BIAS)."""
    gen = torch.Generator().manual_seed(0)
    sae = TopKSAE(D, F, K, backend="torch", sparse_grad=sparse_grad)
    with torch.no_grad():
        sae.set_decoder_(torch.randn(F, D, generator=gen))
        sae.W_enc.add_(0.4 * torch.randn(F, D, generator=gen))
        sae.b_enc.copy_(-0.05 - 0.2 * torch.rand(F, generator=gen))
        sae.b_enc[POSITIVE_BIAS] = torch.tensor([0.3, 0.25])
        sae.b_dec.copy_(0.3 * torch.randn(D, generator=gen))
    return sae


def make_tracker(tokens_before: int) -> FiringTracker:
    """A tracker that has seen ``tokens_before`` tokens, with the features of NEVER_FIRED and
    FIRED_LONG_AGO dead (when the window has been seen) and every other one recently fired."""
    tracker = FiringTracker(F, WINDOW)
    last_fired = torch.full((F,), tokens_before, dtype=torch.int64)
    last_fired[NEVER_FIRED] = -1
    last_fired[FIRED_LONG_AGO] = tokens_before - WINDOW - torch.tensor([0, 3, 17])
    tracker.load_state_dict({"window": WINDOW, "tokens_seen": tokens_before, "last_fired": last_fired,
                             "fire_count": (last_fired >= 0).to(torch.int64)})
    return tracker


def dead_mask(fired: torch.Tensor | None = None) -> torch.Tensor:
    """The features forced dead, less those that have ``fired`` (bool [F]) since."""
    dead = torch.zeros(F, dtype=torch.bool)
    dead[NEVER_FIRED + FIRED_LONG_AGO] = True
    return dead if fired is None else dead & ~fired


def make_batch(sae: TopKSAE, seed: int = 1) -> torch.Tensor:
    """B tokens; token 0 sits at b_dec, where only the two positive-bias features fire (fewer than K: a
    zero slot), token 1 close to it (activations below 1)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=gen) + 0.2
    x[0] = sae.b_dec.detach()
    x[1] = sae.b_dec.detach() + 0.2 * x[1]
    return x


def stable_topk(values: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest per row, ties to the lower index; asserts the choice is clear of fp32 noise."""
    order = torch.sort(values, dim=1, descending=True, stable=True)
    top = order.values[:, : k + 1]
    positive_gaps = torch.where(top[:, :-1] > 0, top[:, :-1] - top[:, 1:], torch.inf)
    assert (positive_gaps > 1e-4).all(), "the test data must not hold near ties"
    return order.indices[:, :k]


def hand_step(sae: TopKSAE, x: torch.Tensor, aux_active: bool, dead: torch.Tensor | None = None) -> dict[str, object]:
    """The step in float64: losses, gradients (W_dec's with its radial part removed) and SGD's result.
    ``dead``: the features dead before the step (default `dead_mask`)."""
    dead = dead_mask() if dead is None else dead
    params = {n: p.detach().double().requires_grad_() for n, p in sae.named_parameters()}
    W_enc, b_enc, W_dec, b_dec = (params[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec"))
    x = x.double()
    pre = torch.relu((x - b_dec) @ W_enc.T + b_enc)
    idx = stable_topk(pre.detach(), K)
    z = torch.zeros_like(pre).scatter(1, idx, pre.gather(1, idx))
    x_hat = z @ W_dec + b_dec
    sq_err = (x_hat - x).pow(2).sum()
    mse = sq_err / (B * D)
    total, aux, aux_idx = mse, torch.zeros((), dtype=torch.float64), None
    if aux_active:
        residual = (x - x_hat).detach()
        # AuxK: the dead features' pre-activations (b_dec as a fixed shift), their top AUX_K decoded
        # without b_dec, reconstruct the residual. Live features count as zero (they may fill zero slots).
        pre_aux = torch.relu((x - b_dec.detach()) @ W_enc.T + b_enc)
        dead_pre = pre_aux.detach().masked_fill(~dead, 0.0)
        aux_idx = stable_topk(dead_pre, AUX_K)
        z_aux = torch.zeros_like(pre_aux).scatter(1, aux_idx, dead[aux_idx] * pre_aux.gather(1, aux_idx))
        aux = (residual - z_aux @ W_dec).pow(2).sum() / residual.pow(2).sum()
        total = mse + AUX_COEF * aux
    total.backward()
    grads = {n: p.grad for n, p in params.items()}
    w = W_dec.detach()
    grads["W_dec"] = grads["W_dec"] - (grads["W_dec"] * w).sum(1, keepdim=True) * w  # the trainer's upkeep
    after = {n: params[n].detach() - LR * grads[n] for n in params}
    after["W_dec"] = after["W_dec"] / after["W_dec"].norm(dim=1, keepdim=True)
    x_centred = x - x.mean(0)
    return {"idx": idx, "aux_idx": aux_idx, "mse": mse.item(), "aux": aux.item(), "grads": grads, "after": after,
            "sq_err": sq_err.item(), "var": x_centred.pow(2).sum().item(), "positives": (z > 0).sum().item(),
            "fvu": (sq_err / x_centred.pow(2).sum()).item(), "l0": (z > 0).sum().item() / B,
            "fired": (z > 0).any(0), "z": z.detach()}


def run_step(sparse_grad: bool, tokens_before: int, aux_coef: float = AUX_COEF, lr: float = LR):
    sae = make_sae(sparse_grad)
    x = make_batch(sae)
    expected = hand_step(sae, x, aux_active=tokens_before >= WINDOW and aux_coef > 0)
    trainer = Trainer(sae, torch.optim.SGD(sae.parameters(), lr=lr), tracker=make_tracker(tokens_before),
                      aux_k=AUX_K, aux_coef=aux_coef, dead_window=WINDOW)
    return sae, x, trainer, expected


@pytest.mark.parametrize("sparse_grad", [False, True], ids=["dense_grad", "sparse_grad"])
def test_a_step_with_aux_k_on_dead_features_is_the_float64_step_by_hand(sparse_grad):
    sae, x, trainer, expected = run_step(sparse_grad, TOKENS_BEFORE)
    # The model picks the float64 selections (the data keep clear of ties), AuxK only among the dead.
    assert torch.equal(sae.encode(x)[1], expected["idx"])
    aux_selection = sae._select(x, sae.W_enc, sae.b_enc, sae.b_dec.detach(), AUX_K, dead_mask())
    assert torch.equal(aux_selection.idx, expected["aux_idx"])
    fired = aux_selection.vals > 0
    assert dead_mask()[expected["aux_idx"][fired]].all() and fired.sum() > B, "AuxK fires dead features only"
    trainer.step(x)
    for name, param in sae.named_parameters():
        grad = param.grad.to_dense() if sparse_grad and name != "b_dec" else param.grad
        torch.testing.assert_close(grad.double(), expected["grads"][name], **TOL, msg=f"gradient of {name}")
        torch.testing.assert_close(param.detach().double(), expected["after"][name], **TOL, msg=f"{name} after the step")
    metrics = trainer.read_metrics()
    assert metrics["aux_loss"] == pytest.approx(expected["aux"], rel=1e-5) and expected["aux"] > 0.1
    assert metrics["mse"] == pytest.approx(expected["mse"], rel=1e-5)
    assert metrics["fvu"] == pytest.approx(expected["fvu"], rel=1e-5)
    assert metrics["l0"] == expected["l0"]
    z = expected["z"]  # the batch holds a zero slot and activations below 1, so l0 counts exactly the positives
    assert (z[0] > 0).sum() == 2 and 0 < z[1].max() < 1 and (z > 1).any()
    # The dead stay dead (the window still reaches past them) unless they fired in this batch.
    assert 0 < expected["fired"][dead_mask()].sum() < dead_mask().sum()
    assert metrics["dead_frac"] == pytest.approx((dead_mask() & ~expected["fired"]).sum().item() / F)


@pytest.mark.parametrize("tokens_before,aux_coef", [(WINDOW - 1, AUX_COEF), (WINDOW, AUX_COEF), (TOKENS_BEFORE, 0.0)],
                         ids=["window-not-yet-seen", "window-just-seen", "coefficient-zero"])
def test_aux_k_is_gated_by_the_dead_window_and_the_coefficient(tokens_before, aux_coef):
    """Before a whole window of tokens has been seen no feature counts as dead, so the step is the MSE
    step alone; from the window's last token on AuxK joins in."""
    sae, x, trainer, expected = run_step(False, tokens_before, aux_coef)
    trainer.step(x)
    for name, param in sae.named_parameters():
        torch.testing.assert_close(param.detach().double(), expected["after"][name], **TOL, msg=name)
    aux = trainer.read_metrics()["aux_loss"]
    assert (aux > 0) == (tokens_before >= WINDOW and aux_coef > 0) and aux == pytest.approx(expected["aux"], rel=1e-5)


def test_metrics_sum_over_every_step_since_the_last_read():
    """Two steps (no learning: lr 0) read at once: the squared errors, variances, positives and tokens
    add up over both, the AuxK loss is their mean (the second step's dead set less what fired in the
    first), and the throughput is the tokens over the time since the last read."""
    import time

    sae = make_sae(False)
    xs = [make_batch(sae, seed) for seed in (1, 2)]
    before_init = time.perf_counter()
    trainer = Trainer(sae, torch.optim.SGD(sae.parameters(), lr=0.0), tracker=make_tracker(TOKENS_BEFORE),
                      aux_k=AUX_K, aux_coef=AUX_COEF, dead_window=WINDOW)
    after_init = time.perf_counter()
    first = hand_step(sae, xs[0], aux_active=True)
    second = hand_step(sae, xs[1], aux_active=True, dead=dead_mask(first["fired"]))
    for x in xs:
        trainer.step(x)
    before_read = time.perf_counter()
    metrics = trainer.read_metrics()
    after_read = time.perf_counter()
    assert metrics["mse"] == pytest.approx((first["sq_err"] + second["sq_err"]) / (2 * B * D), rel=1e-5)
    assert metrics["fvu"] == pytest.approx((first["sq_err"] + second["sq_err"]) / (first["var"] + second["var"]),
                                           rel=1e-5)
    assert metrics["l0"] == (first["positives"] + second["positives"]) / (2 * B)
    assert metrics["aux_loss"] == pytest.approx((first["aux"] + second["aux"]) / 2, rel=1e-5)
    assert first["aux"] != pytest.approx(second["aux"], rel=1e-2)
    tokens = 2 * B
    assert tokens / (after_read - before_init) <= metrics["tokens_per_s"] <= tokens / (before_read - after_init)
    again = trainer.read_metrics()  # nothing since the last read
    assert again["mse"] == again["l0"] == again["aux_loss"] == 0.0


def test_fvu_is_nan_for_a_batch_without_variance_and_exact_for_a_tiny_one():
    sae = make_sae(False)
    trainer = Trainer(sae, torch.optim.SGD(sae.parameters(), lr=0.0), tracker=make_tracker(0), dead_window=WINDOW)
    trainer.step(make_batch(sae)[2:3].expand(B, D).contiguous())  # B copies of one token
    assert torch.isnan(torch.tensor(trainer.read_metrics()["fvu"]))
    x = make_batch(sae)[2] + 0.02 * torch.randn(B, D, generator=torch.Generator().manual_seed(3))
    expected = hand_step(sae, x, aux_active=False)
    assert 0 < expected["var"] < 1
    trainer.step(x)
    assert trainer.read_metrics()["fvu"] == pytest.approx(expected["fvu"], rel=1e-5)


# --------------------------------------------------------------------------------- the variants' steps
def _variant_sae(arch: Architecture) -> TopKSAE:
    gen = torch.Generator().manual_seed(3)
    sae = TopKSAE(D, F, K, backend="torch", arch=arch)
    with torch.no_grad():
        sae.W_enc.add_(0.4 * torch.randn(F, D, generator=gen))
        sae.b_enc.copy_(0.1 * torch.randn(F, generator=gen))
        sae.b_dec.copy_(0.3 * torch.randn(sae.d_out, generator=gen))
    return sae


def test_a_matryoshka_step_descends_the_sum_of_every_levels_squared_error():
    """The loss is (||x_hat - x||^2 + sum over the inner levels of ||level - x||^2) / (B * D): one SGD step
    moves the encoder and b_dec by the float64 gradient of exactly that sum."""
    arch = Architecture(matryoshka_widths=(6, 12, F))
    sae = _variant_sae(arch)
    x = make_batch(sae)
    ref = copy.deepcopy(sae).to(torch.float64)
    out = ref(x.double(), check_finite=False)
    loss = (out.x_hat - x.double()).pow(2).sum() + (out.levels[:-1] - x.double()).pow(2).sum()
    (loss / (B * D)).backward()
    Trainer(sae, torch.optim.SGD(sae.parameters(), lr=LR)).step(x)
    for name in ("W_enc", "b_enc", "b_dec"):
        want = getattr(ref, name).detach() - LR * getattr(ref, name).grad
        torch.testing.assert_close(getattr(sae, name).detach().double(), want, **TOL, msg=name)


@pytest.mark.parametrize("bad", ["x", "y", "both"])
def test_a_transcoder_step_stops_on_nan_in_its_input_or_its_target(bad):
    """check_every_step: a NaN in x, in y or in both stops the step before the weights move."""
    sae = _variant_sae(Architecture(transcoder=True, d_out=7))
    trainer = Trainer(sae, torch.optim.SGD(sae.parameters(), lr=LR), check_every_step=True)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(B, D, generator=gen), torch.randn(B, 7, generator=gen)
    trainer.step(x, y)  # a good step first
    before = {n: p.detach().clone() for n, p in sae.named_parameters()}
    if bad in ("x", "both"):
        x[3, 2] = float("nan")
    if bad in ("y", "both"):
        y[5, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="^step 2: the batch of activations contains NaN or Inf"):
        trainer.step(x, y)
    assert all(torch.equal(p, before[n]) for n, p in sae.named_parameters())


def test_matryoshka_level_fvus_divide_by_the_batch_variance_and_are_nan_without_variance():
    """fvu_m{width}: each inner level's squared error over the batch's centred sum of squares, exact for a
    batch whose variance is far below 1 and NaN for a batch without variance."""
    sae = _variant_sae(Architecture(matryoshka_widths=(6, 12, F)))
    trainer = Trainer(sae, torch.optim.SGD(sae.parameters(), lr=0.0))
    x = sae.b_dec.detach() + 0.01 * make_batch(sae)  # variance ~1e-4 * B * D
    with torch.no_grad():
        levels = sae(x).levels
    trainer.step(x)
    metrics = trainer.read_metrics()
    var = (x.double() - x.double().mean(0)).pow(2).sum()
    assert 0 < var < 1
    for width, level in zip((6, 12), levels):
        want = float((level.double() - x.double()).pow(2).sum() / var)
        assert metrics[f"fvu_m{width}"] == pytest.approx(want, rel=1e-4), width
    trainer.step(sae.b_dec.detach().expand(B, D).clone())
    metrics = trainer.read_metrics()
    assert all(math.isnan(metrics[f"fvu_m{width}"]) for width in (6, 12))
