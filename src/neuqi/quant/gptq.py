"""GPTQ (LDLQ) error compensation on top of given per-group scales and zero-points.

Pure tensor code: tensors in, tensors out, on the ``device`` argument. No I/O.

A linear ``y = x Wᵀ`` with weight ``W [out, in]`` and calibration Hessian ``H = XᵀX / tokens``
``[in, in]`` is quantized column by column so that the output error ``tr((W - Ŵ) H (W - Ŵ)ᵀ)``
stays small (Frantar et al. 2022, "GPTQ"; LDLQ of Chee et al. 2023 is the same update):

1. Dampening: ``H + λ·mean(diag H)·I`` with ``λ = damp`` (1%); an input that never fires
   (``H_jj = 0``) gets ``H_jj = 1`` first, as GPTQ does. If a Cholesky factorisation below fails
   (``H`` not positive definite, e.g. from float32 round-off) ``λ`` is multiplied by 10 and the
   factorisation retried; the ``λ`` that worked is returned (``damp_used``), never an exception.
   If no ``λ`` works (a non-finite ``H``) the columns are rounded independently (plain RTN) and
   ``damp_used`` is ``inf``.
2. Act-order: the columns are processed in order of decreasing ``H_jj``. Groups are static: each
   column keeps the ``(s, z)`` of its original group of ``group_size`` consecutive inputs, so the
   output has the usual layout (``ŵ = s·(q - z)``, codes in ``[0, 2**bits - 1]``) and nothing
   downstream needs a permutation.
3. ``U`` = the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = UᵀU``). Column ``j`` (in processing order)
   is rounded with its group's ``(s, z)``: ``q_j = clamp(round(w_j / s + z), 0, n - 1)``; its error
   ``e_j = (w_j - ŵ_j) / U_jj`` is spread over the columns not yet quantized,
   ``w_k -= e_j U_jk`` for ``k > j`` (the optimal-brain-surgeon update).
4. Blocked lazy updates: the update runs inside a block of ``block_size`` columns; the columns
   after the block receive the whole block's errors in one matrix product.

The ``(s, z)`` come either from the caller, computed once from the original weights (*static*:
the NeUQI paper's recipe, ``solver.quantize_tensor`` with ``minmax``, ``neuqi-int`` or ``neuqi``),
or *lazily* (``lazy=`` one of those methods): a group's parameters are solved when its first column
is reached, from the group's weights as they are then, i.e. after the compensation of all columns
processed before, with the Hessian diagonal ``h_diag`` of the group's inputs. ``lazy="minmax"`` is
the original GPTQ's own quantizer (method ``minmax-lazy``; also GPTQModel's and llm-compressor's);
``lazy="neuqi"`` runs NeUQI's search there instead (on the solver ``backend`` given, one call a
group for all rows). Groups stay static under act-order here too: the group's columns are the
``group_size`` consecutive original inputs, all still unquantized when the first of them (in
processing order) comes up, so their current values are exact (pending lazy-block updates
included).

With ``H = I`` every update is zero and the result is bitwise that of rounding to nearest with the
given ``(s, z)``, i.e. of ``solver.quantize_tensor`` (lazily: with the parameters
``solver.quantize_tensor`` finds for the original weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from neuqi.quant.solver import METHODS, check_weight, dequantize, minmax_params, quantize_tensor

LAZY_MINMAX = "minmax-lazy"  # method name of the original GPTQ's lazy per-group Min-Max
# When GPTQ solves a group's (s, z) (`neuqi quantize --gptq-params`): "lazy" when it reaches the
# group's first column, from the compensated weights; "static" once, from the original weights.
GPTQ_PARAMS = ("lazy", "static")
# The defaults gave the lowest perplexity in most cells of issue 34's tables (README Quality).
GPTQ_PARAMS_DEFAULT = "lazy"
GPTQ_REFIT_DEFAULT = True  # `neuqi quantize --gptq-refit` (see refine)
DAMP = 0.01  # fraction of the mean diagonal added to H's diagonal (GPTQ's percdamp)
DAMP_GROWTH = 10.0  # factor on the damping after a failed Cholesky
DAMP_TRIES = 8  # damping up to DAMP * 10**7 of the mean diagonal, then plain rounding
BLOCK_SIZE = 128  # columns per lazy batch update (GPTQ's default)


@dataclass
class GPTQResult:
    """GPTQ's quantized weight, in ``solver.QuantizedTensor``'s conventions.

    codes:        uint8 ``[out, in]`` in ``[0, 2**bits - 1]``
    scale:        float32 ``[out, n_groups]``
    zero_point:   float32 ``[out, n_groups]``
    damp_used:    the dampening fraction that made ``H`` positive definite (``inf``: none did)
    output_error: ``tr((W - Ŵ) H (W - Ŵ)ᵀ)`` with the ``H`` given (undampened), summed over rows
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    damp_used: float
    output_error: float
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.group_size, dtype)


