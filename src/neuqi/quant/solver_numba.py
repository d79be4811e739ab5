"""The NeUQI scale search compiled with numba: one group at a time, groups in parallel on the CPU.

It computes what :func:`neuqi.quant.solver.search_scale` (the reference, pure torch) defines, group by
group, with less work:

- the relaxed step (``z₀``) is the reference's own bisection, in the same float32 arithmetic on
  the same sorted weights and prefix sums, so every candidate gets the reference's window; each
  bisection step searches only the index range that the bracket still allows;
- every candidate gets a lower bound on its loss from the relaxed objective ``f`` (convex,
  ``f <= E`` everywhere): the tangent of ``f`` at the bisection's last point over the distance
  to which the bracket pins ``f``'s minimiser, in O(1) from float64 prefix sums of ``h``,
  ``h w`` and ``h w²`` (:func:`_relaxed_bound`); a candidate whose bound cannot beat the best
  loss found is skipped (branch and bound: the argmin does not change), and the coarse grid's
  small scales are skipped before their bisection by a cheaper bound (:func:`_pair_bound`);
- the exact window step (:func:`neuqi.quant.solver.window_zero_point`) runs only on the visited
  candidates, in float64, without a sort: the crossings are summed into buckets of the window,
  whose edges give exact values and whose chords give lower bounds, and only the buckets that
  could hold a better minimum (than the window's best so far and than the best candidate's
  loss) are solved crossing by crossing (:func:`_window_exact`);
- the integer window scan (NeUQI-int, and the NeUQI-int scale that NeUQI's second fine grid is
  centred on) is bounded the same way; for NeUQI-int, which needs of ``z₀`` only the integers
  within one of it, the bisection stops as soon as they are known.

The helpers that allocate nothing are compiled without numba's runtime (``_nrt=False``): with it,
every call of them increments and decrements the reference count of each array argument (and of
each array unpacked from a tuple) with atomic operations that numba's pruning pass leaves in place
(numba#2345, numba#2350); those calls were a noticeable part of the search.

Each group is solved by one thread from its own data only, so the result does not depend on the
number of threads or on how groups are chunked. No ``fastmath`` but ``reassoc`` on the two
per-weight loops whose float64 sums it lets run on SIMD lanes (:func:`_window_pass`,
:func:`_integer_sums`): the float32 bisection must round exactly as torch does. Those sums'
rounding depends on the CPU's vector width, so exactly tied scales may be resolved otherwise on
another kind of CPU; on one machine the result is always the same.
"""

from __future__ import annotations

from typing import Any

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
# Group size from which a stage visits its candidates by increasing bound (a sort) rather than
# the smallest first and then in index order (the fastest on the 2-core development CPU).
SORTED_VISITS_MIN = 512
# Outermost weight pairs summed by the pair bound of the coarse grid (:func:`_pair_bound`).
PAIR_LIMIT = 8
# Mean number of exact (or integer) candidate evaluations per group of the last call (benchmarks).
LAST_EVALS = [0.0]

_F32 = np.float32


def _njit_no_nrt(**options: Any) -> Any:
    """``njit(**options)`` without numba's runtime (``_nrt=False``, see the module note)."""
    # _nrt is a private option of numba's, which the njit signature in its type stubs lacks
    return njit(_nrt=False, **options)  # type: ignore[call-overload]


@_njit_no_nrt(cache=True, inline="always")
def _search_left(a, lo, hi, v):
    """First index in ``[lo, hi]`` with ``a[i] >= v`` (``hi`` if none): torch.searchsorted."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@_njit_no_nrt(cache=True, inline="always")
def _search_right(a, lo, hi, v):
    """First index in ``[lo, hi]`` with ``a[i] > v`` (``hi`` if none): searchsorted(right=True)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] <= v:
            lo = mid + 1
        else:
            hi = mid
    return lo


