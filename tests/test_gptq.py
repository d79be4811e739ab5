"""GPTQ (LDLQ) on a single linear: error compensation, act-order, dampening, lazy Min-Max and
lazy NeUQI."""

from __future__ import annotations

import math

import pytest
import torch

from neuqi.quant.gptq import DAMP, gptq_quantize
from neuqi.quant.solver import METHODS, quantize_tensor

BITS, GROUP = 3, 16


def correlated_layer(seed: int = 0, tokens: int = 1024, d_in: int = 64, d_out: int = 48):
    """Inputs with strongly correlated channels of unequal scale, and a random weight."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=gen) / d_in**0.5 + torch.eye(d_in)
    x = torch.randn(tokens, d_in, generator=gen) * torch.rand(d_in, generator=gen).add(0.2)
    x = x @ mix
    weight = 0.05 * torch.randn(d_out, d_in, generator=gen)
    hessian = x.T @ x / tokens
    h_diag = hessian.diagonal() + DAMP * hessian.diagonal().mean()
    return x, weight, hessian, h_diag


def output_error(x: torch.Tensor, weight: torch.Tensor, deq: torch.Tensor) -> float:
    return float((x @ (weight - deq).T).norm())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act_order", [True, False])
def test_gptq_output_error_is_below_rtn_for_each_initialisation(method: str, act_order: bool):
    x, weight, hessian, h_diag = correlated_layer()
    rtn = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method=method)
    res = gptq_quantize(weight, hessian, rtn.scale, rtn.zero_point, bits=BITS,
                        group_size=GROUP, act_order=act_order, block_size=24)
    rtn_err = output_error(x, weight, rtn.dequantize())
    gptq_err = output_error(x, weight, res.dequantize())
    assert gptq_err < 0.95 * rtn_err, (gptq_err, rtn_err)
    # the static groups keep the initialisation's parameters
    assert torch.equal(res.scale, rtn.scale) and torch.equal(res.zero_point, rtn.zero_point)
    assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= 2**BITS - 1
    assert res.damp_used == DAMP
    # the reported error is tr(ΔHΔᵀ) = ‖XΔᵀ‖² / tokens
    assert res.output_error == pytest.approx(gptq_err**2 / x.shape[0], rel=1e-3)


def test_lazy_minmax_gptq_is_below_rtn_and_neuqi_gptq_is_best():
    x, weight, hessian, h_diag = correlated_layer(seed=1)
    rtn = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method="minmax")
    lazy = gptq_quantize(weight, hessian, bits=BITS, group_size=GROUP, lazy="minmax")
    init = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method="neuqi")
    neuqi = gptq_quantize(weight, hessian, init.scale, init.zero_point, bits=BITS,
                          group_size=GROUP)
    rtn_err = output_error(x, weight, rtn.dequantize())
    lazy_err = output_error(x, weight, lazy.dequantize())
    assert lazy_err < 0.95 * rtn_err
    assert output_error(x, weight, neuqi.dequantize()) < lazy_err


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_gives_rtn_bitwise(method: str, act_order: bool):
    _, weight, _, h_diag = correlated_layer(seed=2)
    rtn = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method=method)
    eye = torch.eye(weight.shape[1])
    res = gptq_quantize(weight, eye, rtn.scale, rtn.zero_point, bits=BITS, group_size=GROUP,
                        act_order=act_order, block_size=10)
    assert torch.equal(res.codes, rtn.codes)


@pytest.mark.parametrize("act_order", [True, False])
def test_identity_hessian_lazy_minmax_is_minmax_rtn(act_order: bool):
    _, weight, _, _ = correlated_layer(seed=3)
    rtn = quantize_tensor(weight, None, bits=BITS, group_size=GROUP, method="minmax")
    res = gptq_quantize(weight, torch.eye(weight.shape[1]), bits=BITS, group_size=GROUP,
                        lazy="minmax", act_order=act_order)
    assert torch.equal(res.codes, rtn.codes)
    assert torch.equal(res.scale, rtn.scale) and torch.equal(res.zero_point, rtn.zero_point)


@pytest.mark.parametrize("group_size", [GROUP, -1])
def test_act_order_round_trips_the_permutation(group_size: int):
    """Reordering the inputs (whole groups, so the groups stay the same) does not change which
    column GPTQ processes when under act-order, so the codes are the reordered codes, bitwise."""
    _, weight, hessian, h_diag = correlated_layer(seed=4)
    d_in = weight.shape[1]
    g = d_in if group_size == -1 else group_size
    init = quantize_tensor(weight, h_diag, bits=BITS, group_size=group_size, method="neuqi")
    gen = torch.Generator().manual_seed(5)
    if group_size == -1:
        group_perm = torch.zeros(1, dtype=torch.long)
        perm = torch.randperm(d_in, generator=gen)
    else:
        group_perm = torch.randperm(d_in // g, generator=gen)
        perm = (group_perm.unsqueeze(1) * g + torch.arange(g)).reshape(-1)
    res = gptq_quantize(weight, hessian, init.scale, init.zero_point, bits=BITS,
                        group_size=group_size, block_size=20)
    moved = gptq_quantize(weight[:, perm], hessian[perm][:, perm], init.scale[:, group_perm],
                          init.zero_point[:, group_perm], bits=BITS, group_size=group_size,
                          block_size=20)
    assert torch.equal(moved.codes, res.codes[:, perm])
    # and act-order really reorders: without it the result differs
    plain = gptq_quantize(weight, hessian, init.scale, init.zero_point, bits=BITS,
                          group_size=group_size, act_order=False, block_size=20)
    assert not torch.equal(plain.codes, res.codes)


def test_act_order_on_a_sorted_diagonal_is_the_plain_order():
    _, weight, hessian, h_diag = correlated_layer(seed=6)
    order = torch.argsort(hessian.diagonal(), descending=True)
    weight, hessian, h_diag = weight[:, order], hessian[order][:, order], h_diag[order]
    init = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method="neuqi")
    a = gptq_quantize(weight, hessian, init.scale, init.zero_point, bits=BITS, group_size=GROUP)
    b = gptq_quantize(weight, hessian, init.scale, init.zero_point, bits=BITS, group_size=GROUP,
                      act_order=False)
    assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("act_order", [True, False])
def test_lazy_minmax_does_not_depend_on_the_block_size(act_order: bool):
    """Groups that straddle blocks get their Min-Max from the weights with the pending block
    updates applied: the same parameters as with one block for all columns."""
    _, weight, hessian, _ = correlated_layer(seed=7)
    ref = gptq_quantize(weight, hessian, bits=BITS, group_size=GROUP, lazy="minmax",
                        act_order=act_order, block_size=weight.shape[1])
    res = gptq_quantize(weight, hessian, bits=BITS, group_size=GROUP, lazy="minmax",
                        act_order=act_order, block_size=7)
    assert torch.allclose(res.scale, ref.scale, rtol=1e-4, atol=1e-7)
    assert torch.allclose(res.zero_point, ref.zero_point)
    assert (res.codes != ref.codes).float().mean() < 0.01


def test_non_positive_definite_hessian_is_dampened_further_and_reported():
    _, weight, hessian, h_diag = correlated_layer(seed=8)
    # a negative eigenvalue far beyond 1% of the mean diagonal
    v = torch.linalg.eigh(hessian).eigenvectors[:, 0]
    bad = hessian - 2 * hessian.diagonal().mean() * torch.outer(v, v)
    assert torch.linalg.cholesky_ex(bad + DAMP * bad.diagonal().mean() * torch.eye(64))[1] != 0
    init = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method="minmax")
    res = gptq_quantize(weight, bad, init.scale, init.zero_point, bits=BITS, group_size=GROUP)
    assert res.damp_used > DAMP
    assert math.isfinite(res.output_error)
    assert int(res.codes.max()) <= 2**BITS - 1


def test_rank_deficient_inputs_and_a_dead_channel_work_at_the_default_damping():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(20, 64, generator=gen)  # fewer tokens than inputs: XᵀX is singular
    x[:, 5] = 0  # an input that never fires
    weight = 0.05 * torch.randn(32, 64, generator=gen)
    hessian = x.T @ x / 20
    init = quantize_tensor(weight, hessian.diagonal() + 0.01, bits=BITS, group_size=GROUP,
                           method="neuqi-int")
    res = gptq_quantize(weight, hessian, init.scale, init.zero_point, bits=BITS, group_size=GROUP)
    assert res.damp_used == DAMP
    assert output_error(x, weight, res.dequantize()) < output_error(x, weight, init.dequantize())


def test_non_finite_hessian_falls_back_to_rounding():
    _, weight, hessian, h_diag = correlated_layer(seed=10)
    hessian = hessian.clone()
    hessian[3, 4] = hessian[4, 3] = float("nan")
    init = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method="neuqi")
    res = gptq_quantize(weight, hessian, init.scale, init.zero_point, bits=BITS, group_size=GROUP)
    assert res.damp_used == math.inf
    assert torch.equal(res.codes, init.codes)


def test_bad_arguments_are_refused():
    _, weight, hessian, h_diag = correlated_layer()
    init = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method="minmax")
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(weight, hessian[:10, :10], init.scale, init.zero_point, bits=BITS,
                      group_size=GROUP)
    with pytest.raises(ValueError, match="lazy"):
        gptq_quantize(weight, hessian, bits=BITS, group_size=GROUP)
    with pytest.raises(ValueError, match="scale"):
        gptq_quantize(weight, hessian, init.scale[:, :1], init.zero_point, bits=BITS,
                      group_size=GROUP)


# --- NeUQI solved lazily, inside GPTQ's loop -------------------------------------------------

@pytest.mark.parametrize("method", ["neuqi", "neuqi-int"])
@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_identity_hessian_lazy_neuqi_is_neuqi_rtn(method: str, act_order: bool, backend: str):
    """With H = I nothing is compensated, so each group, solved when GPTQ reaches it, sees its
    original weights: the parameters and codes of `quantize_tensor`, bitwise."""
    _, weight, _, h_diag = correlated_layer(seed=8)
    rtn = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method=method,
                          backend=backend)
    res = gptq_quantize(weight, torch.eye(weight.shape[1]), bits=BITS, group_size=GROUP,
                        lazy=method, h_diag=h_diag, backend=backend, act_order=act_order,
                        block_size=10)
    assert torch.equal(res.scale, rtn.scale) and torch.equal(res.zero_point, rtn.zero_point)
    assert torch.equal(res.codes, rtn.codes)


@pytest.mark.parametrize("act_order", [True, False])
def test_lazy_neuqi_does_not_depend_on_the_block_size(act_order: bool):
    _, weight, hessian, h_diag = correlated_layer(seed=9)
    kw = {"bits": BITS, "group_size": GROUP, "lazy": "neuqi", "h_diag": h_diag,
          "act_order": act_order}
    ref = gptq_quantize(weight, hessian, block_size=weight.shape[1], **kw)
    res = gptq_quantize(weight, hessian, block_size=7, **kw)
    torch.testing.assert_close(res.scale, ref.scale, rtol=1e-5, atol=0)
    assert (res.codes != ref.codes).float().mean() < 1e-3


def test_lazy_neuqi_solves_the_compensated_weights():
    """Lazy NeUQI's groups get NeUQI's parameters for the weights GPTQ has left (not for the
    original ones), which lowers the output error below lazy Min-Max's and below RTN's."""
    x, weight, hessian, h_diag = correlated_layer(seed=10)
    rtn = quantize_tensor(weight, h_diag, bits=BITS, group_size=GROUP, method="neuqi")
    lazy_mm = gptq_quantize(weight, hessian, bits=BITS, group_size=GROUP, lazy="minmax")
    lazy = gptq_quantize(weight, hessian, bits=BITS, group_size=GROUP, lazy="neuqi",
                         h_diag=h_diag)
    err = output_error(x, weight, lazy.dequantize())
    assert err < 0.95 * output_error(x, weight, rtn.dequantize())
    assert err < output_error(x, weight, lazy_mm.dequantize())
    # the first group processed (act-order: the one holding the largest H_jj) saw the original
    # weights; later groups saw compensated ones, so their parameters moved
    first = int(torch.argmax(hessian.diagonal())) // GROUP
    assert torch.equal(lazy.scale[:, first], rtn.scale[:, first])
    assert not torch.equal(lazy.scale, rtn.scale)


def loss64(w, h, q, bits: int) -> torch.Tensor:
    """A row's (one group's) ``sum h (w - ŵ)²`` in float64 from the solver's scale and zero."""
    s, z = q.scale.double(), q.zero_point.double()
    codes = torch.round(w.double() / s + z).clamp(0, 2**bits - 1)
    return (h.double() * (w.double() - s * (codes - z)) ** 2).sum(1)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lazy_neuqi_per_group_solves_pass_the_backend_criterion(bits: int, monkeypatch):
    """Every per-group solve that lazy NeUQI makes on the numba backend (on the compensated
    weights that GPTQ hands it) meets the backend criterion against the reference on the same
    input: never a loss above the reference's by more than 1e-6, and mostly its very scale."""
    import neuqi.quant.gptq as gptq_module

    calls = []
    real = gptq_module.quantize_tensor

    def spy(w, h, **kw):
        res = real(w, h, **kw)
        calls.append((w.clone(), None if h is None else h.clone(), res))
        return res

    monkeypatch.setattr(gptq_module, "quantize_tensor", spy)
    _, weight, hessian, h_diag = correlated_layer(seed=11, d_in=128, d_out=32)
    gptq_quantize(weight, hessian, bits=bits, group_size=32, lazy="neuqi", h_diag=h_diag,
                  backend="numba")
    assert len(calls) == 128 // 32
    same = total = 0
    for w, h, fast in calls:
        ref = real(w, h, bits=bits, group_size=-1, method="neuqi", backend="reference",
                   compile=False)
        lf, lr = loss64(w, h, fast, bits), loss64(w, h, ref, bits)
        assert ((lf - lr) / lr.clamp_min(1e-30)).max() <= 1e-6
        same += int((fast.scale == ref.scale).sum())
        total += fast.scale.numel()
    assert same >= 0.8 * total


