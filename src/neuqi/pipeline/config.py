"""What a quantization job is: its options, and the manifest that pins a job store to them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neuqi.model.moe import MOE_CALIBRATION
from neuqi.quant.gptq import (
    BLOCK_SIZE,
    GPTQ_PARAMS,
    GPTQ_PARAMS_DEFAULT,
    GPTQ_REFIT_DEFAULT,
    LAZY_MINMAX,
)
from neuqi.quant.solver import BACKENDS, METHODS, resolve_backend
from neuqi.util.errors import UserError

# What the README documents and the quality table measures; the solver itself takes 2..8 (the GGUF
# export re-solves at 5 bits for Q5_1 / Q5_K).
BITS = (2, 3, 4)

if TYPE_CHECKING:
    from neuqi.pipeline.plan import Knobs

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MANIFEST_VERSION = 1


@dataclass(frozen=True)
class QuantizeConfig:
    """Options of `neuqi quantize`. Everything that changes the result goes into the manifest."""

    model: str
    out: str
    bits: int = 4
    group_size: int = 128
    method: str = "neuqi"
    calib: str | None = None  # None: the calibration text shipped with the package
    calib_field: str = "text"  # the text field of --calib records (.jsonl/.json/.parquet/datasets)
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    sequential: bool = True
    dtype: str = "float32"  # compute and activation dtype
    batch_size: int = 8  # calibration windows per forward batch
    gptq: bool = False  # GPTQ error compensation after the (s, z) of `method` (neuqi.quant.gptq)
    act_order: bool = True  # GPTQ: columns by decreasing H_jj
    gptq_block_size: int = BLOCK_SIZE  # GPTQ: columns per lazy batch update
    # GPTQ: when a group's (s, z) are solved (neuqi.quant.gptq): "lazy" when GPTQ reaches the group's
    # first column, from the weights as compensated so far; "static" from the original weights
    gptq_params: str = GPTQ_PARAMS_DEFAULT
    # GPTQ: then each row keeps the better of that and GPTQ's lazy Min-Max (by output error), and
    # its scales and zero-points are re-solved by least squares with the codes fixed
    gptq_refit: bool = GPTQ_REFIT_DEFAULT
    distill_steps: int = 0  # block-wise distillation steps per layer (0: none)
    distill_lr: float = 3e-4
    distill_norms: bool = False  # also train the RMSNorm weights
    # implementation of the NeUQI search (neuqi.quant.solver.BACKENDS); `resolved` makes it concrete
    solver_backend: str = "auto"
    # mixture of experts: each expert's Hessian from its routed tokens or from all (neuqi.model.moe)
    moe_calibration: str = "routed"
    # Not in the manifest (they never change the method, only how much is held at once):
    max_memory: int | None = None  # bytes of device memory (host on cpu); None: the default
    memory_knobs: str | None = None  # plan.Knobs.encode() of the runner's plan; None: hold all

    @property
    def knobs(self) -> Knobs:
        """What the stages hold at once (the plan's, or everything when none was made)."""
        from neuqi.pipeline.plan import Knobs

        if self.memory_knobs:
            return Knobs.decode(self.memory_knobs)
        return Knobs(self.batch_size, 0, False, 0, 0)

    def validate(self) -> None:
        if self.bits not in BITS:
            raise UserError(f"--bits {self.bits}: neuqi quantizes to 2, 3 or 4 bits (the settings "
                            f"the README documents and measures); choose one of them")
        if self.method == LAZY_MINMAX and not self.gptq:
            raise UserError(f"--method {LAZY_MINMAX} is GPTQ's own Min-Max: add --gptq, or use "
                            "--method minmax")
        if self.method not in (*METHODS, LAZY_MINMAX):
            raise UserError(f"--method {self.method}: choose one of {', '.join(METHODS)} "
                            f"(or {LAZY_MINMAX} with --gptq)")
        if self.gptq_params not in GPTQ_PARAMS:
            raise UserError(f"--gptq-params {self.gptq_params}: choose one of "
                            f"{', '.join(GPTQ_PARAMS)}")
        if self.group_size != -1 and self.group_size <= 0:
            raise UserError(f"--group-size {self.group_size}: use a positive size or -1")
        if self.solver_backend not in BACKENDS:
            raise UserError(f"--solver-backend {self.solver_backend}: choose one of "
                            f"{', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: use 1 or more")
        if self.gptq_block_size < 1:
            raise UserError(f"--gptq-block-size {self.gptq_block_size}: use 1 or more")
        if self.distill_steps < 0:
            raise UserError(f"--distill-steps {self.distill_steps}: use 0 (off) or more")
        if self.max_memory is not None and self.max_memory <= 0:
            raise UserError(f"--max-memory {self.max_memory}: give a positive size")
        if self.moe_calibration not in MOE_CALIBRATION:
            raise UserError(f"--moe-calibration {self.moe_calibration}: choose one of "
                            f"{', '.join(MOE_CALIBRATION)}")
        if not self.distill_lr > 0:
            raise UserError(f"--distill-lr {self.distill_lr}: give a positive learning rate")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def resolved(self, device: torch.device | str | None) -> QuantizeConfig:
        """This config with ``solver_backend`` made concrete for ``device`` (``reference`` when
        the method has no NeUQI search). The job records the concrete backend: the backends give
        the same scale and zero-point up to ties (equal losses, see neuqi.quant.solver_numba), not bit
        for bit, so a job resumed with another backend would not be the uninterrupted job, and
        `neuqi quantize` with another --solver-backend is refused like any other changed option."""
        backend = resolve_backend(self.solver_backend, device)
        if self.method in ("minmax", LAZY_MINMAX):
            backend = "reference"
        return replace(self, solver_backend=backend)

    def manifest(self, model_fingerprint: str, calib_sha256: str) -> dict[str, Any]:
        options = asdict(self)
        for key in ("max_memory", "memory_knobs"):  # how much is held, not what is computed
            options.pop(key)
        if not self.distill_steps:  # job stores made before distillation existed still match
            for key in ("distill_steps", "distill_lr", "distill_norms"):
                options.pop(key)
        if self.calib_field == "text":  # nor did --calib-field
            options.pop("calib_field")
        if self.moe_calibration == "routed":  # and those made before MoE support
            options.pop("moe_calibration")
        if self.solver_backend == "reference":  # as do those made before solver backends
            options.pop("solver_backend")
        if not self.gptq or self.gptq_params == "static":  # and those before --gptq-params
            options.pop("gptq_params")
        if not self.gptq or not self.gptq_refit:  # and before --gptq-refit
            options.pop("gptq_refit")
        return {
            "neuqi_job": MANIFEST_VERSION,
            "options": options,
            "model_fingerprint": model_fingerprint,
            "calib_sha256": calib_sha256,
        }

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> QuantizeConfig:
        options = manifest["options"]
        # a GPTQ job that names neither was made with the static recipe, before the options
        before = {"gptq_params": "static", "gptq_refit": False} if options.get("gptq") else {}
        return cls(**{"solver_backend": "reference", **before, **options})


def default_job_dir(out: str | Path) -> Path:
    """The job store beside ``--out``: ``<out>.job``."""
    out = Path(out).expanduser()
    return out.with_name(out.name + ".job")
