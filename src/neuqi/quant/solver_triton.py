"""The NeUQI scale search as a triton kernel: the solver on a GPU (and in triton's interpreter,
``TRITON_INTERPRET=1``, on CPU tensors, which is how the tests check it on a machine without one).

It computes what :func:`neuqi.quant.solver.search_scale` (the reference, pure torch) defines, for one
group per program:

- the relaxed step (``z₀``) is the reference's bisection in the same float32 arithmetic, on the
  same sorted weights and prefix sums (made by torch before the launch, as for the numba kernel),
  so every candidate scale gets the reference's window. The reference's ``searchsorted`` is a
  count over the group's sorted weights (``#{w < v}``), which a program does for all of a
  stage's candidates at once as one ``[candidates, group]`` comparison;
- every candidate then gets the reference's cheap score (two code/zero-point alternations) and
  the exact window step; the window's crossings are ordered by one sort per candidate (a
  bitonic network over keys that carry the crossing and its index), and the pieces' sums come
  from ``tl.cumsum``;
- NeUQI-int scans the window's integers, and NeUQI searches the fine grid around NeUQI-int's
  best coarse scale too, as the reference does.

Where the numba kernel saves work by skipping candidates one group at a time (branch and bound,
bucketed window step), a GPU program runs its lanes in lock step: a candidate skipped for one group
is not skipped for its neighbours, and the branches cost more than they save. So this kernel
scores every candidate of a stage at once, a ``[candidates, group]`` tile per program: more
arithmetic than the numba kernel, all of it parallel and without a branch. The result is the
reference's up to ties (the same criterion as the numba kernel: ``tests/test_solver_backends.py``).

Contractions of ``a * b + c`` into fused multiply-adds are turned off (``enable_fp_fusion``) so
that the bisection's float32 decisions round as torch's do on the CPU.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Candidate scales x group elements per program step: a tile of about this many values. On a GPU
# a program's tiles live in registers, about fifteen of them at once in the window step: 2048
# elements over 4 warps are 16 a thread per tile, which stays clear of spilling to local memory
# (not measured yet: benchmarks/gpu_check.py). Triton's interpreter runs each step as numpy
# calls, so larger tiles (fewer steps) are faster there; the result is the same either way.
TILE_ELEMENTS = 2048
TILE_ELEMENTS_INTERPRETED = 8192
# Longest group (padded to a power of two) the kernel takes; longer groups (per-channel
# quantization of wide layers) are solved by the reference's torch code on the same device.
MAX_GROUP = 4096


@triton.jit
def _rint(t):
    """Round half to even, as ``torch.round``."""
    f = tl.floor(t)
    d = t - f
    odd = (f - 2.0 * tl.floor(0.5 * f)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _error(x, h, z, n1f):
    """``E(z) = sum h (x + z - clamp(round(x + z), 0, n - 1))²`` per candidate (row of ``x``)."""
    t = x + z[:, None]
    q = tl.minimum(tl.maximum(_rint(t), 0.0), n1f)
    err = t - q
    return tl.sum(h * err * err, axis=1)


@triton.jit
def _clip_sums(z, s, ws, hsp_ptr, hwsp_ptr, total_h, total_hw, n1f):
    """The reference's ``clip_sums``: (sum of h, sum of h (x - target)) over the clipped
    elements at ``z``, from the sorted weights ``ws`` and the prefix sums."""
    k_low = tl.sum((ws[None, :] < ((-0.5 - z) * s)[:, None]).to(tl.int32), axis=1)
    k_high = tl.sum((ws[None, :] <= ((n1f + 0.5 - z) * s)[:, None]).to(tl.int32), axis=1)
    h_high = total_h - tl.load(hsp_ptr + k_high)
    hw_high = total_hw - tl.load(hwsp_ptr + k_high)
    a = tl.load(hsp_ptr + k_low) + h_high
    b = (tl.load(hwsp_ptr + k_low) + hw_high) / s - n1f * h_high
    return a, b


@triton.jit
def _relaxed_z0(s, ws, w_min, w_max, hsp_ptr, hwsp_ptr, total_h, total_hw, n1f, levels_f,
                ITERATIONS: tl.constexpr):
    """The reference's ``relaxed_zero_point`` for the candidate scales ``s``."""
    x_min = w_min / s
    x_max = w_max / s
    lo = -0.5 - x_max
    hi = n1f + 0.5 - x_min
    for _ in range(ITERATIONS):  # a loop, not unrolled: the kernel compiles in far less time
        mid = 0.5 * (lo + hi)
        a, b = _clip_sums(mid, s, ws, hsp_ptr, hwsp_ptr, total_h, total_hw, n1f)
        positive = a * mid + b > 0
        hi = tl.where(positive, mid, hi)
        lo = tl.where(positive, lo, mid)
    mid = 0.5 * (lo + hi)
    a, b = _clip_sums(mid, s, ws, hsp_ptr, hwsp_ptr, total_h, total_hw, n1f)
    z0 = tl.where(a > 0, -b / tl.maximum(a, 1e-30), mid)
    z0 = tl.minimum(tl.maximum(z0, lo), hi)
    fits = (x_max - x_min) <= levels_f
    centre = 0.5 * n1f - 0.5 * (x_max + x_min)
    return tl.where(fits, centre, z0)


