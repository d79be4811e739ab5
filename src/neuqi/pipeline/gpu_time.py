"""The plan's time on a GPU: a stated model (data-sheet rates, the triton kernel's rate, a launch
cost per GPTQ column, the checkpoint's read speed), not a probe of this machine, which may have no
GPU. ``neuqi plan --gpu NAME`` picks an entry of :data:`GPUS`; :func:`gpu_assumptions` is the line
that says what was assumed. No torch is imported unless a GPU is looked for.
"""

from __future__ import annotations

from typing import Any

from neuqi.util.errors import UserError

# The plan's time on a GPU is a stated model, not a probe of this machine (which may have no GPU):
# dense peak rates from the vendors' data sheets at MATMUL_EFFICIENCY, the NeUQI search at the
# triton kernel's rate, GPTQ as its column-block updates plus a launch cost per column, and the
# checkpoint read at DISK_BYTES_PER_S. The solver and GPTQ rates are ASSUMED until
# `benchmarks/gpu_check.py` has run on that GPU; its measured figures then replace them here (the
# "source" of each entry says which).
MATMUL_EFFICIENCY = 0.6  # of the dense peak, for the calibration passes' large matmuls
DISK_BYTES_PER_S = 2e9  # an NVMe SSD reading the checkpoint's layer shards
GPTQ_COLUMN_SECONDS = 1e-4  # kernel launches of one GPTQ column (a few small ops each)
# name: (device name contains, fp32 dense FLOP/s, bf16 tensor-core dense FLOP/s with fp32
# accumulation, NeUQI solver weights/s, source of the solver rate)
GPUS: dict[str, tuple[str, float, float, float, str]] = {
    "rtx3090": ("3090", 35.6e12, 71e12, 25e6, "assumed: H100's, scaled by fp32 rate"),
    "rtx4090": ("4090", 82.6e12, 165.2e12, 60e6, "assumed: H100's, scaled by fp32 rate"),
    "a100": ("A100", 19.5e12, 312e12, 15e6, "assumed: H100's, scaled by fp32 rate"),
    "h100": ("H100", 67e12, 989e12, 50e6, "assumed: the 50 M weights/s the kernel is built to"),
}


def torch_cuda() -> bool:
    """Whether torch sees a CUDA device here (torch imported only when asked)."""
    import torch

    return torch.cuda.is_available()


def detect_gpu(device: str = "cuda") -> str | None:
    """The :data:`GPUS` name of the CUDA device here, or None (no GPU, or one not listed)."""
    import torch

    if not torch_cuda():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((key for key, (tag, *_) in GPUS.items() if tag.lower() in name.lower()), None)


def gpu_speed(gpu: str, dtype: str) -> dict[str, Any]:
    """The speed entries of :func:`neuqi.pipeline.plan._seconds` for ``gpu`` (a :data:`GPUS` name) computing in
    ``dtype``: the stated model, with what it assumed in ``assumptions``."""
    if gpu not in GPUS:
        raise UserError(f"--gpu {gpu}: choose one of {', '.join(GPUS)}")
    _, fp32, bf16, solver, source = GPUS[gpu]
    peak = fp32 if dtype == "float32" else bf16
    return {"matmul_flops": MATMUL_EFFICIENCY * peak, "solver_weights_per_s": solver,
            "gptq_flops": MATMUL_EFFICIENCY * fp32, "gptq_column_seconds": GPTQ_COLUMN_SECONDS,
            "disk_bytes_per_s": DISK_BYTES_PER_S, "gpu": gpu, "solver_source": source}


def gpu_assumptions(speed: dict[str, Any], dtype: str) -> str:
    """One line: what the GPU time model of ``speed`` assumed."""
    return (f"time model for {speed['gpu']}: calibration matmuls ({dtype}) at "
            f"{speed['matmul_flops'] / 1e12:.0f} TFLOP/s ({MATMUL_EFFICIENCY:.0%} of dense peak), "
            f"NeUQI search {speed['solver_weights_per_s'] / 1e6:.0f} M weights/s "
            f"({speed['solver_source']}), GPTQ's updates at "
            f"{speed['gptq_flops'] / 1e12:.0f} TFLOP/s fp32 + "
            f"{speed['gptq_column_seconds'] * 1e6:.0f} us per column, checkpoint read at "
            f"{speed['disk_bytes_per_s'] / 1e9:.0f} GB/s")
