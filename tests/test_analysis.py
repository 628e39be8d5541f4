import math

import pytest
import torch

from flashsae.analysis import (THRESHOLDS, EffectiveRank, effective_rank, explained_variance_curve,
                               plot_effective_rank, plot_spectra)


def needed(var: list[float], t: float) -> int:
    """Smallest k with sum(var[:k]) >= t * sum(var), by a plain loop (var sorted descending)."""
    total, acc = sum(var), 0.0
    for k, v in enumerate(var, 1):
        acc += v
        if acc >= t * total * (1 - 1e-12):
            return k
    raise AssertionError("unreachable")


@pytest.mark.parametrize("d", [1, 7, 384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_equal_singular_values_give_full_rank(d, dtype):
    er = effective_rank(torch.full((d,), 2.5, dtype=dtype))
    assert isinstance(er, EffectiveRank) and er.d == d
    assert er.erank.item() == pytest.approx(d, rel=1e-9)
    assert er.erank_frac.item() == pytest.approx(1.0, rel=1e-9)
    for n, t in zip((er.n90, er.n95, er.n99), THRESHOLDS):
        assert n.item() == math.ceil(t * d - 1e-9)


@pytest.mark.parametrize("r,d", [(1, 10), (5, 64), (30, 384)])
def test_rank_r_equal_values_give_r(r, d):
    S = torch.zeros(d)
    S[:r] = 0.7
    er = effective_rank(S[torch.randperm(d, generator=torch.Generator().manual_seed(r))])  # any order
    assert er.erank.item() == pytest.approx(r, rel=1e-9)
    assert er.erank_frac.item() == pytest.approx(r / d, rel=1e-9)
    for n, frac, t in zip((er.n90, er.n95, er.n99), (er.frac90, er.frac95, er.frac99), THRESHOLDS):
        assert n.item() == math.ceil(t * r - 1e-9)
        assert frac.item() == pytest.approx(n.item() / d)


def test_two_level_spectrum_matches_formulas():
    # 4 components of singular value 3 and 60 of value 0.5
    hi, lo, a, b = 3.0, 0.5, 4, 60
    S = torch.tensor([hi] * a + [lo] * b, dtype=torch.float64)
    er = effective_rank(S, d=100)
    p = [hi / (a * hi + b * lo)] * a + [lo / (a * hi + b * lo)] * b
    assert er.erank.item() == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)), rel=1e-12)
    var = [hi ** 2] * a + [lo ** 2] * b
    for n, frac, t in zip((er.n90, er.n95, er.n99), (er.frac90, er.frac95, er.frac99), THRESHOLDS):
        assert n.item() == needed(var, t)
        assert frac.item() == pytest.approx(needed(var, t) / 100)


def test_zeros_and_all_zero_spectrum():
    er = effective_rank(torch.tensor([1.0, 0.0, 0.0]))
    assert er.erank.item() == pytest.approx(1.0) and er.n99.item() == 1
    z = effective_rank(torch.zeros(5))
    assert z.erank.item() == 0 and z.n90.item() == z.n95.item() == z.n99.item() == 0
    assert torch.isfinite(z.erank_frac) and z.frac99.item() == 0


def test_batched_equals_per_row():
    g = torch.Generator().manual_seed(0)
    S = torch.rand(3, 2, 17, generator=g, dtype=torch.float64) ** 3
    S[1, 0] = 0
    er = effective_rank(S, d=20)
    assert er.erank.shape == er.n90.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            one = effective_rank(S[i, j], d=20)
            assert er.erank[i, j].item() == pytest.approx(one.erank.item(), rel=1e-12)
            assert er.n95[i, j].item() == one.n95.item() and er.n99[i, j].item() == one.n99.item()


def test_total_variance_of_truncated_spectrum():
    S = torch.tensor([2.0, 1.0, 1.0])
    full = 10.0  # total variance of the untruncated spectrum: 6 of it is in S
    curve = explained_variance_curve(S, total=full)
    torch.testing.assert_close(curve, torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64) / full)
    er = effective_rank(S, total=full)
    assert er.n90.item() == -1  # not reached within the given components


def test_as_dict_and_invalid_inputs():
    d = effective_rank(torch.tensor([1.0, 1.0])).as_dict()
    assert d["erank"] == pytest.approx(2.0) and d["n99"] == 2 and d["d"] == 2
    with pytest.raises(ValueError, match="non-negative"):
        effective_rank(torch.tensor([1.0, -0.1]))
    with pytest.raises(ValueError, match="NaN or Inf"):
        effective_rank(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match=r"d \(at least len\(S\) = 3\) must be an integer >= 3"):
        effective_rank(torch.ones(3), d=2)
    with pytest.raises(ValueError, match="k >= 1"):
        effective_rank(torch.ones(0))
    with pytest.raises(ValueError, match="unbatched"):
        effective_rank(torch.ones(2, 3)).as_dict()


def test_plots_write_png_files(tmp_path):
    g = torch.Generator().manual_seed(1)
    d = 48
    spectra = {f"{site}.L{layer}": torch.rand(d, generator=g).sort(descending=True).values ** (layer + 1)
               for site in ("attn_out", "mlp_out") for layer in range(3)}
    p1 = plot_spectra(spectra, tmp_path / "spectra.png")
    ranks = {site: {layer: effective_rank(spectra[f"{site}.L{layer}"]) for layer in range(3)}
             for site in ("attn_out", "mlp_out")}
    p2 = plot_effective_rank(ranks, tmp_path / "sub" / "erank.png")
    for p in (p1, p2):
        assert p.exists() and p.stat().st_size > 5000
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
