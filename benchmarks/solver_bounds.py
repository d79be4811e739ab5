"""Why the NeUQI search cannot be pruned much further: the candidates' losses and their bounds.

    python benchmarks/solver_bounds.py [--group-sizes 64,128,-1] [--bits 2,3,4] [--groups 60]
        [--in-features 8192] [--seed 0]

For a sample of groups of a heavy-tailed weight (benchmarks/solver.py's inputs: Student-t, 3 dof,
and a spread positive ``h``) it computes, with the numba kernel's own functions, the exact loss
``s² min E`` of every candidate of the search (64 coarse scales, then the 32 fine ones around the
best coarse scale) and prints, per bits and group size:

- how many candidates of each stage the kernel's branch and bound must solve exactly: those whose
  lower bound (the tangent of the relaxed objective at the bisection's last point) is below the
  best loss, in the best case for the bound (the best loss known from the start);
- how close the fine candidates' losses are to the best one (fraction within 0.1 %, 0.3 %, 1 %):
  a bound that prunes a fine candidate must be tighter than that gap, for every group;
- the time one exact window step (with no threshold to stop it early) and one relaxed step
  take here, so that the per-group cost of
  the search (about 2 x 64 relaxed steps plus the exact steps counted above) can be read against
  a target rate: at 2 M weights/s a group of 64 has 32 us on this 2-core CPU (64 us of one core).

Single-threaded; the times are for the machine as it is when run (check ``uptime``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from numba import njit
from solver import make_inputs

from neuqi.quant import solver as S
from neuqi.quant import solver_numba as K


@njit(cache=False)
def _candidates(w, h, ws, hs, hp, hwp, s_mm, n1, iterations, coarse, divisor, half, buckets,
                work, lc, bc, lf, bf):
    """Exact loss (``work`` 2) and bound of every coarse and fine candidate of each group;
    ``work`` 0 runs the relaxed steps only, 1 adds the exact steps (for the timings)."""
    groups, m = w.shape
    buf = K._window_buffers(m, buckets)
    p_h = np.zeros(m + 1)
    p_hw = np.zeros(m + 1)
    p_hw2 = np.zeros(m + 1)
    for g in range(groups):
        K._bound_prefix_sums(ws[g], hs[g], p_h, p_hw, p_hw2)
        smm = s_mm[g]
        best_j = 0
        for stage in range(2):
            count = coarse if stage == 0 else 2 * half
            for j in range(count):
                if stage == 0:
                    s = smm * np.float32((j + 1) / coarse)
                else:
                    k = j - half if j < half else j - half + 1
                    s = smm * np.float32((best_j + 1) / coarse) + smm * np.float32(k / divisor)
                z0, k_low, k_high, z_k, spread = K._relaxed_z0(ws[g], hp[g], hwp[g], s, n1,
                                                               iterations, False)
                loss = 0.0
                bound = 0.0
                if work >= 1:
                    loss = K._window_exact(w[g], h[g], s, z0, n1, np.inf, buckets, buf)[1]
                if work >= 2:
                    bound = K._relaxed_bound(p_h, p_hw, p_hw2, s, z_k, n1, k_low, k_high, spread)
                if stage == 0:
                    lc[g, j], bc[g, j] = loss, bound
                else:
                    lf[g, j], bf[g, j] = loss, bound
            if stage == 0:
                best_j = int(np.argmin(lc[g]))


def analyse(w: np.ndarray, h: np.ndarray, bits: int) -> dict[str, float]:
    """Candidates' exact losses and bounds for the groups ``w [G, m]`` with normalised ``h``,
    and the time of the relaxed and the exact step (best of three passes, one thread)."""
    n1 = 2**bits - 1
    wt, ht = torch.from_numpy(w), torch.from_numpy(h)
    s_mm, _ = S.minmax_params(wt, n1 + 1)
    ws, order = torch.sort(wt, 1)
    hs = ht.gather(1, order)
    hp, hwp = S._prefix_sums(ws, hs)
    n, c, f = w.shape[0], S.COARSE_STEPS, 2 * S.FINE_HALF_WIDTH
    lc, bc, lf, bf = np.zeros((n, c)), np.zeros((n, c)), np.zeros((n, f)), np.zeros((n, f))
    args = (w, h, ws.numpy(), hs.contiguous().numpy(), hp.numpy(), hwp.numpy(), s_mm.numpy(),
            n1, S.RELAXED_BISECTIONS, c, S.FINE_DIVISOR, S.FINE_HALF_WIDTH,
            K.bucket_count(w.shape[1]))
    seconds = [np.inf, np.inf]
    for _ in range(3):
        for work in (0, 1):
            start = time.perf_counter()
            _candidates(*args, work, lc, bc, lf, bf)
            seconds[work] = min(seconds[work], time.perf_counter() - start)
    _candidates(*args, 2, lc, bc, lf, bf)
    best = np.minimum(lc.min(1), lf.min(1))[:, None]
    keep = 1 - K.PRUNE_MARGIN
    rel = lf / best - 1
    steps = n * (c + f)
    return {"coarse": float((bc * keep < best).sum(1).mean()),
            "fine": float((bf * keep < best).sum(1).mean()),
            **{f"near{gap:g}": float((rel < gap).mean()) for gap in (1e-3, 3e-3, 1e-2)},
            "relaxed_us": seconds[0] / steps * 1e6,
            "exact_us": (seconds[1] - seconds[0]) / steps * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-sizes", default="64,128,-1")
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--groups", type=int, default=60, help="groups sampled per case")
    parser.add_argument("--in-features", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| bits | group | coarse solved exactly (of 64) | fine solved exactly (of 32) "
          "| fine within 0.1 % of best | within 0.3 % | within 1 % | exact step (us) "
          "| relaxed step (us) |")
    print("|---" * 9 + "|")
    for group in (int(g) for g in args.group_sizes.split(",")):
        m = args.in_features if group == -1 else group
        rows = max(1, -(-args.groups * m // args.in_features))
        weight, h_diag = make_inputs(rows, args.in_features, args.seed, rows)
        w = weight.reshape(-1, m)
        h = h_diag.view(-1, m).repeat(rows, 1)
        h = (h / h.sum(1, keepdim=True)).contiguous()
        rng = np.random.default_rng(args.seed)
        pick = np.sort(rng.choice(w.shape[0], min(args.groups, w.shape[0]), replace=False))
        wg, hg = w[pick].contiguous().numpy(), h[pick].contiguous().numpy()
        for bits in (int(b) for b in args.bits.split(",")):
            r = analyse(wg, hg, bits)
            label = "per-channel" if group == -1 else str(group)
            print(f"| {bits} | {label} | {r['coarse']:.1f} | {r['fine']:.1f} "
                  f"| {r['near0.001']:.0%} | {r['near0.003']:.0%} | {r['near0.01']:.0%} "
                  f"| {r['exact_us']:.2f} | {r['relaxed_us']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
