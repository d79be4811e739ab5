"""The NeUQI scale search compiled with numba: one group at a time, groups in parallel on the CPU.

It computes what :func:`neuqi.solver.search_scale` (the reference, pure torch) defines, group by
group, with less work:

- the relaxed step (``z₀``) is the reference's own bisection, in the same float32 arithmetic on
  the same sorted weights and prefix sums, so every candidate gets the reference's window; each
  bisection step searches only the index range that the bracket still allows;
- every candidate gets a lower bound on its loss, ``s² f(z₀)`` (the relaxed objective: ``f <= E``
  everywhere), in O(log m) from float64 prefix sums of ``h``, ``h w`` and ``h w²``; candidates are
  visited in increasing bound order and the visit stops at the first one whose bound cannot beat
  the best loss found (branch and bound: the argmin does not change);
- the exact window step (:func:`neuqi.solver.window_zero_point`) runs only on the visited
  candidates, in float64, with one sort of the first crossings (the second crossings are the same
  order shifted by one);
- the integer window scan (NeUQI-int, and the NeUQI-int scale that NeUQI's second fine grid is
  centred on) is bounded the same way.

Each group is solved by one thread from its own data only, so the result does not depend on the
number of threads or on how groups are chunked. No ``fastmath``: the float32 bisection must round
exactly as torch does.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange
from torch import Tensor

# Tolerance of the pruning test: a candidate is skipped only when its lower bound, shrunk by this
# relative margin, is not below the best loss found (covers float rounding in bound and loss).
PRUNE_MARGIN = 1e-6
# Groups per parallel work item (each item allocates its scratch buffers once).
BLOCK_GROUPS = 16
# Mean number of exact (or integer) candidate evaluations per group of the last call (benchmarks).
LAST_EVALS = [0.0]

_F32 = np.float32


@njit(cache=True, inline="always")
def _search_left(a, lo, hi, v):
    """First index in ``[lo, hi]`` with ``a[i] >= v`` (``hi`` if none): torch.searchsorted."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, inline="always")