# --- refinement after GPTQ: best of two runs per row, scales and zero-points refitted ----------

def test_refit_with_identity_codes_recovers_the_least_squares_parameters():
    """With H = I and codes from an exact grid (w = s (q - z) + tiny noise), the refit finds s, z
    back; a row whose codes are all equal keeps its parameters (no division by zero)."""
    from neuqi.quant.gptq import refit_params

    gen = torch.Generator().manual_seed(12)
    codes = torch.randint(0, 8, (6, 32), generator=gen).to(torch.uint8)
    codes[5, :16] = 3  # one constant group
    s = torch.rand(6, 2, generator=gen) + 0.5
    z = torch.rand(6, 2, generator=gen) * 4
    w = s.repeat_interleave(16, 1) * (codes.float() - z.repeat_interleave(16, 1))
    s_fit, z_fit = refit_params(w, torch.eye(32), codes, torch.ones(6, 2), torch.zeros(6, 2), 16,
                                damp=0.0)
    torch.testing.assert_close(s_fit[:5], s[:5], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(z_fit[:5], z[:5], rtol=1e-4, atol=1e-4)
    w_fit = s_fit.repeat_interleave(16, 1) * (codes.float() - z_fit.repeat_interleave(16, 1))
    torch.testing.assert_close(w_fit, w, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(s_fit).all() and (s_fit > 0).all()


@pytest.mark.parametrize("group_size", [GROUP, -1])
def test_refine_lowers_every_rows_output_error(group_size: int):
    from neuqi.quant.gptq import refine, row_errors

    _, weight, hessian, h_diag = correlated_layer(seed=13)
    lazy = gptq_quantize(weight, hessian, bits=BITS, group_size=group_size, lazy="neuqi",
                         h_diag=h_diag)
    mm = gptq_quantize(weight, hessian, bits=BITS, group_size=group_size, lazy="minmax")
    best = refine(weight, hessian, lazy, mm)
    before = torch.minimum(row_errors(weight, hessian, lazy), row_errors(weight, hessian, mm))
    after = row_errors(weight, hessian, best)
    assert (after <= before * (1 + 1e-6)).all()
    assert after.sum() < 0.99 * before.sum()  # the refit pays on this layer
    assert best.output_error == pytest.approx(float(after.sum()), rel=1e-5)
    # codes are one of the two runs' codes, row by row
    same = (best.codes == lazy.codes).all(1) | (best.codes == mm.codes).all(1)
    assert same.all()
