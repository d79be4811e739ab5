"""The NeUQI solver against brute force, against its baselines, and against the paper's search."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from neuqi.quant.solver import (
    best_zero_point,
    dequantize,
    grouped_error,
    quantize_tensor,
    search_scale,
)
from neuqi.util.errors import UserError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from paper_reference import paper_search

BITS = (2, 3, 4, 8)


def random_groups(groups: int, m: int, levels: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # spreads from "fits easily" to "needs heavy clipping"
    spread = torch.rand(groups, 1, generator=g, dtype=dtype) * 2.5 * levels / 4
    x = torch.randn(groups, m, generator=g, dtype=dtype) * spread
    h = torch.rand(groups, m, generator=g, dtype=dtype) + 0.01
    return x, h / h.sum(1, keepdim=True)


def brute_force_error(x: torch.Tensor, h: torch.Tensor, levels: int) -> torch.Tensor:
    """min_z E(z) by a dense scan of z over every value where any code can change, refined."""
    lo = float((-x.amax(1)).min()) - 1.5
    hi = float((levels - x.amin(1)).max()) + 1.5
    grid = torch.arange(lo, hi, 2e-3, dtype=x.dtype)
    best = torch.full((x.shape[0],), torch.inf, dtype=x.dtype)
    best_z = torch.zeros_like(best)
    for zs in grid.split(128):
        e = grouped_error(x.unsqueeze(1), h.unsqueeze(1), zs.expand(x.shape[0], -1), levels)
        v, i = e.min(1)
        better = v < best
        best, best_z = torch.where(better, v, best), torch.where(better, zs[i], best_z)
    fine = torch.linspace(-2e-3, 2e-3, 2001, dtype=x.dtype)
    zs = best_z.unsqueeze(1) + fine
    return grouped_error(x.unsqueeze(1), h.unsqueeze(1), zs, levels).amin(1)


@pytest.mark.parametrize("bits", BITS)
def test_zero_point_matches_brute_force(bits):
    levels = 2**bits
    x, h = random_groups(150, 32, levels, seed=bits)
    _, e = best_zero_point(x, h, levels)
    brute = brute_force_error(x, h, levels)
    rel = (e - brute) / brute
    assert rel.max() <= 1e-5, f"worse than brute force by {rel.max():.2e}"
    # better than a dense scan only by the scan's own resolution (else E is computed wrongly)
    assert rel.min() >= -1e-6, f"better than brute force by {-rel.min():.2e}"


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_zero_point_in_float32_matches_brute_force(bits):
    levels = 2**bits
    x, h = random_groups(100, 128, levels, seed=10 + bits)
    _, e = best_zero_point(x.float(), h.float(), levels)
    brute = brute_force_error(x, h, levels)
    assert ((e.double() - brute) / brute).max() <= 1e-5


@pytest.mark.parametrize("bits", BITS)
def test_integer_zero_point_is_integer_and_not_better(bits):
    levels = 2**bits
    x, h = random_groups(100, 64, levels, seed=20 + bits)
    z_int, e_int = best_zero_point(x, h, levels, integer=True)
    _, e = best_zero_point(x, h, levels)
    assert torch.equal(z_int, torch.round(z_int))
    assert (e <= e_int * (1 + 1e-12)).all()


def weights(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(rows, cols, generator=g) * 0.02
    # heavy tails: Student-t with 3 degrees of freedom
    n = torch.randn(rows, cols, generator=g)
    chi2 = sum(torch.randn(rows, cols, generator=g) ** 2 for _ in range(3))
    return 0.02 * n / torch.sqrt(chi2 / 3)


@pytest.mark.parametrize("kind", ["normal", "student-t"])
@pytest.mark.parametrize("bits,group_size", [(2, 32), (3, 64), (4, 32), (3, -1)])
def test_method_order_on_every_group(kind, bits, group_size):
    w = weights(kind, 24, 128, seed=bits)
    h = torch.rand(128, generator=torch.Generator().manual_seed(7)) * 3 + 0.05
    loss = {
        m: quantize_tensor(w, h, bits=bits, group_size=group_size, method=m, compile=False).loss
        for m in ("minmax", "neuqi-int", "neuqi")
    }
    # neuqi <= neuqi-int <= minmax, group by group (float32 evaluation: allow its rounding)
    assert (loss["neuqi"] <= loss["neuqi-int"] * (1 + 1e-6)).all()
    assert (loss["neuqi-int"] <= loss["minmax"] * (1 + 1e-6)).all()
    # and NeUQI gains something real over Min-Max
    assert loss["neuqi"].sum() < 0.9 * loss["minmax"].sum()


@pytest.mark.parametrize("method", ["minmax", "neuqi-int", "neuqi"])
@pytest.mark.parametrize("bits,group_size", [(2, 16), (3, -1), (4, 32), (8, 64)])
def test_codes_in_range_and_dequantization_reproduces_loss(method, bits, group_size):
    w = weights("student-t", 16, 128, seed=3)
    h = torch.rand(128, generator=torch.Generator().manual_seed(5)) + 0.1
    q = quantize_tensor(w, h, bits=bits, group_size=group_size, method=method, compile=False)
    assert q.codes.dtype == torch.uint8
    assert int(q.codes.max()) <= 2**bits - 1
    g = 128 if group_size == -1 else group_size
    assert q.scale.shape == (16, 128 // g) and q.zero_point.shape == (16, 128 // g)
    assert q.scale.dtype == torch.float32 and q.zero_point.dtype == torch.float32
    deq = dequantize(q.codes, q.scale, q.zero_point, group_size)
    recomputed = ((w - deq) ** 2 * h).view(16, -1, g).sum(-1)
    torch.testing.assert_close(recomputed, q.loss, rtol=1e-5, atol=1e-12)
    if method != "neuqi":
        assert torch.equal(q.zero_point, torch.round(q.zero_point))


def test_unit_h_is_plain_weight_mse():
    w = weights("normal", 8, 64, seed=1)
    q = quantize_tensor(w, None, bits=3, group_size=32, compile=False)
    deq = q.dequantize()
    torch.testing.assert_close(((w - deq) ** 2).view(8, 2, 32).sum(-1), q.loss, rtol=1e-5, atol=0)


def test_deterministic_bitwise():
    w = weights("student-t", 32, 128, seed=11)
    h = torch.rand(128, generator=torch.Generator().manual_seed(2)) + 0.1
    a = quantize_tensor(w, h, bits=2, group_size=64, compile=False)
    b = quantize_tensor(w.clone(), h.clone(), bits=2, group_size=64, compile=False)
    for name in ("codes", "scale", "zero_point", "loss"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_fast_search_gives_the_paper_search_loss(bits):
    """Pruning and the one-sort window change the work, not the answer; the extra fine grid
    (NeUQI-int's) can only lower the loss below the paper's search."""
    w = weights("student-t", 96, 64, seed=bits).view(-1, 32)
    h = torch.rand_like(w) + 0.05
    h = h / h.sum(1, keepdim=True)
    _, _, ours = search_scale(w, h, 2**bits)
    _, _, exhaustive = search_scale(w, h, 2**bits, prune=False)
    _, _, paper = paper_search(w, h, 2**bits)
    torch.testing.assert_close(ours, exhaustive, rtol=1e-6, atol=0)
    assert ((ours - paper) / paper).max() < 1e-5  # float32 evaluation of both


def test_constant_and_zero_groups():
    w = torch.zeros(2, 64)
    w[1] = 0.5
    for method in ("minmax", "neuqi-int", "neuqi"):
        q = quantize_tensor(w, None, bits=2, group_size=32, method=method, compile=False)
        torch.testing.assert_close(q.dequantize(), w, rtol=0, atol=1e-6)
        assert torch.isfinite(q.scale).all() and (q.scale > 0).all()


def test_group_size_that_does_not_divide_is_a_clear_error():
    w = torch.randn(4, 576)
    with pytest.raises(UserError, match=r"--group-size 128 does not divide .*576.*q_proj"):
        quantize_tensor(w, bits=4, group_size=128, name="model.layers.0.self_attn.q_proj.weight")


@pytest.mark.parametrize("bits", (1, 9))
def test_bits_outside_range_is_a_clear_error(bits):
    with pytest.raises(UserError, match="--bits"):
        quantize_tensor(torch.randn(2, 32), bits=bits, group_size=32)