@triton.jit
def _pick(values, offs, index):
    """``values[c, index[c]]`` for each row ``c``."""
    return tl.sum(tl.where(offs[None, :] == index[:, None], values, 0.0), axis=1)


@triton.jit
def _compare_swap(x, CB: tl.constexpr, N: tl.constexpr, P: tl.constexpr, J: tl.constexpr):
    """One step of the bitonic network on the rows of ``x [CB, N]``: elements ``J`` apart are
    ordered, descending where bit ``P`` of the index is set (ascending at the last stage)."""
    A: tl.constexpr = N // (2 * J)
    y = tl.permute(tl.reshape(x, [CB, A, 2, J]), [0, 1, 3, 2])
    left, right = tl.split(y)
    lo = tl.minimum(left, right)
    hi = tl.maximum(left, right)
    desc = (((tl.arange(0, A) * (2 * J)) & (1 << P)) != 0)[None, :, None]
    y = tl.join(tl.where(desc, hi, lo), tl.where(desc, lo, hi))
    return tl.reshape(tl.permute(y, [0, 1, 3, 2]), [CB, N])


@triton.jit
def _bitonic_sort(x, CB: tl.constexpr, N: tl.constexpr, LOG_N: tl.constexpr):
    """Each row of ``x [CB, N]`` sorted ascending (``N = 2**LOG_N``): a bitonic network whose
    compare-and-swap steps are reshapes, ``tl.split`` and ``tl.join``. (``tl.sort`` computes the
    same, but through a reduction that triton's interpreter runs element by element in Python,
    some thousand times slower; this one is a few array operations a step there too.)"""
    for p in tl.static_range(1, LOG_N + 1):
        for q in tl.static_range(p):
            x = _compare_swap(x, CB, N, p, 1 << (p - 1 - q))
    return x