@_njit_no_nrt(cache=True)
def _relaxed_z0(ws, hs_p, hws_p, s, n1, iterations, integer):
    """:func:`neuqi.quant.solver.relaxed_zero_point` for one group and one scale, in the same float32
    operations (``ws`` sorted float32, ``hs_p``/``hws_p`` its float32 prefix sums).

    Returns ``(z₀, k_low, k_high, z_k, spread)`` for :func:`_relaxed_bound`: the point ``z_k``
    of the last evaluation and its clipping indices, and how far from ``z_k`` the minimiser of
    ``f`` may lie (half the final bracket; ``0`` with ``0, m`` when the group fits, where
    ``f(z₀) = 0``). ``s² f(z₀)`` itself is no bound: where a heavy weight sits at a clipping
    edge ``f`` is steep, and ``z₀``, within the bracket but not at the minimiser, can have
    ``f(z₀)`` far above the window's smallest loss.

    With ``integer`` (NeUQI-int, which needs of ``z₀`` only the integers within one of it) the
    bisection stops as soon as its bracket lies between two consecutive integers ``n`` and
    ``n + 1`` (clear of both by far more than float32 rounding): ``z₀`` will end inside the
    bracket, so those integers are ``n`` and ``n + 1`` whatever the remaining steps do. It then
    returns the bracket's centre, which has the same two integers, the last point's indices,
    that point, and the bracket's width as the spread."""
    m = ws.shape[0]
    half = _F32(0.5)
    n1f = _F32(n1)
    top = _F32(n1 + 0.5)
    x_min = ws[0] / s
    x_max = ws[m - 1] / s
    if (x_max - x_min) <= _F32(n1 + 1):  # the group fits: the reference returns the centre
        centre = _F32(0.5 * n1) - half * (x_max + x_min)
        return centre, 0, m, centre, _F32(0.0)
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
    prev_low, prev_high = -1, -1
    for step in range(iterations + 1):
        mid = half * (lo + hi)
        k_low = _search_left(ws, kl_lo, kl_hi, (-half - mid) * s)
        k_high = _search_right(ws, kh_lo, kh_hi, (top - mid) * s)
        if k_low != prev_low or k_high != prev_high:  # same indices give the same a and b
            h_high = total_h - hs_p[k_high]
            hw_high = total_hw - hws_p[k_high]
            a = hs_p[k_low] + h_high
            b = (hws_p[k_low] + hw_high) / s - n1f * h_high
            prev_low, prev_high = k_low, k_high
        if step == iterations:
            break
        if a * mid + b > _F32(0.0):
            hi = mid
            kl_lo, kh_lo = k_low, k_high
        else:
            lo = mid
            kl_hi, kh_hi = k_low, k_high
        if integer:
            n = np.floor(lo)
            margin = _F32(1e-6) * (abs(lo) + abs(hi) + _F32(2.0))
            if lo >= n + margin and hi <= n + _F32(1.0) - margin:
                return half * (lo + hi), k_low, k_high, mid, hi - lo
    if a > _F32(0.0):
        z0 = -b / max(a, _F32(1e-30))
    else:
        z0 = mid
    # the minimiser of f lies in [lo, hi], at most half its width from mid, the last point
    return min(max(z0, lo), hi), prev_low, prev_high, mid, half * (hi - lo)


@_njit_no_nrt(cache=True, inline="always")
def _bound_prefix_sums(ws, hs, p_h, p_hw, p_hw2):
    """The float64 prefix sums of ``h``, ``h w`` and ``h w²`` in sorted order (``ws`` sorted,
    ``hs`` in its order) that :func:`_relaxed_bound` reads, written into ``p_*`` (length m + 1,
    ``p_*[0] = 0``)."""
    for i in range(ws.shape[0]):
        hi = np.float64(hs[i])
        wi = np.float64(ws[i])
        p_h[i + 1] = p_h[i] + hi
        p_hw[i + 1] = p_hw[i] + hi * wi
        p_hw2[i + 1] = p_hw2[i] + hi * wi * wi


