"""Every fast solver backend against the reference (the pure-torch search of neuqi.quant.solver).

A backend must give the reference's scale and zero-point per group, or, where two answers are
(near) ties, the same loss: never above the reference's by more than 1e-6 relative. Losses are
compared in float64 from the returned (scale, zero-point), so that float32 rounding of the loss
sum does not hide or fake a difference.
"""

from __future__ import annotations

import json
import os

# No GPU here: the triton kernel runs in triton's interpreter on CPU tensors (set before triton
# is imported; a machine with CUDA runs the tests below on the CPU tensors the same way).
os.environ.setdefault("TRITON_INTERPRET", "1")
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from neuqi.quant import solver
from neuqi.quant.solver import quantize_tensor, resolve_backend
from neuqi.util.errors import UserError

pytest.importorskip("numba")

FAST = ["numba", *(["triton"] if solver.triton_available() else [])]


def weights(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    if kind == "student-t":  # heavy tails, 3 degrees of freedom
        chi2 = sum(torch.randn(rows, cols, generator=g) ** 2 for _ in range(3))
        w = w / torch.sqrt(chi2 / 3)
    elif kind == "outliers":  # a few weights 20-50x the others, as in real LLM layers
        mask = torch.rand(rows, cols, generator=g) < 0.01
        w = torch.where(mask, w * (20 + 30 * torch.rand(rows, cols, generator=g)), w)
    return w


def h_diag(cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(cols, generator=g) * 3 + 0.05) ** 2


def massive_activation_group(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights on a grid (ties, as in checkpoints from 4-bit GGUF) and an ``h`` whose channel 11
    carries 1e5 times the others' (as LLM "massive activations" do), on each row's largest
    weight."""
    g = torch.Generator().manual_seed(seed)
    w = torch.round(torch.randn(rows, 64, generator=g) * 8) / 64
    h = 1.0 + 0.1 * torch.rand(64, generator=g)
    h[11] = 1e5
    w[:, 11] = w.max(1).values
    return w, h


def loss64(w: torch.Tensor, h: torch.Tensor, q, bits: int) -> torch.Tensor:
    """Per-group ``sum h (w - ŵ)²`` in float64 from the quantizer's scale and zero-point."""
    rows, cols = w.shape
    g = cols if q.group_size == -1 else q.group_size
    wg = w.double().view(rows, -1, g)
    s = q.scale.double().unsqueeze(-1)
    z = q.zero_point.double().unsqueeze(-1)
    codes = torch.round(wg / s + z).clamp(0, 2**bits - 1)
    return (h.double().view(-1, g) * (wg - s * (codes - z)) ** 2).sum(-1)


def compare(w, h, bits, group_size, method, backend):
    ref = quantize_tensor(w, h, bits=bits, group_size=group_size, method=method,
                          backend="reference", compile=False)
    fast = quantize_tensor(w, h, bits=bits, group_size=group_size, method=method,
                           backend=backend)
    same = (ref.scale == fast.scale) & (ref.zero_point == fast.zero_point)
    lr, lf = loss64(w, h, ref, bits), loss64(w, h, fast, bits)
    rel = (lf - lr) / lr.clamp_min(1e-30)
    return ref, fast, same, rel


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("kind", ["normal", "student-t", "outliers"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("method", ["neuqi", "neuqi-int"])
def test_fast_backend_equals_reference(backend, kind, bits, group_size, method):
    # per-channel: a row length no power of two; triton's interpreter runs a program at a time
    # in Python (about 0.1 s a group here), so its shapes are smaller
    rows, cols = ((24, 384), (24, 200)) [group_size == -1] if backend != "triton" else (
        ((4, 128), (8, 72))[group_size == -1])
    w = weights(kind, rows, cols, seed=bits * 7 + cols)
    h = h_diag(cols, seed=bits)
    ref, fast, same, rel = compare(w, h, bits, group_size, method, backend)
    # never above the reference (1e-6: float32 rounding of the returned scale and zero-point)
    assert rel.max() <= 1e-6, f"worse than the reference by {rel.max():.2e}"
    # below it only by the reference's own precision (its float32 window step picks the best
    # piece to about 1e-6 of the loss; test_solver.py holds it to 1e-5 of brute force) ...
    assert rel.min() >= -1e-5, f"better than the reference by {-rel.min():.2e}"
    # ... and rarely: elsewhere, where the parameters differ, it is a tie to 1e-6
    assert (rel[~same] < -1e-6).float().sum() <= max(1, 0.05 * rel.numel())
    # most groups get the reference's scale (the zero-point of the float64 window step often
    # differs from the float32 one in the last bits, at the same loss)
    assert (ref.scale == fast.scale).float().mean() >= 0.8
    if method == "neuqi-int":
        assert torch.equal(fast.zero_point, torch.round(fast.zero_point))
    # codes and loss are the reference's given the parameters
    torch.testing.assert_close(fast.loss.double(), loss64(w, h, fast, bits).float().double(),
                               rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape,group_size", [((1, 32), 32), ((5, 96), 32), ((3, 72), -1),
                                               ((17, 1000), -1), ((2, 576), 64)])
def test_odd_shapes(backend, shape, group_size):
    if backend == "triton" and shape == (17, 1000):
        shape = (2, 1000)  # the interpreter's time
    w = weights("student-t", *shape, seed=sum(shape))
    h = h_diag(shape[1], seed=1)
    for bits in (2, 3, 4):
        _, fast, _, rel = compare(w, h, bits, group_size, "neuqi", backend)
        assert fast.scale.shape == (shape[0], shape[1] // (shape[1] if group_size == -1
                                                           else group_size))
        assert rel.max() <= 1e-6


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_massive_activation_channel(backend, bits):
    """One input channel carrying nearly all of ``h`` (1e5 times the others, as LLM
    "massive activations" do; SmolLM2's layer 11 down_proj has such a channel) on the row's
    largest weight, weights on a grid (ties) as in checkpoints from 4-bit GGUF. The smallest loss of a
    window is then tiny next to the terms it is summed from. The numba kernel of commit
    91236fe failed this test (worse than the reference by 1.5e-5, 4.8e-5 and 4.9e-2 at 2, 3 and
    4 bits): its window step took the u² term's coefficient, the sum of the normalised ``h``, as
    exactly one, and the float32 rounding of that sum swamped such a loss."""
    w, h = massive_activation_group(96 if backend != "triton" else 16, seed=bits)
    for method in ("neuqi", "neuqi-int"):
        _, _, _, rel = compare(w, h, bits, 64, method, backend)
        assert rel.max() <= 1e-6, f"{method}: worse than the reference by {rel.max():.2e}"


@pytest.mark.parametrize("kind", ["normal", "student-t", "outliers"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pair_bound_is_below_every_loss(kind, bits):
    """The numba kernel skips a coarse scale's bisection when its pair bound is not below the
    best loss found: that is sound only if the bound lies below the loss ``s² E(z)`` at every
    zero-point ``z``, checked here on a dense grid of ``z`` over the whole range of codes, for
    every coarse scale of heavy-tailed and outlier groups (and the bound must be positive for
    the small scales, or nothing would be tested)."""
    from neuqi.quant.solver_numba import PAIR_LIMIT, _pair_bound, _pair_terms

    levels = 2**bits
    w = weights(kind, 8, 64, seed=bits).view(-1, 64)
    h = h_diag(64, seed=bits).expand_as(w)
    h = h / h.sum(1, keepdim=True)
    s_mm, _ = solver.minmax_params(w, levels)
    w_sorted, order = torch.sort(w, dim=1)
    h_sorted = h.gather(1, order)
    positive = 0
    for g in range(w.shape[0]):
        for i in range(1, solver.COARSE_STEPS + 1):
            s = s_mm[g] * (i / solver.COARSE_STEPS)
            terms = np.zeros((3, PAIR_LIMIT))
            n_pairs = _pair_terms(w_sorted[g].numpy(), h_sorted[g].contiguous().numpy(), terms)
            bound = _pair_bound(terms, n_pairs, s.item(), levels - 1)
            positive += bound > 0
            x = (w[g].double() / s.double()).unsqueeze(0)
            z = torch.linspace(-x.max().item() - 1, levels - x.min().item() + 1, 4001,
                               dtype=torch.float64)
            loss = s.double() ** 2 * solver.grouped_error(x, h[g].double().unsqueeze(0), z,
                                                           levels)
            assert bound <= loss.min().item() * (1 + 1e-12), (g, i, bound, loss.min().item())
    assert positive >= w.shape[0] * solver.COARSE_STEPS // 8


@pytest.mark.parametrize("kind", ["massive", "student-t", "outliers"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_relaxed_bound_is_below_the_window_loss(kind, bits):
    """The numba kernel prunes a candidate scale whose relaxed bound (the tangent of the convex
    relaxed objective at the bisection's last point, :func:`_relaxed_bound`) cannot beat the best
    loss found: sound only if the bound lies below the loss at every zero-point of the
    candidate's window, checked here on a dense grid of the window for every coarse scale,
    including groups with one input channel carrying nearly all of ``h`` on the row's largest
    weight (where ``f`` is steep at a clipping edge). These groups do not reproduce the bound
    error of commit 91236fe, which only a group of SmolLM2's layer 11 showed; they guard the
    bound's soundness."""
    from neuqi.quant.solver_numba import _bound_prefix_sums, _relaxed_bound, _relaxed_z0

    levels = 2**bits
    if kind == "massive":
        w, h = massive_activation_group(6, seed=bits)
    else:
        w, h = weights(kind, 6, 64, seed=bits), h_diag(64, seed=bits)
    h = h.expand_as(w) / h.sum()
    s_mm, _ = solver.minmax_params(w, levels)
    w_sorted, order = torch.sort(w, dim=1)
    h_sorted = h.gather(1, order)
    hs_p, hws_p = solver._prefix_sums(w_sorted, h_sorted)
    p_h, p_hw, p_hw2 = np.zeros(65), np.zeros(65), np.zeros(65)
    ratios = []
    for row in range(w.shape[0]):
        ws = w_sorted[row].numpy()
        _bound_prefix_sums(ws, h_sorted[row].numpy(), p_h, p_hw, p_hw2)
        for i in range(1, solver.COARSE_STEPS + 1):
            s = np.float32(s_mm[row].item() * np.float32(i / solver.COARSE_STEPS))
            z0, k_low, k_high, z_k, spread = _relaxed_z0(ws, hs_p[row].numpy(),
                                                         hws_p[row].numpy(), s, levels - 1,
                                                         solver.RELAXED_BISECTIONS, False)
            bound = _relaxed_bound(p_h, p_hw, p_hw2, s, z_k, levels - 1, k_low, k_high, spread)
            x = (w[row].double() / float(s)).unsqueeze(0)
            z = torch.linspace(float(z0) - 1, float(z0) + 1, 801, dtype=torch.float64)
            loss = float(s) ** 2 * solver.grouped_error(x, h[row].double().unsqueeze(0), z,
                                                        levels)
            assert bound <= loss.min().item() * (1 + 1e-9), (row, i, bound, loss.min().item())
            ratios.append(bound / max(loss.min().item(), 1e-300))
    assert max(ratios) > 0.5  # the bound is not vacuous: near the loss for some scales


@pytest.mark.parametrize("backend", FAST)
def test_constant_zero_and_zero_h_groups(backend):
    w = weights("normal", 4, 128, seed=3)
    w[0] = 0.0
    w[1, :64] = 0.25
    h = h_diag(128, seed=2)
    h[:32] = 0.0  # a group whose h is all zero: uniform weighting
    for method in ("neuqi", "neuqi-int"):
        _, fast, _, rel = compare(w, h, 2, 32, method, backend)
        assert torch.isfinite(fast.scale).all() and (fast.scale > 0).all()
        assert rel.max() <= 1e-6
        torch.testing.assert_close(fast.dequantize()[0], w[0], rtol=0, atol=1e-6)
        torch.testing.assert_close(fast.dequantize()[1, :64], w[1, :64], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", FAST)
def test_result_does_not_depend_on_threads_or_chunks(backend, monkeypatch):
    rows, cols = (64, 256) if backend != "triton" else (12, 128)
    w = weights("student-t", rows, cols, seed=5)
    h = h_diag(cols, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = quantize_tensor(w, h, bits=3, group_size=64, backend=backend)
        torch.set_num_threads(max(2, threads))
        many = quantize_tensor(w, h, bits=3, group_size=64, backend=backend)
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(solver, "NUMBA_CHUNK_ELEMENTS", 640)  # 10 groups a call
    monkeypatch.setattr(solver, "TRITON_CHUNK_ELEMENTS", 640)
    chunked = quantize_tensor(w, h, bits=3, group_size=64, backend=backend)
    part = slice(5, 9) if backend == "triton" else slice(37, 41)
    rows = quantize_tensor(w[part], h, bits=3, group_size=64, backend=backend)
    for name in ("codes", "scale", "zero_point", "loss"):
        assert torch.equal(getattr(one, name), getattr(many, name)), name
        assert torch.equal(getattr(one, name), getattr(chunked, name)), name
        assert torch.equal(getattr(one, name)[part], getattr(rows, name)), name


def test_backend_selection(monkeypatch):
    assert resolve_backend("auto", "cpu") == "numba"
    assert resolve_backend("auto") == "numba"
    assert resolve_backend("reference", "cpu") == "reference"
    assert resolve_backend("numba", "cpu") == "numba"
    # the numba kernel is CPU code, the triton kernel GPU code: auto picks by device
    assert resolve_backend("auto", torch.device("cuda")) == (
        "triton" if solver.triton_available() else "reference")
    assert resolve_backend("auto", torch.device("mps")) == "reference"
    with pytest.raises(UserError, match="--solver-backend cuda"):
        resolve_backend("cuda", "cpu")
    if solver.triton_available():
        assert resolve_backend("triton", "cpu") == "triton"  # in the interpreter (set above)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(UserError, match="--solver-backend triton runs on CUDA devices"):
            resolve_backend("triton", "cpu")


def test_minmax_is_the_same_for_every_backend():
    w = weights("normal", 8, 128, seed=1)
    a = quantize_tensor(w, None, bits=3, group_size=64, method="minmax", backend="reference")
    b = quantize_tensor(w, None, bits=3, group_size=64, method="minmax", backend="numba")
    for name in ("codes", "scale", "zero_point", "loss"):
        assert torch.equal(getattr(a, name), getattr(b, name))


NO_NUMBA = """
import sys, torch
sys.modules["numba"] = None  # as if numba were not installed
from neuqi.quant.solver import quantize_tensor
w = torch.randn(4, 64)
for _ in range(2):
    q = quantize_tensor(w, None, bits=3, group_size=32)
print(float(q.loss.sum()) > 0)
try:
    quantize_tensor(w, None, bits=3, group_size=32, backend="numba")
except Exception as e:
    print(type(e).__name__, e)
"""


def fallback_lines(script: str, package: str) -> list[str]:
    """Run ``script`` (with ``package`` made unimportable) in a fresh process; check that it
    said the fallback once, on one line of stderr; return its stdout lines."""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       check=False, timeout=300, env={**os.environ})
    assert r.returncode == 0, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and package in lines[0] and "reference" in lines[0], r.stderr
    return r.stdout.splitlines()


def test_missing_numba_falls_back_once_on_one_line():
    out = fallback_lines(NO_NUMBA, "numba")
    assert out[0] == "True"
    assert out[1].startswith("UserError --solver-backend numba") and "pip install numba" in out[1]


NO_TRITON = """
import sys, torch
sys.modules["triton"] = None  # as if triton were not installed
from neuqi.quant.solver import resolve_backend
print(resolve_backend("auto", torch.device("cuda")), resolve_backend("auto", "cuda:0"))
try:
    resolve_backend("triton", "cuda")
except Exception as e:
    print(type(e).__name__, e)
"""


def test_missing_triton_falls_back_once_on_one_line():
    out = fallback_lines(NO_TRITON, "triton")
    assert out[0] == "reference reference"
    assert out[1].startswith("UserError --solver-backend triton") and "pip install triton" in out[1]


@pytest.mark.skipif(not solver.triton_available(), reason="triton is not installed")
def test_triton_kernel_on_long_groups_takes_the_reference(monkeypatch):
    """Groups longer than the kernel's MAX_GROUP are solved by the reference's code on the
    same device: the same result as the reference, bit for bit."""
    import neuqi.quant.solver_triton as st

    monkeypatch.setattr(st, "MAX_GROUP", 64)
    w = weights("normal", 3, 96, seed=4)
    h = h_diag(96, seed=4)
    ref = quantize_tensor(w, h, bits=3, group_size=-1, backend="reference", compile=False)
    fast = quantize_tensor(w, h, bits=3, group_size=-1, backend="triton")
    assert torch.equal(ref.scale, fast.scale) and torch.equal(ref.zero_point, fast.zero_point)


def test_job_records_its_backend_and_refuses_another(tiny_llama: Path, tmp_path: Path):
    """The backends agree up to ties, not bit for bit: a job is pinned to the backend that
    started it, so a resume is the uninterrupted job."""
    out = tmp_path / "out"
    tiny = ["--nsamples", "4", "--seqlen", "32", "--bits", "3", "--group-size", "16",
            "--device", "cpu"]

    def neuqi(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", "from neuqi.cli import main; main()",
                               *args], capture_output=True, text=True, check=False,
                              timeout=600)

    r = neuqi("quantize", str(tiny_llama), "--out", str(out), *tiny)
    assert r.returncode == 0, r.stderr
    manifest = json.loads((out.with_name("out.job") / "zarr.json").read_text())
    options = manifest["attributes"]["manifest"]["options"]
    assert options["solver_backend"] == "numba"  # auto on a CPU, recorded concretely
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), *tiny,
              "--solver-backend", "reference")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    # (a reference job records no backend: stores made before backends existed still match)
    assert "options.solver_backend numba -> (unset)" in r.stderr
    # the same command (auto) and an explicit numba are the same job
    for extra in ((), ("--solver-backend", "numba")):
        r = neuqi("quantize", str(tiny_llama), "--out", str(out), *tiny, *extra)
        assert r.returncode == 0, r.stderr


@pytest.mark.slow
@pytest.mark.skipif(not solver.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("arch", [89, 90])  # an RTX 4090, an H100
def test_triton_kernel_compiles_for_a_gpu(integer, arch):
    """The interpreter runs a kernel that the GPU compiler may still refuse (it did: a constexpr
    reassigned in a loop). Triton's wheel carries the NVIDIA back end and ptxas, so the kernel is
    compiled down to a cubin here, with no GPU, for the group size most jobs use (slow: a minute
    or more a case)."""
    r = subprocess.run([sys.executable, "-c", COMPILE, str(int(integer)), str(arch)],
                       capture_output=True, text=True, check=False, timeout=1800,
                       env={**os.environ, "TRITON_INTERPRET": "0"})  # this module set it to 1
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["cubin", "True"], r.stdout


COMPILE = """
import sys
from triton import compile as triton_compile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from neuqi.quant import solver
import neuqi.quant.solver_triton as st

integer, arch = bool(int(sys.argv[1])), int(sys.argv[2])
block_m, cb = st.block_sizes(128)
constants = {"INTEGER": integer, "BLOCK_M": block_m, "LOG_M": block_m.bit_length() - 1,
             "CB": cb, "ITERATIONS": solver.RELAXED_BISECTIONS,
             "REFINE": solver.REFINE_ITERATIONS, "COARSE": solver.COARSE_STEPS,
             "FINE_DIVISOR": solver.FINE_DIVISOR, "FINE_HALF": solver.FINE_HALF_WIDTH}
pointers = ("w_ptr", "h_ptr", "ws_ptr", "hsp_ptr", "hwsp_ptr", "smm_ptr", "scale_ptr", "zero_ptr")
signature = {**{name: "*fp32" for name in pointers}, "m": "i32", "n1f": "fp32",
             "levels_f": "fp32", **{name: "constexpr" for name in constants}}
kernel = triton_compile(ASTSource(fn=st._search_kernel, signature=signature,
                                  constexprs=constants),
                        target=GPUTarget("cuda", arch, 32),
                        options={"num_warps": 4, "enable_fp_fusion": False})
print("cubin" if kernel.asm["cubin"] else "none", ".entry _search_kernel" in kernel.asm["ptx"])
"""