@triton.jit
def _window(x, h, z0, mask, offs, n1f, CB: tl.constexpr, BLOCK_M: tl.constexpr,
            LOG_M: tl.constexpr):
    """The reference's ``window_zero_point``: the exact minimiser of ``E`` on ``[z₀-1, z₀+1]``
    for each candidate (row of ``x``); padded lanes carry ``h = 0``."""
    start = z0 - 1.0
    t = x + start[:, None]
    c = tl.floor(t + 0.5)
    r = t - c
    q0 = tl.minimum(tl.maximum(c, 0.0), n1f)
    d0 = t - q0
    u1 = tl.where(mask[None, :], 0.5 - r, 1.0)  # in (0, 1]; padding sorts last
    h1 = tl.where((c >= 0.0) & (c <= n1f - 1.0), h, 0.0)
    h2 = tl.where((c >= -1.0) & (c <= n1f - 2.0), h, 0.0)
    # u1 > 0, so its bits order as it does; the low half of the key is the lane
    key = (u1.to(tl.int32, bitcast=True).to(tl.int64) << 32) | offs[None, :].to(tl.int64)
    order = (_bitonic_sort(key, CB, BLOCK_M, LOG_M) & 0xFFFFFFFF).to(tl.int32)
    us = tl.gather(u1, order, 1)
    h1s = tl.gather(h1, order, 1)
    h2s = tl.gather(h2, order, 1)
    rs = tl.gather(r, order, 1)
    b0 = tl.sum(h * d0, axis=1)
    c0 = tl.sum(h * d0 * d0, axis=1)
    p1 = tl.cumsum(h1s, 1)
    q1 = tl.cumsum(h1s * (1 - 2 * rs), 1)
    p2 = tl.cumsum(h2s, 1)
    q2 = tl.cumsum(h2s * (3 - 2 * rs), 1)
    last = offs[None, :] == BLOCK_M - 1
    p1_all = tl.sum(tl.where(last, p1, 0.0), axis=1)
    q1_all = tl.sum(tl.where(last, q1, 0.0), axis=1)
    u_first = tl.sum(tl.where(offs[None, :] == 0, us, 0.0), axis=1)
    nxt = tl.minimum(offs + 1, BLOCK_M - 1)
    u_next = tl.gather(us, tl.broadcast_to(nxt[None, :], us.shape), 1)
    # pieces after the first crossings: [us[j], us[j+1]] (the last one up to us[0] + 1)
    b_a = b0[:, None] - p1
    c_a = c0[:, None] + q1
    hi_a = tl.where(last, u_first[:, None] + 1.0, u_next)
    u_a = tl.minimum(tl.maximum(-b_a, us), hi_a)
    e_a = u_a * (u_a + 2 * b_a) + c_a
    # pieces after the second crossings: [us[j] + 1, us[j+1] + 1] (the last one up to 2)
    b_b = (b0 - p1_all)[:, None] - p2
    c_b = (c0 + q1_all)[:, None] + q2
    hi_b = tl.where(last, 2.0, u_next + 1.0)
    u_b = tl.minimum(tl.maximum(-b_b, us + 1.0), hi_b)
    e_b = u_b * (u_b + 2 * b_b) + c_b
    # the piece before any crossing: [0, us[0]]
    u_0 = tl.minimum(tl.maximum(-b0, 0.0), u_first)
    e_0 = u_0 * (u_0 + 2 * b0) + c0
    i_a = tl.argmin(e_a, 1)
    i_b = tl.argmin(e_b, 1)
    best_e = e_0
    best_u = u_0
    min_a = tl.min(e_a, 1)
    take = min_a < best_e
    best_u = tl.where(take, _pick(u_a, offs, i_a), best_u)
    best_e = tl.where(take, min_a, best_e)
    min_b = tl.min(e_b, 1)
    best_u = tl.where(min_b < best_e, _pick(u_b, offs, i_b), best_u)
    return start + best_u


@triton.jit
def _window_integer(x, h, z0, n1f):
    """The reference's ``window_integer_zero_point``: the best integer ``z`` of the window and
    ``E(z)``."""
    first = tl.ceil(z0 - 1.0)
    best_z = first
    best_e = _error(x, h, first, n1f)
    for k in tl.static_range(1, 3):
        z = first + k
        e = _error(x, h, z, n1f)
        e = tl.where(z <= z0 + 1.0, e, float("inf"))
        better = e < best_e
        best_z = tl.where(better, z, best_z)
        best_e = tl.where(better, e, best_e)
    return best_z, best_e