def _search_right(a, lo, hi, v):
    """First index in ``[lo, hi]`` with ``a[i] > v`` (``hi`` if none): searchsorted(right=True)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] <= v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True)
def _relaxed_z0(ws, hs_p, hws_p, s, n1, iterations):
    """:func:`neuqi.solver.relaxed_zero_point` for one group and one scale, in the same float32
    operations (``ws`` sorted float32, ``hs_p``/``hws_p`` its float32 prefix sums)."""
    m = ws.shape[0]
    half = _F32(0.5)
    n1f = _F32(n1)
    top = _F32(n1 + 0.5)
    x_min = ws[0] / s
    x_max = ws[m - 1] / s
    total_h = hs_p[m]
    total_hw = hws_p[m]
    lo = -half - x_max
    hi = top - x_min
    # index ranges still possible for k_low / k_high inside the bracket (both fall as z rises)
    kl_lo, kl_hi = 0, m
    kh_lo, kh_hi = 0, m
    a = _F32(0.0)
    b = _F32(0.0)
    mid = _F32(0.0)
    for step in range(iterations + 1):
        mid = half * (lo + hi)
        k_low = _search_left(ws, kl_lo, kl_hi, (-half - mid) * s)
        k_high = _search_right(ws, kh_lo, kh_hi, (top - mid) * s)
        h_high = total_h - hs_p[k_high]
        hw_high = total_hw - hws_p[k_high]
        a = hs_p[k_low] + h_high
        b = (hws_p[k_low] + hw_high) / s - n1f * h_high
        if step == iterations:
            break
        if a * mid + b > _F32(0.0):
            hi = mid
            kl_lo, kh_lo = k_low, k_high
        else:
            lo = mid
            kl_hi, kh_hi = k_low, k_high
    if a > _F32(0.0):
        z0 = -b / max(a, _F32(1e-30))
    else:
        z0 = mid
    z0 = min(max(z0, lo), hi)
    if (x_max - x_min) <= _F32(n1 + 1):
        return _F32(0.5 * n1) - half * (x_max + x_min)
    return z0


@njit(cache=True, inline="always")
def _relaxed_bound(ws, p_h, p_hw, p_hw2, s, z0, n1):
    """``s² f(z₀)``: the relaxed objective at ``z₀`` as a loss, a lower bound of ``s² min E`` over
    the window (float64, from prefix sums of ``h``, ``h w``, ``h w²`` in sorted order)."""
    m = ws.shape[0]
    sd = np.float64(s)
    zs = np.float64(z0) * sd
    # below the range: w + z s < -s/2, contributes (w + z s)² - s²/4
    k_low = _search_left(ws, 0, m, _F32((-0.5 - np.float64(z0)) * sd))
    # above: w + z s - n1 s > s/2, contributes (w + z s - n1 s)² - s²/4
    k_high = _search_right(ws, 0, m, _F32((n1 + 0.5 - np.float64(z0)) * sd))
    q = sd * sd * 0.25
    h_l, hw_l, hw2_l = p_h[k_low], p_hw[k_low], p_hw2[k_low]
    low = h_l * zs * zs + 2.0 * zs * hw_l + hw2_l - h_l * q
    sh = zs - n1 * sd
    h_h = p_h[m] - p_h[k_high]
    hw_h = p_hw[m] - p_hw[k_high]
    hw2_h = p_hw2[m] - p_hw2[k_high]
    high = h_h * sh * sh + 2.0 * sh * hw_h + hw2_h - h_h * q
    return max(low, 0.0) + max(high, 0.0)


@njit(cache=True)
def _window_exact(w, h, s, z0, n1, buf):
    """:func:`neuqi.solver.window_zero_point` for one group and one scale, in float64: the exact
    minimiser of ``E`` on ``[z₀ - 1, z₀ + 1]``. Returns ``(z, s² E(z))``.

    The first crossings ``u₁ ∈ (0, 1]`` are ordered by a bucket sort (expected O(m)); the second
    crossings ``u₁ + 1`` follow in the same order. ``buf``: scratch arrays of length ``m``."""
    u_buf, r_buf, hv_buf, kind_buf, bucket_buf, count_buf, perm_buf = buf
    m = w.shape[0]
    sd = np.float64(s)
    inv = 1.0 / sd
    start = np.float64(z0) - 1.0
    b0 = 0.0
    c0 = 0.0
    k = 0
    for i in range(m):
        t = np.float64(w[i]) * inv + start
        c = np.floor(t + 0.5)
        r = t - c
        q0 = min(max(c, 0.0), n1)
        d0 = t - q0
        hi = np.float64(h[i])
        b0 += hi * d0
        c0 += hi * d0 * d0
        # the code rises at u₁ = 0.5 - r if c is in [0, n1 - 1], and at u₁ + 1 if c is in
        # [-1, n1 - 2]; kind 0: both, 1: the second only, 2: the first only
        if c >= -1.0 and c <= n1 - 1.0 and hi > 0.0:
            u_buf[k] = 0.5 - r
            r_buf[k] = r
            hv_buf[k] = hi
            kind_buf[k] = 1 if c < 0.0 else (2 if c > n1 - 2.0 else 0)
            k += 1
    # bucket sort of u₁ (in (0, 1]) into k buckets, then insertion sort within buckets
    for j in range(k + 1):
        count_buf[j] = 0
    for j in range(k):
        bk = min(int(u_buf[j] * k), k - 1)
        bucket_buf[j] = bk
        count_buf[bk + 1] += 1
    for j in range(k):
        count_buf[j + 1] += count_buf[j]
    for j in range(k):
        bk = bucket_buf[j]
        perm_buf[count_buf[bk]] = j
        count_buf[bk] += 1
    for a in range(1, k):
        j = perm_buf[a]
        key = u_buf[j]
        p = a - 1
        while p >= 0 and u_buf[perm_buf[p]] > key:
            perm_buf[p + 1] = perm_buf[p]
            p -= 1
        perm_buf[p + 1] = j
    b = b0
    cc = c0
    lo = 0.0
    best_u = 0.0
    best_e = np.inf
    for phase in range(2):
        skip_kind = 1 if phase == 0 else 2
        for a in range(k):
            i = perm_buf[a]
            if kind_buf[i] == skip_kind:
                continue
            bound = u_buf[i] + phase
            u = min(max(-b, lo), bound)
            e = u * (u + 2.0 * b) + cc
            if e < best_e:
                best_e, best_u = e, u
            hv = hv_buf[i]
            b -= hv
            cc += hv * ((1.0 + 2.0 * phase) - 2.0 * r_buf[i])
            lo = bound
    u = min(max(-b, lo), 2.0)
    e = u * (u + 2.0 * b) + cc
    if e < best_e:
        best_e, best_u = e, u
    # the sweep's E is exact up to float64 rounding (C and B are O(1) sums of h-weighted terms)
    return start + best_u, sd * sd * best_e


@njit(cache=True, inline="always")
def _loss(w, h, s, z, n1):
    """``s² E(z)`` in float64."""
    sd = np.float64(s)
    e = 0.0
    for i in range(w.shape[0]):
        t = np.float64(w[i]) / sd + z
        q = min(max(np.round(t), 0.0), n1)
        d = t - q
        e += np.float64(h[i]) * d * d
    return sd * sd * e


@njit(cache=True)
def _window_integer(w, h, s, z0, n1):
    """:func:`neuqi.solver.window_integer_zero_point` for one group and scale: the best integer
    ``z`` in ``[z₀ - 1, z₀ + 1]`` (the first of equals) and its loss ``s² E(z)``; the (up to)
    three integers are scored in one pass."""
    first = np.ceil(np.float64(z0 - _F32(1.0)))
    top = np.float64(z0 + _F32(1.0))
    inv = 1.0 / np.float64(s)
    e0 = 0.0
    e1 = 0.0
    e2 = 0.0
    for i in range(w.shape[0]):
        t = np.float64(w[i]) * inv + first
        hi = np.float64(h[i])
        d = t - min(max(np.round(t), 0.0), n1)
        e0 += hi * d * d
        d = t + 1.0 - min(max(np.round(t + 1.0), 0.0), n1)
        e1 += hi * d * d
        d = t + 2.0 - min(max(np.round(t + 2.0), 0.0), n1)
        e2 += hi * d * d
    best_z, best = first, e0
    if first + 1.0 <= top and e1 < best:
        best_z, best = first + 1.0, e1
    if first + 2.0 <= top and e2 < best:
        best_z, best = first + 2.0, e2
    s2 = np.float64(s) * np.float64(s)
    return best_z, s2 * best


@njit(cache=True)
def _stage(w, h, ws, hs_p, hws_p, p_h, p_hw, p_hw2, scales, skip, n1, iterations, integer,
           threshold, want_int, z0s, bounds, buf):
    """Best candidate of ``scales`` (those not in ``skip``) whose loss is below ``threshold``.

    Returns ``(index, z, loss)`` (index -1 when none beats ``threshold``) and, with ``want_int``,
    the index of the best scale under an integer zero-point (NeUQI-int's choice on this grid).
    Ties go to the lower index, as ``argmin`` does.
    """
    c = scales.shape[0]
    for j in range(c):
        if skip[j]:
            bounds[j] = np.inf
            continue
        z0s[j] = _relaxed_z0(ws, hs_p, hws_p, scales[j], n1, iterations)
        bounds[j] = _relaxed_bound(ws, p_h, p_hw, p_hw2, scales[j], z0s[j], n1)
    idx = np.argsort(bounds[:c], kind="mergesort")
    keep = 1.0 - PRUNE_MARGIN
    best_j, best_z, best = -1, 0.0, threshold
    evals = 0
    for t in range(c):
        j = idx[t]
        if not bounds[j] * keep < best:
            break
        evals += 1
        if integer:
            z, loss = _window_integer(w, h, scales[j], z0s[j], n1)
        else:
            z, loss = _window_exact(w, h, scales[j], z0s[j], n1, buf)
        if loss < best or (loss == best and best_j >= 0 and j < best_j):
            best_j, best_z, best = j, z, loss
    best_int = -1
    if want_int:
        best_i = np.inf
        for t in range(c):
            j = idx[t]
            if not bounds[j] * keep < best_i:
                break
            evals += 1
            _, loss = _window_integer(w, h, scales[j], z0s[j], n1)
            if loss < best_i or (loss == best_i and j < best_int):
                best_int, best_i = j, loss
    return best_j, best_z, best, best_int, evals


@njit(cache=True, parallel=True)
def _search(w, h, ws, h_sorted, hs_p, hws_p, s_mm, levels, integer, iterations, coarse_steps,
            fine_divisor, fine_half, scale_out, zero_out, evals_out):
    groups, m = w.shape
    n1 = levels - 1
    n_fine = 2 * fine_half
    n_blocks = (groups + BLOCK_GROUPS - 1) // BLOCK_GROUPS
    for blk in prange(n_blocks):
        c_max = max(coarse_steps, 2 * n_fine)
        scales = np.empty(c_max, np.float32)
        skip = np.zeros(c_max, np.bool_)
        z0s = np.empty(c_max, np.float32)
        bounds = np.empty(c_max, np.float64)
        buf = (np.empty(m, np.float64), np.empty(m, np.float64), np.empty(m, np.float64),
               np.empty(m, np.int8), np.empty(m, np.int64), np.empty(m + 1, np.int64),
               np.empty(m, np.int64))
        p_h = np.zeros(m + 1, np.float64)
        p_hw = np.zeros(m + 1, np.float64)
        p_hw2 = np.zeros(m + 1, np.float64)
        offsets = np.empty(n_fine, np.float32)
        for g in range(blk * BLOCK_GROUPS, min(groups, (blk + 1) * BLOCK_GROUPS)):
            wg, hg, wsg = w[g], h[g], ws[g]
            hsg, hwsg = hs_p[g], hws_p[g]
            hso = h_sorted[g]
            for i in range(m):  # float64 prefix sums of h, h w, h w² in sorted order
                hi = np.float64(hso[i])
                wi = np.float64(wsg[i])
                p_h[i + 1] = p_h[i] + hi
                p_hw[i + 1] = p_hw[i] + hi * wi
                p_hw2[i + 1] = p_hw2[i] + hi * wi * wi
            smm = s_mm[g]
            for i in range(coarse_steps):
                scales[i] = smm * _F32((i + 1) / coarse_steps)
                skip[i] = False
            j_c, z_c, loss_c, j_int, ev_c = _stage(
                wg, hg, wsg, hsg, hwsg, p_h, p_hw, p_hw2, scales[:coarse_steps],
                skip[:coarse_steps], n1, iterations, integer, np.inf, not integer, z0s, bounds,
                buf)
            s_c = scales[j_c]
            k = 0
            for j in range(-fine_half, fine_half + 1):
                if j != 0:
                    offsets[k] = smm * _F32(j / fine_divisor)
                    k += 1
            if integer:
                for i in range(n_fine):
                    scales[i] = s_c + offsets[i]
                    skip[i] = False
                n_c = n_fine
            else:
                s_ci = scales[j_int]
                same = s_ci == s_c
                for i in range(n_fine):
                    scales[i] = s_c + offsets[i]
                    skip[i] = False
                    scales[n_fine + i] = s_ci + offsets[i]
                    skip[n_fine + i] = same
                n_c = 2 * n_fine
            j_f, z_f, _, _, ev_f = _stage(
                wg, hg, wsg, hsg, hwsg, p_h, p_hw, p_hw2, scales[:n_c], skip[:n_c], n1,
                iterations, integer, loss_c, False, z0s, bounds, buf)
            evals_out[g] = ev_c + ev_f
            if j_f >= 0:
                scale_out[g] = scales[j_f]
                zero_out[g] = np.float32(z_f)
            else:
                scale_out[g] = s_c
                zero_out[g] = np.float32(z_c)


def search_scale_numba(
    w: Tensor, h: Tensor, w_sorted: Tensor, h_sorted: Tensor, hs_prefix: Tensor,
    hws_prefix: Tensor, s_mm: Tensor, levels: int, grid: tuple[int, int, int],
    integer: bool = False, iterations: int = 16,
) -> tuple[Tensor, Tensor]:
    """NeUQI's scale search (:func:`neuqi.solver.search_scale`) for rows of ``w [G, m]`` with
    normalised ``h [G, m]`` (float32, CPU); returns ``(scale, zero_point)``, each ``[G]``.

    The caller (:func:`neuqi.solver.quantize_tensor`) gives the reference's own torch
    computations of the sorted weights, the float32 prefix sums that the relaxed step bisects on
    and the Min-Max scale, so the kernel starts from the same numbers; ``grid`` is the reference's
    ``(COARSE_STEPS, FINE_DIVISOR, FINE_HALF_WIDTH)``.
    """
    scale = np.empty(w.shape[0], np.float32)
    zero = np.empty(w.shape[0], np.float32)
    evals = np.empty(w.shape[0], np.int64)
    numba.set_num_threads(min(max(1, torch.get_num_threads()), numba.config.NUMBA_NUM_THREADS))
    _search(w.numpy(), h.numpy(), w_sorted.numpy(), h_sorted.contiguous().numpy(),
            hs_prefix.numpy(), hws_prefix.numpy(), s_mm.contiguous().numpy(), levels, integer,
            iterations, *grid, scale, zero, evals)
    LAST_EVALS[0] = float(evals.mean()) if len(evals) else 0.0
    return torch.from_numpy(scale), torch.from_numpy(zero)