def inverse_hessian_factor(
    hessian: Tensor, damp: float = DAMP
) -> tuple[Tensor | None, float]:
    """The upper Cholesky factor ``U`` of ``(H + λ·mean(diag H)·I)⁻¹`` and the ``λ`` used.

    ``hessian`` is not modified. Starting at ``λ = damp``, ``λ`` grows tenfold after each failed
    factorisation; ``(None, inf)`` when ``DAMP_TRIES`` values all fail.
    """
    diag = hessian.diagonal()
    base = float(diag.mean())
    if not math.isfinite(base) or base <= 0:
        base = 1.0
    dead = diag == 0
    for attempt in range(DAMP_TRIES):
        lam = damp * DAMP_GROWTH**attempt
        work = hessian.clone()
        work.diagonal()[dead] = 1.0
        work.diagonal().add_(lam * base)
        factor, info = torch.linalg.cholesky_ex(work)
        del work
        if int(info) != 0 or not torch.isfinite(factor).all():
            continue
        inverse = torch.cholesky_inverse(factor)
        del factor
        upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
        del inverse
        if int(info) == 0 and torch.isfinite(upper).all():
            return upper, lam
    return None, math.inf


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    scale: Tensor | None = None,
    zero_point: Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    act_order: bool = True,
    block_size: int = BLOCK_SIZE,
    damp: float = DAMP,
    lazy: str | None = None,
    h_diag: Tensor | None = None,
    backend: str = "auto",
    device: torch.device | str | None = None,
    name: str = "weight",
) -> GPTQResult:
    """Quantize ``weight [out, in]`` with GPTQ against ``hessian [in, in]`` (see the module note).

    ``scale``/``zero_point [out, n_groups]`` are the fixed per-group parameters (required unless
    ``lazy``: a method of ``solver.METHODS`` that solves each group's parameters when GPTQ reaches
    it, with ``h_diag [in]`` (None: all ones) and the solver ``backend``). Computation is in
    float32 on ``device`` (default: the weight's); results come back on that device. ``hessian``
    is not modified.
    """
    out_features, in_features, g = check_weight(weight, bits, group_size, name, h_diag)
    if hessian.shape != (in_features, in_features):
        raise ValueError(
            f"{name}: hessian has shape {tuple(hessian.shape)}, need ({in_features}, {in_features})"
        )
    if block_size < 1:
        raise ValueError(f"{name}: block_size {block_size} must be positive")
    n_groups = in_features // g
    device = torch.device(device) if device is not None else weight.device
    levels = 2**bits
    if lazy is not None:
        if lazy not in METHODS:
            raise ValueError(f"{name}: lazy={lazy!r}, need one of {', '.join(METHODS)}")
        scale = torch.ones(out_features, n_groups, device=device)
        zero_point = torch.zeros(out_features, n_groups, device=device)
    elif scale is None or zero_point is None:
        raise ValueError(f"{name}: scale and zero_point are needed unless lazy is set")
    else:
        if scale.shape != (out_features, n_groups) or zero_point.shape != scale.shape:
            raise ValueError(f"{name}: scale/zero_point must have shape ({out_features}, {n_groups})")
        scale = scale.to(device=device, dtype=torch.float32).clone()
        zero_point = zero_point.to(device=device, dtype=torch.float32).clone()

    h = hessian.to(device=device, dtype=torch.float32)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
        work_h = h[perm][:, perm]
    else:
        perm = torch.arange(in_features, device=device)
        work_h = h
    upper, damp_used = inverse_hessian_factor(work_h, damp)
    del work_h
    w_orig = weight.to(device=device, dtype=torch.float32)
    w = w_orig[:, perm].clone()
    groups_of = (perm // g).tolist()  # original group of each column in processing order
    position = torch.empty_like(perm)
    position[perm] = torch.arange(in_features, device=device)
    # lazy Min-Max: the columns (processing positions) of each group, and where each group starts
    group_positions = position.view(n_groups, g)
    group_start = set(group_positions.amin(1).tolist()) if lazy is not None else set()

    codes = torch.empty(out_features, in_features, device=device)
    for i1 in range(0, in_features, block_size):
        i2 = min(i1 + block_size, in_features)
        block = w[:, i1:i2].clone()
        errors = torch.zeros_like(block)
        u_block = upper[i1:i2, i1:i2] if upper is not None else None
        for i in range(i2 - i1):
            j = i1 + i
            grp = groups_of[j]
            if lazy is not None and j in group_start:  # group_start is empty unless lazy
                cols = group_positions[grp]
                current = _current_columns(w, block, errors[:, :i], upper, cols, i1, i2, j)
                scale[:, grp], zero_point[:, grp] = _lazy_params(
                    current, lazy, h_diag, grp, g, bits, backend, device, name)
            s, z = scale[:, grp], zero_point[:, grp]
            col = block[:, i]
            q = torch.round(col / s + z).clamp(0, levels - 1)
            codes[:, j] = q
            if u_block is None:
                continue
            err = (col - s * (q - z)) / u_block[i, i]
            block[:, i:] -= err.unsqueeze(1) * u_block[i, i:].unsqueeze(0)
            errors[:, i] = err
        if upper is not None and i2 < in_features:
            w[:, i2:] -= errors @ upper[i1:i2, i2:]
    del w, upper
    codes = codes[:, position].to(torch.uint8)
    diff = w_orig - dequantize(codes, scale, zero_point, group_size)
    output_error = float(((diff @ h) * diff).sum())
    return GPTQResult(codes, scale, zero_point, damp_used, output_error, bits, group_size)


def _lazy_params(
    current: Tensor, method: str, h_diag: Tensor | None, grp: int, g: int, bits: int,
    backend: str, device: torch.device, name: str,
) -> tuple[Tensor, Tensor]:
    """``method``'s ``(s, z)`` for group ``grp`` from its current weights ``[out, g]``: the same
    per-group solve as ``solver.quantize_tensor`` on the original weight (one group a row)."""
    if method == "minmax":
        return minmax_params(current, 2**bits)
    h = h_diag[grp * g:(grp + 1) * g] if h_diag is not None else None
    res = quantize_tensor(current, h, bits=bits, group_size=-1, method=method, device=device,
                          name=f"{name} group {grp}", backend=backend)
    return res.scale[:, 0], res.zero_point[:, 0]


def _current_columns(
    w: Tensor, block: Tensor, errors: Tensor, upper: Tensor | None, cols: Tensor, i1: int,
    i2: int, j: int,
) -> Tensor:
    """The present values of the not-yet-quantized columns ``cols`` (processing positions, all
    ``>= j``): inside the block they are in ``block``; after it they lack the pending lazy update
    from the block's first ``j - i1`` errors, which is applied here."""
    out = torch.empty(w.shape[0], cols.numel(), device=w.device)
    inside = cols < i2
    out[:, inside] = block[:, cols[inside] - i1]
    later = cols[~inside]
    if later.numel():
        pending = w[:, later]
        if upper is not None and j > i1:
            pending = pending - errors @ upper[i1:j][:, later]
        out[:, ~inside] = pending
    return out


REFIT_ELEMENTS = 2**23  # rows per refit block: at most this many float64 in its [rows, in, groups] term


def refit_params(
    weight: Tensor, hessian: Tensor, codes: Tensor, scale: Tensor, zero_point: Tensor,
    group_size: int, damp: float = DAMP,
) -> tuple[Tensor, Tensor]:
    """The per-group ``(s, z)`` that minimise the output error ``(w - ŵ) H (w - ŵ)ᵀ`` of each row
    with its codes fixed: ``ŵ_i = s_G (q_i - z_G)`` is linear in ``(s_G, c_G = -s_G z_G)``, so each
    row's ``2 · n_groups`` parameters solve one small least-squares system (normal equations in
    float64, ``H`` damped by ``damp`` of its mean diagonal, with a ridge of 1e-6 toward the given
    parameters so a group whose codes are all equal stays where it was). A row whose solution has
    a scale that is not positive and finite keeps its given parameters, so no row's error grows.
    Results on ``weight``'s device, float32, ``[out, n_groups]``."""
    out_features, in_features = weight.shape
    g = in_features if group_size == -1 else group_size
    n = in_features // g
    dev = weight.device
    h = hessian.to(device=dev, dtype=torch.float64).clone()
    h.diagonal().add_(damp * float(h.diagonal().mean()))
    hb = h.view(in_features, n, g)
    b_sum = hb.sum(-1)  # [in, n]: sum over j in group K of H_ij
    m_cc = b_sum.view(n, g, n).sum(1)  # [n, n]
    rows = max(1, REFIT_ELEMENTS // (in_features * n))
    new_s, new_z = scale.clone(), zero_point.clone()
    for lo in range(0, out_features, rows):
        hi = min(lo + rows, out_features)
        q = codes[lo:hi].to(torch.float64)
        w = weight[lo:hi].to(torch.float64)
        s0, z0 = scale[lo:hi].to(torch.float64), zero_point[lo:hi].to(torch.float64)
        k = hi - lo
        qg = q.view(k, n, g)
        t = torch.einsum("iKj,rKj->riK", hb, qg)  # [k, in, n]: sum_{j in K} H_ij q_j
        m_ss = torch.einsum("rGi,rGiK->rGK", qg, t.view(k, n, g, n))
        m_sc = torch.einsum("rGi,GiK->rGK", qg, b_sum.view(n, g, n))
        hw = w @ h  # [k, in]
        b_s = (qg * hw.view(k, n, g)).sum(-1)
        b_c = hw.view(k, n, g).sum(-1)
        system = torch.cat([torch.cat([m_ss, m_sc], 2),
                            torch.cat([m_sc.transpose(1, 2), m_cc.expand(k, n, n)], 2)], 1)
        rhs = torch.cat([b_s, b_c], 1)
        theta0 = torch.cat([s0, -s0 * z0], 1)
        ridge = 1e-6 * system.diagonal(dim1=1, dim2=2).mean(1, keepdim=True).clamp_min(1e-30)
        system = system + torch.diag_embed(ridge.expand(k, 2 * n))
        theta = torch.linalg.solve(system, (rhs + ridge * theta0).unsqueeze(-1)).squeeze(-1)
        s, c = theta[:, :n], theta[:, n:]
        ok = (torch.isfinite(theta).all(1) & (s > 0).all(1)).unsqueeze(1)
        new_s[lo:hi] = torch.where(ok, s, s0).to(scale.dtype)
        new_z[lo:hi] = torch.where(ok, -c / s.where(ok, s0), z0).to(zero_point.dtype)
    return new_s, new_z


def row_errors(weight: Tensor, hessian: Tensor, result: GPTQResult) -> Tensor:
    """Each row's output error ``(w - ŵ) H (w - ŵ)ᵀ`` (rows are independent given ``H``)."""
    diff = weight.to(torch.float32) - result.dequantize()
    return ((diff @ hessian.to(diff)) * diff).sum(1)


def refine(weight: Tensor, hessian: Tensor, result: GPTQResult, other: GPTQResult | None = None,
           damp: float = DAMP) -> GPTQResult:
    """GPTQ's result made better on its own objective, row by row (rows are independent given
    ``H``): each row takes the codes and parameters of ``result`` or of ``other`` (another GPTQ
    run of the same weight, e.g. GPTQ's own lazy Min-Max), whichever has the lower output error,
    then :func:`refit_params` re-solves its scales and zero-points with those codes fixed (kept
    where they lower the row's undamped output error, so no row's error grows)."""
    def pick_rows(a: GPTQResult, b: GPTQResult) -> GPTQResult:
        """Per row, ``b`` where its output error is below ``a``'s."""
        pick = (row_errors(weight, hessian, b) < row_errors(weight, hessian, a)).unsqueeze(1)
        return GPTQResult(torch.where(pick, b.codes, a.codes), torch.where(pick, b.scale, a.scale),
                          torch.where(pick, b.zero_point, a.zero_point), a.damp_used, 0.0, a.bits,
                          a.group_size)

    best = pick_rows(result, other) if other is not None else result
    scale, zero = refit_params(weight, hessian, best.codes, best.scale, best.zero_point,
                               best.group_size, damp)
    out = pick_rows(best, GPTQResult(best.codes, scale, zero, best.damp_used, 0.0, best.bits,
                                     best.group_size))
    out.output_error = float(row_errors(weight, hessian, out).sum())
    return out