@_njit_no_nrt(cache=True, inline="always")
def _relaxed_bound(p_h, p_hw, p_hw2, s, z, n1, k_low, k_high, spread):
    """A lower bound of ``s² E`` anywhere, so of the window's smallest loss (float64, from prefix
    sums of ``h``, ``h w``, ``h w²`` in sorted order): ``f <= E`` and ``f`` is convex, so with its
    minimiser within ``spread`` of ``z`` the minimum of ``f`` is at least the tangent's value
    there, ``f(z) - |f'(z)| spread``. ``k_low``, ``k_high`` are the clipping indices at ``z``
    (found in float32 by :func:`_relaxed_z0`: a weight they class otherwise lies at a clipping
    edge, where its term is zero and its slope one of ``f``'s one-sided ones)."""
    m = p_h.shape[0] - 1
    sd = np.float64(s)
    zs = np.float64(z) * sd
    # below the range: w + z s < -s/2, contributes (w + z s)² - s²/4
    # above: w + z s - n1 s > s/2, contributes (w + z s - n1 s)² - s²/4
    q = sd * sd * 0.25
    h_l, hw_l, hw2_l = p_h[k_low], p_hw[k_low], p_hw2[k_low]
    low = h_l * zs * zs + 2.0 * zs * hw_l + hw2_l - h_l * q
    sh = zs - n1 * sd
    h_h = p_h[m] - p_h[k_high]
    hw_h = p_hw[m] - p_hw[k_high]
    hw2_h = p_hw2[m] - p_hw2[k_high]
    high = h_h * sh * sh + 2.0 * sh * hw_h + hw2_h - h_h * q
    value = max(low, 0.0) + max(high, 0.0)
    if spread > 0.0:
        slope = 2.0 * sd * (hw_l + zs * h_l + hw_h + sh * h_h)  # d(s² f)/dz
        # the float32 bisection's last decisions may err by a few ulps of z: widen by that much
        reach = np.float64(spread) + 1e-6 * (abs(np.float64(z)) + 1.0)
        value = max(value - abs(slope) * reach, 0.0)
    return value


