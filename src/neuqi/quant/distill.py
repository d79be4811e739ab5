"""Light distillation of the continuous quantization parameters (the paper's second result).

With the integer codes frozen, only the per-group scales and zero-points (and optionally the
RMSNorm weights) are trained, by AdamW on the mean squared error between the quantized and the
full-precision hidden states. This module is the training code only: device-agnostic, no job
store I/O (the block-wise stage is :mod:`neuqi.stages.distill`, the end-to-end command is
:mod:`neuqi.pipeline.distill_e2e`).

Recipe (defaults, from the paper): AdamW, lr 3e-4, betas (0.9, 0.95), no weight decay, batch 1,
cosine schedule with a linear warm-up over the first 10% of the steps. The order of the samples is
a seeded permutation per epoch, and the learning rate is a pure function of the step, so training
from step ``k`` with the saved parameters and optimiser state continues exactly as an
uninterrupted run would (bitwise on CPU).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from neuqi.quant.solver import dequantize
from neuqi.util.errors import UserError

__all__ = [
    "DistillSettings",
    "QuantLinear",
    "Trainer",
    "lr_at",
    "norm_parameters",
    "quant_linears",
    "sample_index",
]


@dataclass(frozen=True)
class DistillSettings:
    """Optimiser and schedule of a distillation run."""

    steps: int
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps with a linear warm-up
    seed: int = 0  # order of the samples

    def validate(self, option: str = "--steps") -> None:
        if self.steps < 1:
            raise UserError(f"{option} {self.steps}: give 1 or more training steps")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UserError(f"--lr {self.lr}: give a positive learning rate")


def lr_at(step: int, settings: DistillSettings) -> float:
    """Learning rate of step ``step`` (0-based): linear warm-up then cosine decay to 0."""
    total = settings.steps
    warm = math.ceil(settings.warmup * total)
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def sample_index(step: int, n: int, seed: int) -> int:
    """Which of ``n`` samples step ``step`` trains on: a seeded permutation for each epoch."""
    epoch, offset = divmod(step, n)
    gen = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(n, generator=gen)[offset])


class QuantLinear(nn.Module):
    """A linear whose weight is ``ŵ = scale * (codes - zero_point)`` per group, differentiable in
    ``scale`` and ``zero_point`` (float32 parameters ``[out, n_groups]``); the uint8 codes are a
    frozen buffer. Used only for training; the result is stored as a neuqi output."""

    codes: torch.Tensor  # the buffer (registered in __init__), for the type checker

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 group_size: int, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if codes.dim() != 2 or codes.dtype != torch.uint8:
            raise ValueError(f"codes must be uint8 [out, in], got {codes.dtype} {tuple(codes.shape)}")
        self.out_features, self.in_features = (int(s) for s in codes.shape)
        self.group_size = int(group_size)
        self.register_buffer("codes", codes)
        self.scale = nn.Parameter(scale.detach().to(torch.float32).clone())
        self.zero_point = nn.Parameter(zero_point.detach().to(torch.float32).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_dequant(cls, module: nn.Module) -> QuantLinear:
        """From a :class:`neuqi.formats.loader.DequantLinear` (codes shared, scales/zeros copied)."""
        return cls(cast(torch.Tensor, module.codes), cast(torch.Tensor, module.scales),
                   cast(torch.Tensor, module.zeros), cast(int, module.group_size),
                   cast("torch.Tensor | None", module.bias))

    def weight_hat(self, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.zero_point, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight_hat(x.dtype), bias)


def quant_linears(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(name, module) of every :class:`QuantLinear` in ``model``, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield name, module


def norm_parameters(model: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """(name, parameter) of every RMSNorm weight in ``model`` (input/post-attention, q/k norms,
    the final norm): the parameters ``--distill-norms`` trains besides scales and zero-points."""
    for name, module in model.named_modules():
        if type(module).__name__.endswith("RMSNorm"):
            for pname, param in module.named_parameters(recurse=False):
                yield (f"{name}.{pname}" if name else pname), param


def trainable_parameters(model: nn.Module, norms: bool) -> dict[str, nn.Parameter]:
    """The parameters distillation trains, by name, in a fixed order; everything else is frozen."""
    model.requires_grad_(False)
    params: dict[str, nn.Parameter] = {}
    for name, module in quant_linears(model):
        params[f"{name}.scale"] = module.scale
        params[f"{name}.zero_point"] = module.zero_point
    if norms:
        params.update(norm_parameters(model))
    for p in params.values():
        p.requires_grad_(True)
    return params


def with_quant_linears(layer: nn.Module, linears: dict[str, tuple[torch.Tensor, ...]],
                       group_size: int) -> nn.Module:
    """A copy of ``layer`` whose linears (relative name -> (codes, scale, zero_point)) are
    :class:`QuantLinear` modules; the original layer is left as it was."""
    student = copy.deepcopy(layer)
    for name, (codes, scale, zero) in linears.items():
        old = student.get_submodule(name)
        new = QuantLinear(codes, scale, zero, group_size, cast("torch.Tensor | None", old.bias))
        parent, _, child = name.rpartition(".")
        setattr(student.get_submodule(parent) if parent else student, child, new)
    return student


class Trainer:
    """AdamW on ``params`` with the recipe's schedule; ``loss_of(sample)`` computes the loss of one
    sample (batch 1). The state (parameters, optimiser moments, step) can be saved and restored
    between any two steps."""

    def __init__(self, params: dict[str, nn.Parameter], settings: DistillSettings,
                 n_samples: int, loss_of: Callable[[int], torch.Tensor]) -> None:
        settings.validate()
        if n_samples < 1:
            raise ValueError("no training samples")
        self.params = params
        self.settings = settings
        self.n_samples = n_samples
        self.loss_of = loss_of
        self.step = 0
        self.optimizer = torch.optim.AdamW(
            list(params.values()), lr=settings.lr, betas=settings.betas,
            weight_decay=settings.weight_decay, foreach=False,
        )

    def train(self, until: int | None = None,
              on_step: Callable[[int, float], None] | None = None) -> None:
        """Run steps ``self.step .. until-1`` (default: to the end); ``on_step(step_done, loss)``
        is called after each, with the number of steps done so far."""
        until = self.settings.steps if until is None else min(until, self.settings.steps)
        while self.step < until:
            for group in self.optimizer.param_groups:
                group["lr"] = lr_at(self.step, self.settings)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss_of(sample_index(self.step, self.n_samples, self.settings.seed))
            loss.backward()
            self.optimizer.step()
            self.step += 1
            if on_step is not None:
                on_step(self.step, float(loss.detach()))

    # -- state ---------------------------------------------------------------------------------
    def state(self) -> dict[str, torch.Tensor]:
        """Parameters and AdamW moments as three flat float32 CPU vectors (``param``,
        ``exp_avg``, ``exp_avg_sq``; the parameters concatenated in :attr:`params` order; moments
        of a parameter AdamW has not touched yet are zeros); the step is :attr:`step`."""

        def flat(get: Callable[[nn.Parameter], torch.Tensor | None]) -> torch.Tensor:
            parts = []
            for p in self.params.values():
                t = get(p)
                parts.append((torch.zeros_like(p) if t is None else t).detach().reshape(-1)
                             .to("cpu", torch.float32))
            return torch.cat(parts)

        def moment(key: str) -> Callable[[nn.Parameter], torch.Tensor | None]:
            return lambda p: self.optimizer.state.get(p, {}).get(key)

        return {"param": flat(lambda p: p), "exp_avg": flat(moment("exp_avg")),
                "exp_avg_sq": flat(moment("exp_avg_sq"))}

    def load_state(self, tensors: dict[str, torch.Tensor], step: int) -> None:
        """Restore a :meth:`state` saved after ``step`` steps."""
        total = sum(p.numel() for p in self.params.values())
        for key in ("param", "exp_avg", "exp_avg_sq"):
            if tensors[key].numel() != total:
                raise ValueError(f"saved {key} has {tensors[key].numel()} values, expected {total}")
        offset = 0
        with torch.no_grad():
            for p in self.params.values():
                rows = slice(offset, offset + p.numel())
                offset += p.numel()

                def part(key: str, p: nn.Parameter = p, rows: slice = rows) -> torch.Tensor:
                    return tensors[key][rows].reshape(p.shape).to(p.device, p.dtype).clone()

                p.copy_(part("param"))
                if step > 0:
                    self.optimizer.state[p] = {
                        "step": torch.tensor(float(step), dtype=torch.float32),
                        "exp_avg": part("exp_avg"),
                        "exp_avg_sq": part("exp_avg_sq"),
                    }
        self.step = step
