"""Per-group uniform quantization parameters: Min-Max, NeUQI-int and NeUQI.

Pure tensor code: tensors in, tensors out, on whatever device the inputs live on. No I/O.

Notation (see ../shared/design/NEUQI.md). A weight matrix ``[out, in]`` is cut into groups of
``group_size`` consecutive input channels of one output row (``group_size=-1``: one group per row).
With ``k`` bits there are ``n = 2**k`` levels and, for a group with scale ``s`` and zero-point ``z``::

    codes  q_i = clamp(round(w_i / s + z), 0, n - 1)
    dequant ŵ_i = s * (q_i - z)
    loss   L   = sum_i h_i * (w_i - ŵ_i)**2          (h: diagonal of the calibration Hessian)

With ``x_i = w_i / s`` and ``h`` normalised to sum 1 in the group, ``L = s² E(z; x)`` where
``E(z; x) = sum_i h_i (x_i + z - clamp(round(x_i + z), 0, n - 1))²``. For a fixed scale NeUQI finds
the continuous ``z`` minimising ``E`` (:func:`best_zero_point`); the scale is then a 1-D search.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from neuqi.util.errors import UserError

Method = Literal["minmax", "neuqi-int", "neuqi"]
METHODS: tuple[str, ...] = ("minmax", "neuqi-int", "neuqi")

# The paper's scale search, relative to the group's Min-Max scale s_mm:
COARSE_STEPS = 64  # coarse grid: s = s_mm * i / 64, i = 1..64
FINE_DIVISOR = 2048  # fine grid: s_best + s_mm * j / 2048, j = -16..16
FINE_HALF_WIDTH = 16

# Groups are solved in chunks of about this many candidate elements (groups x 64 x group length),
# so that the working set of the search stays small.
CHUNK_ELEMENTS = 2**22
# Weights per call of the numba kernel (its working set is a few float32 copies of them).
NUMBA_CHUNK_ELEMENTS = 2**24
# Weights per launch of the triton kernel: its inputs and torch's preparation of them (h, the
# sorted weights and their int64 order, h in that order, two prefix sums) take about 28 bytes a
# weight on the device, 450 MiB at this size: inside the plan's SOLVER_WORKSET (0.8 GiB), the
# memory `neuqi plan` and --max-memory give the search.
TRITON_CHUNK_ELEMENTS = 2**24
# Tensors at least this large are solved with torch.compile when `compile` is left to auto.
COMPILE_MIN_WEIGHTS = 2**18
# Bisection steps of the relaxed step before its closed-form solve (bracket / 2**16).
RELAXED_BISECTIONS = 16
# Code/zero-point alternations of that cheap score.
REFINE_ITERATIONS = 2
# Elements (rows x group length) per call of the compiled window step.
WINDOW_BLOCK_ELEMENTS = 2**17
# Least dtype of the window step's prefix sums. float32 picks the best piece to about 1e-6 of the
# loss (tests/test_solver.py checks 1e-5 against brute force); the loss of the chosen zero-point is
# then recomputed directly. float64 costs a third more time on a CPU, far more on consumer GPUs.
WINDOW_ACCUMULATE = torch.float32


@dataclass
class QuantizedTensor:
    """The result of quantizing one ``[out, in]`` weight.

    codes:      uint8 ``[out, in]`` in ``[0, 2**bits - 1]``
    scale:      float32 ``[out, n_groups]``
    zero_point: float32 ``[out, n_groups]`` (an integer value for ``minmax`` and ``neuqi-int``)
    loss:       float32 ``[out, n_groups]``: ``sum_i h_i (w_i - ŵ_i)²`` with the caller's ``h``
    """

    codes: Tensor
    scale: Tensor
    zero_point: Tensor
    loss: Tensor
    bits: int
    group_size: int

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.group_size, dtype)


def dequantize(
    codes: Tensor, scale: Tensor, zero_point: Tensor, group_size: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``ŵ = s * (q - z)`` for codes ``[out, in]`` and per-group ``scale``/``zero_point``."""
    out_features, in_features = codes.shape
    g = in_features if group_size == -1 else group_size
    q = codes.to(torch.float32).view(out_features, in_features // g, g)
    w = scale.to(torch.float32).unsqueeze(-1) * (q - zero_point.to(torch.float32).unsqueeze(-1))
    return w.view(out_features, in_features).to(dtype)


def check_group_size(in_features: int, group_size: int, name: str = "weight") -> int:
    """The effective group length; a size that does not divide ``in_features`` is a UserError."""
    if group_size == -1:
        return in_features
    if group_size <= 0:
        raise UserError(f"--group-size {group_size}: use a positive size or -1 (per-channel)")
    if in_features % group_size:
        raise UserError(
            f"--group-size {group_size} does not divide the input dimension {in_features} of "
            f"{name}: choose a divisor of {in_features} or -1 (per-channel)"
        )
    return group_size


def check_bits(bits: int) -> int:
    if not 2 <= bits <= 8:
        raise UserError(f"--bits {bits} is outside 2..8: choose 2, 3, 4 (or up to 8)")
    return bits


def check_weight(
    weight: Tensor, bits: int, group_size: int, name: str = "weight",
    h_diag: Tensor | None = None,
) -> tuple[int, int, int]:
    """The argument checks shared by :func:`quantize_tensor` and :func:`neuqi.quant.gptq.gptq_quantize`:
    bits in range, a 2-D weight, a group size that divides its input dimension and (if given) an
    ``h_diag`` of one value per input channel. Returns ``(out_features, in_features, group
    length)``."""
    check_bits(bits)
    if weight.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
    out_features, in_features = weight.shape
    g = check_group_size(in_features, group_size, name)
    if h_diag is not None and h_diag.shape != (in_features,):
        raise ValueError(f"{name}: h_diag has shape {tuple(h_diag.shape)}, need ({in_features},)")
    return out_features, in_features, g


# ----------------------------------------------------------------------------------------------
# Solver backends
# ----------------------------------------------------------------------------------------------

# reference: this module's torch code, the definition (any device). numba: the same search
# compiled for the CPU (neuqi.quant.solver_numba; same scale/zero per group up to ties, see there).
# triton: the same search as a triton kernel for CUDA devices (neuqi.quant.solver_triton; same
# criterion), which also runs in triton's interpreter on CPU tensors (TRITON_INTERPRET=1).
# auto: numba for a CPU device and triton for a CUDA one when they import, else the reference.
BACKENDS: tuple[str, ...] = ("auto", "reference", "numba", "triton")
_FALLBACK_SAID: list[str] = []


def _kernel_imports(module: str) -> bool:
    """Whether the backend module ``module`` imports (its compiler package is installed)."""
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def numba_available() -> bool:
    """Whether the numba backend can be used here (numba imports)."""
    return _kernel_imports("neuqi.quant.solver_numba")


def triton_available() -> bool:
    """Whether the triton backend can be used here (triton imports)."""
    return _kernel_imports("neuqi.quant.solver_triton")


def triton_interpreted() -> bool:
    """Whether triton kernels run in triton's interpreter (``TRITON_INTERPRET=1``: on CPU
    tensors, slowly; how the triton backend is tested without a GPU)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def _fall_back(missing: str) -> str:
    """The reference, said once per process on one line of stderr: package ``missing`` (the
    fast backend's, installed under the same name) is not installed."""
    if not _FALLBACK_SAID:
        _FALLBACK_SAID.append(missing)
        print(f"neuqi: {missing} is not installed, so the solver uses its slower reference "
              f"backend (pip install {missing} for the fast one)", file=sys.stderr, flush=True)
    return "reference"


def resolve_backend(backend: str, device: torch.device | str | None = None) -> str:
    """The concrete backend (``reference``, ``numba`` or ``triton``) for ``backend`` on
    ``device``.

    ``auto`` takes numba for a CPU device (or no device) when numba imports, and triton for a
    CUDA device when triton imports; without them it falls back to the reference and says so
    once per process, on one line of stderr. Asking for ``numba`` or ``triton`` explicitly
    where it cannot run is a UserError (triton runs on a CPU device only in triton's
    interpreter, ``TRITON_INTERPRET=1``).
    """
    if backend not in BACKENDS:
        raise UserError(f"--solver-backend {backend}: choose one of {', '.join(BACKENDS)}")
    if backend == "reference":
        return backend
    kind = torch.device(device).type if device is not None else "cpu"
    if backend == "triton":
        if not triton_available():
            raise UserError("--solver-backend triton: triton is not installed; pip install "
                            "triton, or use --solver-backend reference")
        if kind != "cuda" and not triton_interpreted():
            raise UserError(f"--solver-backend triton runs on CUDA devices, not on {kind}: use "
                            "--device cuda, or --solver-backend numba on the CPU (or set "
                            "TRITON_INTERPRET=1 to run the kernel in triton's slow interpreter)")
        return backend
    if backend == "numba":
        if not numba_available():
            raise UserError("--solver-backend numba: numba is not installed; pip install numba, "
                            "or use --solver-backend reference")
        return backend
    if kind == "cpu":
        return "numba" if numba_available() else _fall_back("numba")
    if kind == "cuda":
        return "triton" if triton_available() else _fall_back("triton")
    return "reference"


# ----------------------------------------------------------------------------------------------
# The zero-point for a given scale
# ----------------------------------------------------------------------------------------------


def relaxed_zero_point(
    w_sorted: Tensor, hs_prefix: Tensor, hws_prefix: Tensor, scale: Tensor, levels: int,
    iterations: int = RELAXED_BISECTIONS,
) -> Tensor:
    """Minimiser ``z₀`` of the relaxed (convex) clipping objective of NeUQI, step 1.

    Minimises ``f(z) = sum_i h_i ψ(x_i + z)`` with ``x_i = w_i / s`` and
    ``ψ(t) = t² - 1/4`` for ``t < -1/2``, ``0`` on ``[-1/2, n - 1/2]``,
    ``(t - (n - 1))² - 1/4`` above: the rounding error inside the representable range is dropped
    and only the clipping error kept, so ``f`` is convex and ``f <= E`` everywhere.

    ``f'`` is monotone, so instead of sorting the 2m breakpoints for each scale we bisect on it.
    The weights are sorted once per group (the order of ``x = w / s`` does not depend on ``s``), and
    each evaluation of ``f'`` is a binary search in the sorted weights plus prefix sums of ``h`` and
    ``h w``: O(log m) per group and step, for all candidate scales of a group at once. After the
    bisection the root is solved in closed form on the final bracket's clipping sets. When the
    group fits in the range (``max x - min x <= n``) ``f`` is zero on an interval and the centre of
    that interval is returned.

    Args: ``w_sorted [G, m]`` ascending; ``hs_prefix, hws_prefix [G, m + 1]`` prefix sums of the
    normalised ``h`` and of ``h * w`` in that order; ``scale [G, C]`` positive (C candidate scales
    per group); ``levels = 2**bits``. Returns ``z₀ [G, C]``.
    """
    n1 = levels - 1
    s = scale
    x_min = w_sorted[:, :1] / s
    x_max = w_sorted[:, -1:] / s
    total_h = hs_prefix[:, -1:]
    total_hw = hws_prefix[:, -1:]

    def clip_sums(z: Tensor) -> tuple[Tensor, Tensor]:
        """(sum of h, sum of h * (x - target)) over the clipped elements at z."""
        # elements with x + z < -1/2 clip at 0, with x + z > n - 1/2 clip at n - 1
        k_low = torch.searchsorted(w_sorted, (-0.5 - z) * s, right=False)
        k_high = torch.searchsorted(w_sorted, (n1 + 0.5 - z) * s, right=True)
        h_low = hs_prefix.gather(1, k_low)
        h_high = total_h - hs_prefix.gather(1, k_high)
        hw_high = total_hw - hws_prefix.gather(1, k_high)
        return h_low + h_high, (hws_prefix.gather(1, k_low) + hw_high) / s - n1 * h_high

    lo = -0.5 - x_max
    hi = n1 + 0.5 - x_min
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        a, b = clip_sums(mid)
        positive = a * mid + b > 0  # f'(mid) / 2
        hi = torch.where(positive, mid, hi)
        lo = torch.where(positive, lo, mid)
    mid = 0.5 * (lo + hi)
    a, b = clip_sums(mid)
    z0 = torch.where(a > 0, -b / a.clamp_min(1e-30), mid).clamp(lo, hi)
    fits = (x_max - x_min) <= levels
    centre = 0.5 * n1 - 0.5 * (x_max + x_min)
    return torch.where(fits, centre, z0)


def window_zero_point(x: Tensor, h: Tensor, z0: Tensor, levels: int) -> Tensor:
    """Exact minimiser of ``E(z) = sum_i h_i (x_i + z - clamp(round(x_i + z), 0, n-1))²`` on
    the window ``[z₀ - 1, z₀ + 1]`` (NeUQI, step 2). ``h`` sums to 1 in each row.

    On the window each element's code rises at most twice, at ``u₁`` and ``u₁ + 1`` with
    ``u = z - (z₀ - 1)`` and ``u₁ ∈ (0, 1]``, so one sort of the m values ``u₁`` orders all 2m
    breakpoints. Between breakpoints ``E = u² + 2Bu + C``; each crossing changes ``B`` by ``-h_i``
    and ``C`` by ``h_i (1 - 2 d_i)`` (``d_i`` the residual before the crossing), so prefix sums give
    every piece, and the best piece's clamped stationary point ``-B`` is the answer.

    Args: ``x [G, m]`` weights over scale, ``h [G, m]``, ``z0 [G]``. Returns ``z [G]``.
    """
    n1 = levels - 1
    start = (z0 - 1.0).unsqueeze(-1)
    t = x + start
    c = torch.floor(t + 0.5)  # nearest level before clamping
    r = t - c  # in [-1/2, 1/2)
    q0 = c.clamp(0, n1)
    d0 = t - q0
    u1 = 0.5 - r  # first half-integer crossing, in (0, 1]
    valid1 = (c >= 0) & (c <= n1 - 1)
    valid2 = (c >= -1) & (c <= n1 - 2)
    zero = torch.zeros_like(h)
    h1 = torch.where(valid1, h, zero)
    h2 = torch.where(valid2, h, zero)

    order = torch.argsort(u1, dim=1)
    u_sorted = u1.gather(1, order)
    h1s, h2s, rs = h1.gather(1, order), h2.gather(1, order), r.gather(1, order)
    acc = torch.promote_types(x.dtype, WINDOW_ACCUMULATE)
    d_b = -torch.cat([h1s, h2s], dim=1).to(acc)
    d_c = torch.cat([h1s * (1 - 2 * rs), h2s * (3 - 2 * rs)], dim=1).to(acc)
    b0 = (h * d0).sum(1, keepdim=True, dtype=acc)
    c0 = (h * d0 * d0).sum(1, keepdim=True, dtype=acc)
    b = torch.cat([b0, b0 + d_b.cumsum(1)], dim=1)
    cc = torch.cat([c0, c0 + d_c.cumsum(1)], dim=1)
    bounds = torch.cat([u_sorted, u_sorted + 1.0], dim=1).to(acc)
    lo = torch.cat([torch.zeros_like(b0), bounds], dim=1)
    hi = torch.cat([bounds, torch.full_like(b0, 2.0)], dim=1)
    u = (-b).clamp(lo, hi)
    e = u * (u + 2 * b) + cc
    best = e.argmin(dim=1, keepdim=True)
    return (start + u.gather(1, best).to(x.dtype)).squeeze(-1)


def window_integer_zero_point(
    x: Tensor, h: Tensor, z0: Tensor, levels: int
) -> tuple[Tensor, Tensor]:
    """The integer ``z`` in the window ``[z₀ - 1, z₀ + 1]`` minimising ``E(z)`` (NeUQI-int), and
    ``E(z)``.

    Scanning the integers of the same window as the continuous step keeps the ablation honest:
    NeUQI can only do as well or better, and Min-Max's zero-point is in the window at its scale.
    """
    first = torch.ceil(z0 - 1.0)
    best_z = first
    best_e = grouped_error(x, h, first, levels)
    for k in (1.0, 2.0):
        z = first + k
        e = grouped_error(x, h, z, levels)
        e = torch.where(z <= z0 + 1.0, e, torch.full_like(e, torch.inf))
        better = e < best_e
        best_z = torch.where(better, z, best_z)
        best_e = torch.where(better, e, best_e)
    return best_z, best_e


def best_zero_point(
    x: Tensor, h: Tensor, levels: int, integer: bool = False
) -> tuple[Tensor, Tensor]:
    """NeUQI's zero-point for a fixed scale: the ``z`` minimising the weighted rounding error.

    Objective (per group, ``x = w / s``, ``h >= 0`` summing to 1)::

        E(z) = sum_i h_i (x_i + z - clamp(round(x_i + z), 0, n - 1))²,    n = 2**bits

    so that the group's loss is ``s² E(z)``. Step 1 minimises the convex relaxation that keeps only
    the clipping error (:func:`relaxed_zero_point`, giving ``z₀``); step 2 minimises ``E`` exactly
    on ``[z₀ - 1, z₀ + 1]`` (:func:`window_zero_point`), or over the integers of that window when
    ``integer`` is set. Returns ``(z, E(z))``, each ``[G]``.
    """
    w_sorted, order = torch.sort(x, dim=1)
    hs = h.gather(1, order)
    one = torch.ones_like(x[:, :1])
    z0 = relaxed_zero_point(w_sorted, *_prefix_sums(w_sorted, hs), one, levels).squeeze(1)
    if integer:
        return window_integer_zero_point(x, h, z0, levels)
    z = window_zero_point(x, h, z0, levels)
    return z, grouped_error(x, h, z, levels)


def grouped_error(x: Tensor, h: Tensor, z: Tensor, levels: int) -> Tensor:
    """``E(z) = sum_i h_i (x_i + z - clamp(round(x_i + z), 0, n - 1))²`` over the last dim."""
    t = x + z.unsqueeze(-1)
    err = t - torch.round(t).clamp(0, levels - 1)
    return (h * err * err).sum(-1)


def _prefix_sums(w_sorted: Tensor, h_sorted: Tensor) -> tuple[Tensor, Tensor]:
    pad = torch.zeros_like(w_sorted[:, :1])
    return (
        torch.cat([pad, h_sorted.cumsum(1)], 1),
        torch.cat([pad, (h_sorted * w_sorted).cumsum(1)], 1),
    )


# ----------------------------------------------------------------------------------------------
# Scales
# ----------------------------------------------------------------------------------------------


def minmax_params(w: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Min-Max: ``s = (max w - min w) / (n - 1)``, ``z = round(-min w / s)``, per row of ``w``.

    A constant group gets the scale that represents its value exactly (``|w| / (n - 1)``), and an
    all-zero group scale 1, so no scale is ever zero.
    """
    w_min = w.amin(1)
    w_max = w.amax(1)
    scale = (w_max - w_min) / (levels - 1)
    flat = torch.maximum(w_max.abs(), w_min.abs()) / (levels - 1)
    scale = torch.where(scale > 0, scale, torch.where(flat > 0, flat, torch.ones_like(flat)))
    zero = torch.round(-w_min / scale)
    return scale, zero


def search_scale(
    w: Tensor, h: Tensor, levels: int, integer: bool = False, prune: bool = True,
    compile: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """NeUQI's scale search for rows of ``w [G, m]`` with normalised ``h [G, m]``.

    The paper's grid: 64 coarse scales ``s_mm * i / 64`` and 32 fine ones
    ``s_best + s_mm * j / 2048`` (``j = ±1..±16``) around the best coarse one, each scored by the
    loss ``s² E(z)`` at its best zero-point. Returns ``(scale, zero_point, s² E)``, each ``[G]``.
    For NeUQI the fine grid around NeUQI-int's best coarse scale is searched too, so that NeUQI is
    never worse than its integer ablation on any group.

    It gives (at least) the answer of the paper's search (``benchmarks/solver.py`` prints the loss ratio to a
    literal implementation) with less work:

    - step 1 runs for all candidates of a group at once on the group's sorted weights, with no
      sort per scale (:func:`relaxed_zero_point`);
    - each candidate gets a reachable loss (a few "round codes, solve z" alternations from ``z₀``)
      and a lower bound (the relaxed objective at ``z₀``: ``f <= E`` everywhere). A candidate whose
      bound is not below the best reachable loss of its group cannot win, so only the others get
      the exact window step (:func:`window_zero_point`, one sort of m values). ``prune=False``
      runs the exact step on every candidate.

    With ``integer`` (NeUQI-int) the integer window scan is cheap and runs on every candidate.
    ``compile`` runs the candidate scoring and the window step through ``torch.compile`` (same
    arithmetic, fused); the first call per shape and bit width pays the compilation.
    """
    step = compiled_window_step if compile else window_zero_point
    score = _compiled(score_candidates) if compile else score_candidates
    s_mm, _ = minmax_params(w, levels)
    w_sorted, order = torch.sort(w, dim=1)
    hs_prefix, hws_prefix = _prefix_sums(w_sorted, h.gather(1, order))

    def best_of(
        scales: Tensor, skip: Tensor | None = None, with_integer: bool = False
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """Best candidate of ``scales [G, C]`` (ignoring those marked in ``skip``): its scale,
        zero-point and loss, and (``with_integer``) the best scale under an integer zero-point."""
        z0 = relaxed_zero_point(w_sorted, hs_prefix, hws_prefix, scales, levels)
        x = w.unsqueeze(1) / scales.unsqueeze(-1)  # [G, C, m]
        h3 = h.unsqueeze(1)
        s2 = scales * scales
        loss_int: Tensor | None
        if integer:
            z, e = window_integer_zero_point(x, h3, z0, levels)
            loss = loss_int = s2 * e
        else:
            z, loss, bound, loss_int = score(x, h3, z0, s2, levels, with_integer)
            if skip is not None:
                loss = loss.masked_fill(skip, torch.inf)
            need = bound < loss.amin(1, keepdim=True)
            if not prune:
                need = torch.ones_like(need)
            if skip is not None:
                need &= ~skip
            g_idx, c_idx = need.nonzero(as_tuple=True)
            if g_idx.numel():
                xs = x[g_idx, c_idx]
                z_exact = step(xs, h[g_idx], z0[g_idx, c_idx], levels)
                loss_exact = s2[g_idx, c_idx] * grouped_error(xs, h[g_idx], z_exact, levels)
                better = loss_exact < loss[g_idx, c_idx]
                z[g_idx, c_idx] = torch.where(better, z_exact, z[g_idx, c_idx])
                loss[g_idx, c_idx] = torch.where(better, loss_exact, loss[g_idx, c_idx])
        best = loss.argmin(1, keepdim=True)
        s_int = None
        if loss_int is not None:
            s_int = scales.gather(1, loss_int.argmin(1, keepdim=True)).squeeze(1)
        return (scales.gather(1, best).squeeze(1), z.gather(1, best).squeeze(1),
                loss.gather(1, best).squeeze(1), s_int)

    coarse = torch.arange(1, COARSE_STEPS + 1, device=w.device, dtype=w.dtype) / COARSE_STEPS
    s_c, z_c, loss_c, s_ci = best_of(s_mm.unsqueeze(1) * coarse, with_integer=not integer)
    j = torch.arange(-FINE_HALF_WIDTH, FINE_HALF_WIDTH + 1, device=w.device, dtype=w.dtype)
    j = s_mm.unsqueeze(1) * (j[j != 0] / FINE_DIVISOR)
    if integer:
        s_f, z_f, loss_f, _ = best_of(s_c.unsqueeze(1) + j)
    else:
        # NeUQI-int centres its fine grid on its own best coarse scale; searching that grid too
        # (where it differs) makes NeUQI at least as good as NeUQI-int on every group: at every
        # scale the integers of the window are among the continuous candidates. Both grids go in
        # one call, so the candidate tensor has the coarse stage's shape.
        assert s_ci is not None  # the coarse stage ran with_integer
        fine = torch.cat([s_c.unsqueeze(1) + j, s_ci.unsqueeze(1) + j], 1)
        skip = torch.cat([torch.zeros_like(j, dtype=torch.bool),
                          (s_ci == s_c).unsqueeze(1).expand_as(j)], 1)
        s_f, z_f, loss_f, _ = best_of(fine, skip)
    better = loss_f < loss_c
    return (torch.where(better, s_f, s_c), torch.where(better, z_f, z_c),
            torch.minimum(loss_f, loss_c))


def score_candidates(
    x: Tensor, h: Tensor, z0: Tensor, s2: Tensor, levels: int, with_integer: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """For candidates ``x [G, C, m]`` (weights over scale) with ``s² [G, C]``: a reachable
    zero-point and its loss ``s² E(z)``, the lower bound ``s² f(z₀) <= s² min_z E``, and
    (``with_integer``) the loss at the best integer zero-point of the window."""
    z = _refine_codes(x, h, z0, levels)
    loss = s2 * grouped_error(x, h, z, levels)
    bound = s2 * relaxed_error(x, h, z0, levels)
    loss_int = s2 * window_integer_zero_point(x, h, z0, levels)[1] if with_integer else None
    return z, loss, bound, loss_int


def relaxed_error(x: Tensor, h: Tensor, z: Tensor, levels: int) -> Tensor:
    """The relaxed objective ``f(z) = sum_i h_i ψ(x_i + z)`` of :func:`relaxed_zero_point`."""
    t = x + z.unsqueeze(-1)
    low = (t + 0.5).clamp(max=0)  # distance below -1/2 (negative)
    high = (t - (levels - 0.5)).clamp(min=0)
    # t² - 1/4 = (t + 1/2)² - (t + 1/2) ... written through the distance d past the edge:
    # below: t = d - 1/2 gives t² - 1/4 = d² - d; above: (d + 1/2)² - 1/4 = d² + d
    return (h * (low * low - low + high * high + high)).sum(-1)


def _refine_codes(x: Tensor, h: Tensor, z0: Tensor, levels: int,
                  iterations: int = REFINE_ITERATIONS) -> Tensor:
    """Alternate "codes = round(x + z)" and "z = argmin for those codes" from ``z₀``, kept in
    ``[z₀ - 1, z₀ + 1]``. Each step lowers E; the result is a cheap score, not the optimum."""
    z = z0
    for _ in range(iterations):
        q = torch.round(x + z.unsqueeze(-1)).clamp(0, levels - 1)
        z = torch.minimum(torch.maximum((h * (q - x)).sum(-1), z0 - 1), z0 + 1)
    return z


# ----------------------------------------------------------------------------------------------
# Compiled kernels (torch.compile fuses the many elementwise passes into a few loops)
# ----------------------------------------------------------------------------------------------

_COMPILED: dict[Callable, Callable] = {}


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def compiled_window_step(x: Tensor, h: Tensor, z0: Tensor, levels: int) -> Tensor:
    """:func:`window_zero_point`, compiled, over fixed blocks of rows (the last one padded) so
    that one compiled graph serves any number of rows."""
    fn = _compiled(window_zero_point)
    rows = x.shape[0]
    block = max(1, WINDOW_BLOCK_ELEMENTS // x.shape[1])
    out = []
    for lo in range(0, rows, block):
        xs, hs, zs = x[lo:lo + block], h[lo:lo + block], z0[lo:lo + block]
        k = xs.shape[0]
        if k < block:
            pad = block - k
            xs = torch.cat([xs, xs[:1].expand(pad, -1)])
            hs = torch.cat([hs, hs[:1].expand(pad, -1)])
            zs = torch.cat([zs, zs[:1].expand(pad)])
        out.append(fn(xs, hs, zs, levels)[:k])
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Whole tensors
# ----------------------------------------------------------------------------------------------


def _search_numba(w: Tensor, h: Tensor, levels: int, integer: bool) -> tuple[Tensor, Tensor]:
    """:func:`search_scale` by the compiled CPU kernel (:mod:`neuqi.quant.solver_numba`), started from
    this module's own sort, prefix sums and Min-Max scale."""
    from neuqi.quant.solver_numba import search_scale_numba

    w = w.to(device="cpu", dtype=torch.float32).contiguous()
    h = h.to(device="cpu", dtype=torch.float32).contiguous()
    s_mm, _ = minmax_params(w, levels)
    w_sorted, order = torch.sort(w, dim=1)
    h_sorted = h.gather(1, order)
    hs_prefix, hws_prefix = _prefix_sums(w_sorted, h_sorted)
    return search_scale_numba(w, h, w_sorted, h_sorted, hs_prefix, hws_prefix, s_mm, levels,
                              (COARSE_STEPS, FINE_DIVISOR, FINE_HALF_WIDTH), integer=integer)


def _search_triton(w: Tensor, h: Tensor, levels: int, integer: bool) -> tuple[Tensor, Tensor]:
    """:func:`search_scale` by the triton kernel (:mod:`neuqi.quant.solver_triton`) on ``w``'s device,
    started from this module's own sort, prefix sums and Min-Max scale. Groups longer than the
    kernel's ``MAX_GROUP`` (per-channel quantization of wide layers) take the reference's code on
    the same device."""
    from neuqi.quant.solver_triton import MAX_GROUP, search_scale_triton

    w = w.to(torch.float32).contiguous()
    h = h.to(torch.float32).contiguous()
    if w.shape[1] > MAX_GROUP:
        s, z, _ = search_scale(w, h, levels, integer=integer)
        return s, z
    s_mm, _ = minmax_params(w, levels)
    w_sorted, order = torch.sort(w, dim=1)
    hs_prefix, hws_prefix = _prefix_sums(w_sorted, h.gather(1, order))
    grid = (COARSE_STEPS, FINE_DIVISOR, FINE_HALF_WIDTH, RELAXED_BISECTIONS, REFINE_ITERATIONS)
    return search_scale_triton(w, h, w_sorted.contiguous(), hs_prefix.contiguous(),
                               hws_prefix.contiguous(), s_mm.contiguous(), levels, grid, integer)


def quantize_tensor(
    weight: Tensor,
    h_diag: Tensor | None = None,
    *,
    bits: int,
    group_size: int,
    method: str = "neuqi",
    device: torch.device | str | None = None,
    compile: bool | None = None,
    name: str = "weight",
    backend: str = "auto",
) -> QuantizedTensor:
    """Quantize ``weight [out, in]`` with per-group parameters chosen by ``method``.

    ``h_diag [in]`` is the diagonal of the calibration Hessian of the layer's input (``None``:
    all ones, the plain weight-MSE variant). It is normalised within each group for the search;
    the returned loss uses it as given. Computation runs on ``device`` (default: the weight's), in
    float32, a chunk of groups at a time; results come back on that device. ``compile`` (default:
    on for tensors of at least ``COMPILE_MIN_WEIGHTS``) fuses the search with ``torch.compile``;
    the result does not depend on the chunking.

    ``backend`` (:data:`BACKENDS`, see :func:`resolve_backend`) picks the implementation of the
    NeUQI search: ``reference`` is this module's torch code (``compile`` applies to it only),
    ``numba`` the compiled CPU kernel of :mod:`neuqi.quant.solver_numba` (it computes on the CPU and
    returns its results on ``device``), ``triton`` the GPU kernel of :mod:`neuqi.quant.solver_triton`
    (on ``device``, a chunk of ``TRITON_CHUNK_ELEMENTS`` weights a launch). Min-Max is the same code for every backend.
    """
    if method not in METHODS:
        raise UserError(f"--method {method}: choose one of {', '.join(METHODS)}")
    out_features, in_features, g = check_weight(weight, bits, group_size, name, h_diag)
    device = torch.device(device) if device is not None else weight.device
    levels = 2**bits
    if compile is None:
        compile = weight.numel() >= COMPILE_MIN_WEIGHTS

    w = weight.to(device=device, dtype=torch.float32)
    if h_diag is None:
        h_raw = torch.ones(in_features, device=device)
    else:
        h_raw = h_diag.to(device=device, dtype=torch.float32).clamp_min(0)
    n_groups = in_features // g
    groups = w.reshape(-1, g)  # [out * n_groups, g], row-major: groups never straddle rows
    h_groups = h_raw.view(n_groups, g).repeat(out_features, 1)
    h_sum = h_groups.sum(1, keepdim=True)
    uniform = torch.full_like(h_groups, 1.0 / g)
    h_norm = torch.where(h_sum > 0, h_groups / h_sum.clamp_min(1e-30), uniform)

    total = groups.shape[0]
    if method == "minmax":
        scale, zero = minmax_params(groups, levels)
    elif (resolved := resolve_backend(backend, device)) == "triton":
        scale = torch.empty(total, device=device)
        zero = torch.empty_like(scale)
        chunk = max(1, TRITON_CHUNK_ELEMENTS // g)
        for lo in range(0, total, chunk):
            scale[lo:lo + chunk], zero[lo:lo + chunk] = _search_triton(
                groups[lo:lo + chunk], h_norm[lo:lo + chunk], levels, method == "neuqi-int")
    elif resolved == "numba":
        scale = torch.empty(total, device=device)
        zero = torch.empty_like(scale)
        chunk = max(1, NUMBA_CHUNK_ELEMENTS // g)
        for lo in range(0, total, chunk):
            s, z = _search_numba(groups[lo:lo + chunk], h_norm[lo:lo + chunk], levels,
                                 integer=method == "neuqi-int")
            scale[lo:lo + chunk], zero[lo:lo + chunk] = s.to(device), z.to(device)
    else:
        chunk = max(1, CHUNK_ELEMENTS // (COARSE_STEPS * g))
        scale = torch.empty(total, device=device)
        zero = torch.empty_like(scale)
        for lo in range(0, total, chunk):
            wc, hc = groups[lo:lo + chunk], h_norm[lo:lo + chunk]
            k = wc.shape[0]
            if compile and k < chunk:  # pad the last chunk: one compiled shape serves all
                wc = torch.cat([wc, wc[:1].expand(chunk - k, -1)])
                hc = torch.cat([hc, hc[:1].expand(chunk - k, -1)])
            s, z, _ = search_scale(wc, hc, levels, integer=method == "neuqi-int", compile=compile)
            scale[lo:lo + k], zero[lo:lo + k] = s[:k], z[:k]

    codes = torch.round(groups / scale.unsqueeze(-1) + zero.unsqueeze(-1)).clamp(0, levels - 1)
    deq = scale.unsqueeze(-1) * (codes - zero.unsqueeze(-1))
    loss = (h_groups * (groups - deq) ** 2).sum(1)
    return QuantizedTensor(
        codes=codes.to(torch.uint8).view(out_features, in_features),
        scale=scale.view(out_features, n_groups),
        zero_point=zero.view(out_features, n_groups),
        loss=loss.view(out_features, n_groups),
        bits=bits,
        group_size=group_size,
    )