def bucket_count(m: int) -> int:
    """Buckets per unit of ``u`` in :func:`_window_exact` for groups of ``m`` weights: about eight
    crossings a bucket, sixteen in long rows (the fastest on the 2-core development CPU)."""
    return max(2, m // 8) if m < 1024 else m // 16


@njit(cache=True)
def _window_buffers(m, k):
    """Scratch arrays of :func:`_window_exact` for groups of ``m`` weights and ``k`` buckets."""
    f = np.float64
    return (np.empty((3, m), f), np.empty(m, np.int32),
            np.empty(4 * k, f), np.empty(m + 1, f), np.empty(m + 1, f), np.empty(m + 1, f),
            np.empty(2 * k, f), np.empty(2 * k, f), np.empty(2 * k, f),
            np.empty(2 * k, np.int64))


@_njit_no_nrt(cache=True, fastmath={"reassoc"})
def _window_pass(w, h, inv, start, n1, kf, vals, bk_a):
    """The per-weight part of :func:`_window_exact`'s first pass, free of loop-carried state but
    its sums, so that it runs on SIMD lanes (``reassoc`` lets the compiler split the sums of
    ``A``, ``B`` and ``C``; nothing else here is reassociated). Writes each weight's bucket and
    what its crossings at ``u₁ = 1/2 - r`` and ``u₁ + 1`` need: ``vals[:, i] = (h₁, r, h₂)``,
    ``h₁`` (``h₂``) its ``h`` where the code rises at ``u₁`` (``u₁ + 1``), else zero, and ``r``
    its rounding residual at ``u = 0``; the crossings' ``(ΔB, ΔC)`` are ``(h₁, h₁ (1 - 2r))``
    and ``(h₂, h₂ (3 - 2r))``, formed by the reader (the fewer stores, one row per quantity, are
    what this loop's time goes to). Returns ``(A, B, C)`` of ``E = A u² + 2 B u + C`` at
    ``u = 0``."""
    b0 = 0.0
    c0 = 0.0
    a0 = 0.0
    k = np.int32(kf)
    for i in range(w.shape[0]):
        t = np.float64(w[i]) * inv + start
        c = np.floor(t + 0.5)
        r = t - c
        d0 = t - min(max(c, 0.0), n1)
        hi = np.float64(h[i])
        b0 += hi * d0
        c0 += hi * d0 * d0
        a0 += hi
        u1 = 0.5 - r
        # the code rises at u₁ if c is in [0, n1 - 1], and at u₁ + 1 if c is in [-1, n1 - 2]
        h1 = hi if (c >= 0.0 and c <= n1 - 1.0) else 0.0
        h2 = hi if (c >= -1.0 and c <= n1 - 2.0) else 0.0
        bk_a[i] = min(np.int32(u1 * kf), k - 1)
        vals[0, i] = h1
        vals[1, i] = r
        vals[2, i] = h2
    return a0, b0, c0


@_njit_no_nrt(cache=True, inline="always")
def _crossing_dc(hv, r, phase):
    """``ΔC`` where a weight's code rises in the window: ``h (1 - 2r)`` at ``u₁`` (``phase`` 0),
    ``h (3 - 2r)`` at ``u₁ + 1`` (1), from its residual ``r`` (:func:`_window_pass`); the bucket
    sums and the refinement must form it alike, bit for bit."""
    return hv * (1.0 - 2.0 * r) if phase == 0 else hv * (3.0 - 2.0 * r)


@_njit_no_nrt(cache=True, inline="always")
def _piece_min(aa, inv_a, bb, cc, lo, hi):
    """``(u, E(u))`` at the minimum of one piece ``E = A u² + 2Bu + C`` of the window on
    ``[lo, hi]``: its vertex ``-B/A`` clamped to the interval."""
    u = min(max(-bb * inv_a, lo), hi)
    return u, u * (aa * u + 2.0 * bb) + cc


@_njit_no_nrt(cache=True)
def _window_exact(w, h, s, z0, n1, threshold, k, buf):
    """:func:`neuqi.quant.solver.window_zero_point` for one group and one scale, in float64: the exact
    minimiser of ``E`` on ``[z₀ - 1, z₀ + 1]``. Returns ``(z, s² E(z))``, or ``(0, inf)`` when
    ``s² E`` is above ``threshold`` everywhere on the window (the caller's best loss: then the
    candidate cannot win and its minimiser is not needed).

    With ``u = z - (z₀ - 1)`` the codes rise at ``u₁ ∈ (0, 1]`` and ``u₁ + 1``, and between
    crossings ``E = A u² + 2Bu + C`` with ``A = Σ h`` (one, up to the float32 rounding of the
    normalised ``h``: taken as summed, since where one input channel carries nearly all of ``h``
    the smallest ``E`` can be so small next to ``u²`` that this rounding would swamp it).
    Instead of sorting the crossings, the window is cut into ``2 k`` buckets of width ``1/k``:
    each crossing adds its ``ΔB``, ``ΔC`` to its bucket, and one sweep gives ``B`` and ``C`` at
    every bucket edge (so ``E`` there, exactly), the exact minimum of every bucket without a
    crossing, and a lower bound for a bucket with crossings: ``E - A u²`` is continuous and
    concave (each crossing lowers its slope), so it lies above its chord over the bucket and the
    minimum of ``A u² + chord`` bounds ``E`` from below. Only the buckets whose bound is below
    the best value found (and below ``threshold``) are solved exactly, by increasing bound: their
    few crossings sorted, then the reference's piecewise sweep. ``buf``:
    :func:`_window_buffers`."""
    vals, bk_a, acc, ref_u, ref_b, ref_c, b_at, c_at, lbs, where = buf
    m = w.shape[0]
    sd = np.float64(s)
    start = np.float64(z0) - 1.0
    kf = np.float64(k)
    aa, b0, c0 = _window_pass(w, h, 1.0 / sd, start, np.float64(n1), kf, vals, bk_a)
    inv_a = 1.0 / aa  # the vertex of a piece A u² + 2Bu + C is at -B/A
    # acc[4 q : 4 q + 4]: the sums of (ΔB, ΔC) at u₁ and at u₁ + 1 of the crossings of bucket q
    for q in range(4 * k):
        acc[q] = 0.0
    for i in range(m):
        q = 4 * bk_a[i]
        r = vals[1, i]
        h1 = vals[0, i]
        h2 = vals[2, i]
        acc[q] += h1
        acc[q + 1] += _crossing_dc(h1, r, 0)
        acc[q + 2] += h2
        acc[q + 3] += _crossing_dc(h2, r, 1)
    bb = b0
    cc = c0
    best_e = np.inf
    best_u = 0.0
    n_open = 0
    prev_open = False
    g_last = 0.0
    for b in range(2 * k):
        u_lo = b / kf
        u_hi = (b + 1) / kf
        # bucket b < k holds the first crossings of weights in bucket b, b >= k the second ones
        slot = 4 * b if b < k else 4 * (b - k) + 2
        db = acc[slot]
        if db == 0.0:  # no crossing (db sums the crossings' h > 0)
            u, e = _piece_min(aa, inv_a, bb, cc, u_lo, u_hi)
            if e < best_e:
                best_e, best_u = e, u
            prev_open = False
            continue
        b1 = bb - db
        c1 = cc + acc[slot + 1]
        if prev_open:  # the left edge is the last bucket's right edge (same value), compared
            g0 = g_last
        else:
            g0 = 2.0 * bb * u_lo + cc
            e0 = aa * u_lo * u_lo + g0
            if e0 < best_e:
                best_e, best_u = e0, u_lo
        g1 = 2.0 * b1 * u_hi + c1
        e1 = aa * u_hi * u_hi + g1
        g_last = g1
        prev_open = True
        if e1 < best_e:
            best_e, best_u = e1, u_hi
        slope = (g1 - g0) * kf
        u = min(max(-0.5 * slope * inv_a, u_lo), u_hi)
        lbs[n_open] = aa * u * u + g0 + slope * (u - u_lo)
        where[n_open] = b
        b_at[n_open] = bb
        c_at[n_open] = cc
        n_open += 1
        bb = b1
        cc = c1
    s2 = sd * sd
    limit = threshold / s2
    keep = 1.0 - PRUNE_MARGIN
    # refine the open buckets by increasing bound, while the next could still hold a better value
    while True:
        j = -1
        lb_min = np.inf
        for jj in range(n_open):
            if lbs[jj] < lb_min:
                lb_min, j = lbs[jj], jj
        if j < 0 or not lb_min * keep < min(best_e, limit):
            break
        lbs[j] = np.inf
        b = where[j]
        phase = 1 if b >= k else 0
        q = b - k * phase
        # its crossings, sorted by insertion (about eight; a scan of the bucket numbers is
        # cheaper than grouping all weights by bucket when few buckets are refined)
        n = 0
        for i in range(m):
            if bk_a[i] == q:
                hv = vals[2 * phase, i]
                if hv > 0.0:
                    r = vals[1, i]
                    pos = (0.5 - r) + phase
                    dc = _crossing_dc(hv, r, phase)
                    a = n - 1
                    while a >= 0 and ref_u[a] > pos:
                        ref_u[a + 1] = ref_u[a]
                        ref_b[a + 1] = ref_b[a]
                        ref_c[a + 1] = ref_c[a]
                        a -= 1
                    ref_u[a + 1] = pos
                    ref_b[a + 1] = hv
                    ref_c[a + 1] = dc
                    n += 1
        bb = b_at[j]
        cc = c_at[j]
        lo = b / kf
        for a in range(n):
            bound = ref_u[a]
            u, e = _piece_min(aa, inv_a, bb, cc, lo, bound)
            if e < best_e:
                best_e, best_u = e, u
            bb -= ref_b[a]
            cc += ref_c[a]
            lo = bound
        u, e = _piece_min(aa, inv_a, bb, cc, lo, (b + 1) / kf)
        if e < best_e:
            best_e, best_u = e, u
    if best_e <= limit:
        # E is exact up to float64 rounding (B and C are O(1) sums of h-weighted terms)
        return start + best_u, s2 * best_e
    return 0.0, np.inf


@_njit_no_nrt(cache=True, fastmath={"reassoc"})
def _integer_sums(w, h, inv, first, n1):
    """``E`` at the integers ``first``, ``first + 1`` and ``first + 2`` in one pass (for
    :func:`_window_integer`); ``reassoc`` lets the three sums run on SIMD lanes."""
    e0 = 0.0
    e1 = 0.0
    e2 = 0.0
    for i in range(w.shape[0]):
        t = np.float64(w[i]) * inv + first
        hi = np.float64(h[i])
        d = t - min(max(np.rint(t), 0.0), n1)  # rint: half to even, as torch.round
        e0 += hi * d * d
        d = t + 1.0 - min(max(np.rint(t + 1.0), 0.0), n1)
        e1 += hi * d * d
        d = t + 2.0 - min(max(np.rint(t + 2.0), 0.0), n1)
        e2 += hi * d * d
    return e0, e1, e2


@_njit_no_nrt(cache=True)
def _window_integer(w, h, s, z0, n1):
    """:func:`neuqi.quant.solver.window_integer_zero_point` for one group and scale: the best integer
    ``z`` in ``[z₀ - 1, z₀ + 1]`` (the first of equals) and its loss ``s² E(z)``; the (up to)
    three integers are scored in one pass."""
    first = np.ceil(np.float64(z0 - _F32(1.0)))
    top = np.float64(z0 + _F32(1.0))
    e0, e1, e2 = _integer_sums(w, h, 1.0 / np.float64(s), first, np.float64(n1))
    best_z, best = first, e0
    if first + 1.0 <= top and e1 < best:
        best_z, best = first + 1.0, e1
    if first + 2.0 <= top and e2 < best:
        best_z, best = first + 2.0, e2
    s2 = np.float64(s) * np.float64(s)
    return best_z, s2 * best


@_njit_no_nrt(cache=True)
def _pair_terms(ws, hs, terms):
    """What :func:`_pair_bound` needs of a group's outer weight pairs, the same for every scale
    (``ws`` sorted, ``hs`` in its order): ``terms[:, i] = (g, h_a h_b / (h_a + h_b),
    min(h_a, h_b))`` of the pair of the ``i``-th smallest and ``i``-th largest weights, ``g`` their
    distance (zeros where ``h_a + h_b = 0``: such a pair adds nothing). Returns the number of
    pairs."""
    m = ws.shape[0]
    n = min(m // 2, PAIR_LIMIT)
    for i in range(n):
        terms[0, i] = np.float64(ws[m - 1 - i]) - np.float64(ws[i])
        ha = np.float64(hs[i])
        hb = np.float64(hs[m - 1 - i])
        terms[1, i] = ha * hb / (ha + hb) if ha + hb > 0.0 else 0.0
        terms[2, i] = min(ha, hb)
    return n


@_njit_no_nrt(cache=True)
def _pair_bound(terms, n_pairs, s, n1):
    """A lower bound of ``s² E`` anywhere (float64), without the relaxed step's bisection.

    ``E >= f`` and in weight units a weight ``d`` outside the range that rounds without clipping
    (``D = (n1 + 1) s`` wide) adds ``s² ψ = d² + d s`` to ``s² f``. The ``i``-th smallest and
    ``i``-th largest weights of the group are ``g`` apart, so at least
    ``L = g - D`` of that lies outside, ``d_a + d_b >= L``, and the pair adds at least
    ``L² h_a h_b / (h_a + h_b) + s min(h_a, h_b) L`` (the least of each part over the splits).
    The pairs are disjoint: their sum bounds ``s² f``. Only the :data:`PAIR_LIMIT` outermost
    pairs are summed (they carry most of it, and a long row's would cost more than the
    bisection); zero when those gaps fit, as for the scales near Min-Max. ``terms``: the group's
    :func:`_pair_terms`.
    """
    sd = np.float64(s)
    width = (n1 + 1) * sd
    total = 0.0
    for i in range(n_pairs):
        ell = terms[0, i] - width
        if ell <= 0.0:  # the gaps only shrink inwards
            break
        total += ell * ell * terms[1, i] + sd * terms[2, i] * ell
    return total


@_njit_no_nrt(cache=True, inline="always")
def _relax(ws, hs_p, hws_p, p_h, p_hw, p_hw2, s, n1, iterations, integer):
    """The relaxed step of one candidate: ``(z₀, lower bound of its loss)``."""
    z0, k_low, k_high, z_k, spread = _relaxed_z0(ws, hs_p, hws_p, s, n1, iterations, integer)
    return z0, _relaxed_bound(p_h, p_hw, p_hw2, s, z_k, n1, k_low, k_high, spread)


@njit(cache=True)
def _stage(w, h, ws, terms, n_pairs, hs_p, hws_p, p_h, p_hw, p_hw2, scales, skip, n1,
           iterations, integer, threshold, want_int, lazy, z0s, bounds, pairs, fresh, order,
           buckets, buf):
    """Best candidate of ``scales`` (those not in ``skip``) whose loss is below ``threshold``.

    Returns ``(index, z, loss)`` (index -1 when none beats ``threshold``) and, with ``want_int``,
    the index of the best scale under an integer zero-point (NeUQI-int's choice on this grid).
    Ties go to the lower index, as ``argmin`` does, whatever the order of the visits.

    A candidate is evaluated only while its lower bound can beat the best loss found. In long
    rows (``m >= SORTED_VISITS_MIN``), where an evaluation costs much more than a sort, they are
    visited by increasing bound; otherwise the one with the smallest bound goes first and the
    others follow in index order (a few more evaluations, no sort). With ``lazy`` (the coarse
    grid, whose small scales clip much and never win) a candidate whose :func:`_pair_bound` is
    positive gets its relaxed step (the costly part of its bound) only if that pair bound is
    below the best loss found among the others.
    """
    c = scales.shape[0]
    keep = 1.0 - PRUNE_MARGIN
    by_bound = w.shape[0] >= SORTED_VISITS_MIN
    n_lazy = 0
    for j in range(c):
        fresh[j] = 1  # 0: not relaxed yet, 1: relaxed (or skipped), 2: relaxed this round
        pairs[j] = 0.0
        bounds[j] = np.inf
        if skip[j]:
            continue
        if lazy:
            pairs[j] = _pair_bound(terms, n_pairs, scales[j], n1)
            if pairs[j] > 0.0:
                fresh[j] = 0
                n_lazy += 1
                continue
        z0s[j], bounds[j] = _relax(ws, hs_p, hws_p, p_h, p_hw, p_hw2, scales[j], n1, iterations,
                                   integer)
    best_j, best_z, best, best_int = -1, 0.0, threshold, -1
    evals = 0
    for phase in range(2 if want_int else 1):
        # phase 0: the loss at the best zero-point; 1: at the best integer one (NeUQI-int)
        use_int = integer or phase == 1
        bj, bz, target = -1, 0.0, threshold if phase == 0 else np.inf
        for rnd in range(2):
            # round 0 visits the relaxed candidates; round 1 those relaxed after it, because
            # their pair bound was below the best loss that round 0 found
            if rnd == 1:
                if n_lazy == 0:
                    break
                n_new = 0
                for j in range(c):
                    if fresh[j] == 0 and pairs[j] * keep < target:
                        z0s[j], bound = _relax(ws, hs_p, hws_p, p_h, p_hw, p_hw2, scales[j],
                                               n1, iterations, integer)
                        bounds[j] = max(bound, pairs[j])
                        fresh[j] = 2
                        n_lazy -= 1
                        n_new += 1
                if n_new == 0:
                    break
            # long rows: by increasing bound; short ones: the smallest bound first (its loss
            # prunes well), then the others in index order
            if by_bound:
                idx = np.argsort(bounds[:c], kind="mergesort")
            else:
                idx = order
                j_first = 0
                for j in range(c):
                    if (rnd == 0 or fresh[j] == 2) and bounds[j] < bounds[j_first]:
                        j_first = j
                idx[0] = j_first
                for j in range(c - 1):
                    idx[j + 1] = j if j < j_first else j + 1
            for rank in range(c):
                j = idx[rank]
                if not bounds[j] * keep < target:
                    if by_bound:
                        break
                    continue
                if rnd == 1 and fresh[j] != 2:
                    continue
                evals += 1
                if use_int:
                    z, loss = _window_integer(w, h, scales[j], z0s[j], n1)
                else:
                    z, loss = _window_exact(w, h, scales[j], z0s[j], n1, target, buckets, buf)
                    if want_int:
                        # what the window step learnt bounds the integer loss of phase 1: the
                        # window's least loss, or (when none beat ``target``) ``target`` itself
                        bounds[j] = max(bounds[j], loss if loss < np.inf else target * keep)
                if loss < target or (loss == target and bj >= 0 and j < bj):
                    bj, bz, target = j, z, loss
        for j in range(c):
            if fresh[j] == 2:
                fresh[j] = 1
        if phase == 0:
            best_j, best_z, best = bj, bz, target
        else:
            best_int = bj
    return best_j, best_z, best, best_int, evals


@njit(cache=True, parallel=True)
def _search(w, h, ws, h_sorted, hs_p, hws_p, s_mm, levels, integer, iterations, coarse_steps,
            fine_divisor, fine_half, buckets, scale_out, zero_out, evals_out):
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
        pairs = np.empty(c_max, np.float64)
        fresh = np.empty(c_max, np.int8)
        order = np.empty(c_max, np.int64)
        terms = np.zeros((3, PAIR_LIMIT), np.float64)
        buf = _window_buffers(m, buckets)
        p_h = np.zeros(m + 1, np.float64)
        p_hw = np.zeros(m + 1, np.float64)
        p_hw2 = np.zeros(m + 1, np.float64)
        offsets = np.empty(n_fine, np.float32)
        for g in range(blk * BLOCK_GROUPS, min(groups, (blk + 1) * BLOCK_GROUPS)):
            wg, hg, wsg = w[g], h[g], ws[g]
            hsg, hwsg = hs_p[g], hws_p[g]
            hso = h_sorted[g]
            _bound_prefix_sums(wsg, hso, p_h, p_hw, p_hw2)
            n_pairs = _pair_terms(wsg, hso, terms)
            smm = s_mm[g]
            for i in range(coarse_steps):
                scales[i] = smm * _F32((i + 1) / coarse_steps)
                skip[i] = False
            j_c, z_c, loss_c, j_int, ev_c = _stage(
                wg, hg, wsg, terms, n_pairs, hsg, hwsg, p_h, p_hw, p_hw2, scales[:coarse_steps],
                skip[:coarse_steps], n1, iterations, integer, np.inf, not integer, True, z0s,
                bounds, pairs, fresh, order, buckets, buf)
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
                wg, hg, wsg, terms, n_pairs, hsg, hwsg, p_h, p_hw, p_hw2, scales[:n_c],
                skip[:n_c], n1, iterations, integer, loss_c, False, False, z0s, bounds, pairs,
                fresh, order, buckets, buf)
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
    """NeUQI's scale search (:func:`neuqi.quant.solver.search_scale`) for rows of ``w [G, m]`` with
    normalised ``h [G, m]`` (float32, CPU); returns ``(scale, zero_point)``, each ``[G]``.

    The caller (:func:`neuqi.quant.solver.quantize_tensor`) gives the reference's own torch
    computations of the sorted weights, the float32 prefix sums that the relaxed step bisects on
    and the Min-Max scale, so the kernel starts from the same numbers; ``grid`` is the reference's
    ``(COARSE_STEPS, FINE_DIVISOR, FINE_HALF_WIDTH)``.
    """
    scale = np.empty(w.shape[0], np.float32)
    zero = np.empty(w.shape[0], np.float32)
    evals = np.empty(w.shape[0], np.int64)
    # numba.config sets NUMBA_NUM_THREADS from the environment through globals(): mypy cannot see it
    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(min(max(1, torch.get_num_threads()), most))
    _search(w.numpy(), h.numpy(), w_sorted.numpy(), h_sorted.contiguous().numpy(),
            hs_prefix.numpy(), hws_prefix.numpy(), s_mm.contiguous().numpy(), levels, integer,
            iterations, *grid, bucket_count(w.shape[1]), scale, zero, evals)
    LAST_EVALS[0] = float(evals.mean()) if len(evals) else 0.0
    return torch.from_numpy(scale), torch.from_numpy(zero)