@triton.jit
def _score(s, valid, w, h, ws, mask, offs, w_min, w_max, hsp_ptr, hwsp_ptr, total_h, total_hw,
           n1f, levels_f, INTEGER: tl.constexpr, WITH_INTEGER: tl.constexpr,
           ITERATIONS: tl.constexpr, REFINE: tl.constexpr, CB: tl.constexpr,
           BLOCK_M: tl.constexpr, LOG_M: tl.constexpr):
    """Loss ``s² E(z)`` and zero-point of each candidate scale ``s`` (``inf`` where not
    ``valid``), and the loss at the best integer zero-point (``WITH_INTEGER``)."""
    z0 = _relaxed_z0(s, ws, w_min, w_max, hsp_ptr, hwsp_ptr, total_h, total_hw, n1f, levels_f,
                     ITERATIONS)
    x = w[None, :] / s[:, None]
    hh = tl.broadcast_to(h[None, :], x.shape)
    s2 = s * s
    loss_int = tl.full(s.shape, float("inf"), tl.float32)
    if INTEGER:
        z, e = _window_integer(x, hh, z0, n1f)
        loss = s2 * e
        loss_int = loss
    else:
        z = z0
        for _ in range(REFINE):
            q = tl.minimum(tl.maximum(_rint(x + z[:, None]), 0.0), n1f)
            z = tl.minimum(tl.maximum(tl.sum(hh * (q - x), axis=1), z0 - 1), z0 + 1)
        loss = s2 * _error(x, hh, z, n1f)
        z_exact = _window(x, hh, z0, mask, offs, n1f, CB, BLOCK_M, LOG_M)
        loss_exact = s2 * _error(x, hh, z_exact, n1f)
        better = loss_exact < loss
        z = tl.where(better, z_exact, z)
        loss = tl.where(better, loss_exact, loss)
        if WITH_INTEGER:
            loss_int = s2 * _window_integer(x, hh, z0, n1f)[1]
    loss = tl.where(valid, loss, float("inf"))
    loss_int = tl.where(valid, loss_int, float("inf"))
    return loss, z, loss_int


@triton.jit
def _keep_best(loss, s, z, cand, best_loss, best_s, best_z):
    """The running best (loss, scale, zero-point) after a block of candidates: its first
    smallest loss replaces the best only when strictly lower, so that, over the blocks in order,
    the first minimum wins as the reference's ``argmin`` picks it."""
    k = tl.argmin(loss, 0)
    k_loss = tl.min(loss, 0)
    take = k_loss < best_loss
    return (tl.where(take, k_loss, best_loss),
            tl.where(take, tl.sum(tl.where(cand == k, s, 0.0)), best_s),
            tl.where(take, tl.sum(tl.where(cand == k, z, 0.0)), best_z))


@triton.jit
def _search_kernel(w_ptr, h_ptr, ws_ptr, hsp_ptr, hwsp_ptr, smm_ptr, scale_ptr, zero_ptr, m,
                   n1f, levels_f, INTEGER: tl.constexpr, BLOCK_M: tl.constexpr,
                   LOG_M: tl.constexpr,
                   CB: tl.constexpr, ITERATIONS: tl.constexpr, REFINE: tl.constexpr,
                   COARSE: tl.constexpr, FINE_DIVISOR: tl.constexpr,
                   FINE_HALF: tl.constexpr):
    g = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_M)
    mask = offs < m
    w = tl.load(w_ptr + g * m + offs, mask=mask, other=0.0)
    h = tl.load(h_ptr + g * m + offs, mask=mask, other=0.0)
    ws = tl.load(ws_ptr + g * m + offs, mask=mask, other=float("inf"))
    hsp_ptr += g * (m + 1)
    hwsp_ptr += g * (m + 1)
    total_h = tl.load(hsp_ptr + m)
    total_hw = tl.load(hwsp_ptr + m)
    w_min = tl.load(ws_ptr + g * m)
    w_max = tl.load(ws_ptr + g * m + m - 1)
    s_mm = tl.load(smm_ptr + g)
    cand = tl.arange(0, CB)

    # coarse grid: s_mm * i / COARSE, i = 1..COARSE
    inf = s_mm * 0.0 + float("inf")  # a float32 scalar: the loops below carry these
    best_loss = inf
    best_s = s_mm
    best_z = s_mm * 0.0
    int_loss = inf
    int_s = s_mm
    for lo in range(0, COARSE, CB):
        i = lo + cand + 1
        s = s_mm * (i.to(tl.float32) / COARSE)
        valid = i <= COARSE
        loss, z, loss_int = _score(s, valid, w, h, ws, mask, offs, w_min, w_max, hsp_ptr,
                                   hwsp_ptr, total_h, total_hw, n1f, levels_f, INTEGER,
                                   not INTEGER, ITERATIONS, REFINE, CB, BLOCK_M, LOG_M)
        best_loss, best_s, best_z = _keep_best(loss, s, z, cand, best_loss, best_s, best_z)
        if not INTEGER:
            int_loss, int_s, _ = _keep_best(loss_int, s, s, cand, int_loss, int_s, int_s)

    # fine grid: s_best + s_mm * j / FINE_DIVISOR, j = ±1..±FINE_HALF; for NeUQI a second grid
    # around NeUQI-int's best coarse scale (skipped where it is the same scale)
    width: tl.constexpr = 2 * FINE_HALF
    n_fine: tl.constexpr = width * (1 if INTEGER else 2)
    fine_loss = inf
    fine_s = s_mm
    fine_z = s_mm * 0.0
    for lo in range(0, n_fine, CB):
        k = lo + cand
        jj = k % width
        j = tl.where(jj < FINE_HALF, jj - FINE_HALF, jj - FINE_HALF + 1)
        base = tl.where(k < width, best_s, int_s)
        s = base + s_mm * (j.to(tl.float32) / FINE_DIVISOR)
        other = (int_s != best_s).to(tl.int32)  # the second grid's centre differs
        valid = (k < n_fine) & ((k < width).to(tl.int32) + other > 0)
        loss, z, _ = _score(s, valid, w, h, ws, mask, offs, w_min, w_max, hsp_ptr, hwsp_ptr,
                            total_h, total_hw, n1f, levels_f, INTEGER, False, ITERATIONS,
                            REFINE, CB, BLOCK_M, LOG_M)
        fine_loss, fine_s, fine_z = _keep_best(loss, s, z, cand, fine_loss, fine_s, fine_z)

    better = fine_loss < best_loss
    tl.store(scale_ptr + g, tl.where(better, fine_s, best_s))
    tl.store(zero_ptr + g, tl.where(better, fine_z, best_z))


def block_sizes(m: int, interpreted: bool = False) -> tuple[int, int]:
    """(padded group length, candidates per program step) for groups of ``m`` weights."""
    block_m = triton.next_power_of_2(m)
    tile = TILE_ELEMENTS_INTERPRETED if interpreted else TILE_ELEMENTS
    return block_m, max(1, min(64, tile // block_m))


def search_scale_triton(w, h, w_sorted, hs_prefix, hws_prefix, s_mm, levels, grid, integer):
    """Scale and zero-point of each row of ``w [G, m]`` (float32, contiguous, on the kernel's
    device) with normalised ``h``, from torch's sort, prefix sums and Min-Max scale; ``grid`` is
    ``(COARSE_STEPS, FINE_DIVISOR, FINE_HALF_WIDTH)`` and the bisection / refinement counts."""
    import torch

    coarse, fine_divisor, fine_half, iterations, refine = grid
    groups, m = w.shape
    block_m, cb = block_sizes(m, interpreted=w.device.type == "cpu")
    scale = torch.empty(groups, device=w.device, dtype=torch.float32)
    zero = torch.empty_like(scale)
    if groups == 0:
        return scale, zero
    _search_kernel[(groups,)](
        w, h, w_sorted, hs_prefix, hws_prefix, s_mm, scale, zero, m, float(levels - 1),
        float(levels), INTEGER=bool(integer), BLOCK_M=block_m, LOG_M=block_m.bit_length() - 1, CB=cb, ITERATIONS=iterations,
        REFINE=refine, COARSE=coarse, FINE_DIVISOR=fine_divisor, FINE_HALF=fine_half,
        num_warps=4, enable_fp_fusion=False,
    )
    return scale, zero
