"""Read a neuqi output folder (see :mod:`neuqi.formats.output`) back: tensors, dequantized weights, a model.

* :class:`NeuqiOutput` — the validated folder: metadata, raw stored tensors, dequantized weights.
* :class:`DequantLinear` — a linear layer holding codes, scales and zero-points; it dequantizes
  its weight on every forward pass (``ŵ = s * (q - z)``, in the input's dtype).
* :func:`load_quantized` — a transformers model built from config.json with every quantized linear
  replaced by a :class:`DequantLinear`, ready for ``model(input_ids).logits``.
* :func:`read_dequantized` — one linear's dequantized float32 weight.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from neuqi.formats.output import FORMAT, FORMAT_VERSION, INDEX_FILE, META_FILE
from neuqi.model.architectures import arch_for
from neuqi.quant.packing import packed_size, unpack_codes
from neuqi.quant.solver import dequantize
from neuqi.util.errors import UserError

__all__ = ["DequantLinear", "NeuqiOutput", "load_quantized", "read_dequantized"]


class DequantLinear(nn.Module):
    """``y = x @ ŵᵀ + b`` with ``ŵ = scales * (codes - zeros)`` per group, dequantized per call.

    Buffers: ``codes`` uint8 ``[out, in]`` (unpacked once at load), ``scales`` and ``zeros``
    float32 ``[out, n_groups]``; ``bias`` is an optional frozen parameter. ``group_size = -1``
    means one group per output row.
    """

    codes: torch.Tensor  # the buffers (registered in __init__), for the type checker
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(
        self,
        codes: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if codes.dim() != 2 or codes.dtype != torch.uint8:
            raise ValueError(
                f"codes must be uint8 [out, in], got {codes.dtype} {tuple(codes.shape)}"
            )
        out_features, in_features = codes.shape
        g = in_features if group_size == -1 else group_size
        if g <= 0 or in_features % g:
            raise ValueError(f"group_size {group_size} does not divide in_features {in_features}")
        n_groups = in_features // g
        for label, t in (("scales", scales), ("zeros", zeros)):
            if tuple(t.shape) != (out_features, n_groups):
                raise ValueError(
                    f"{label} must have shape {(out_features, n_groups)}, got {tuple(t.shape)}"
                )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.bits = int(bits)
        self.group_size = int(group_size)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales.to(torch.float32))
        self.register_buffer("zeros", zeros.to(torch.float32))
        if bias is not None:
            self.bias: nn.Parameter | None = nn.Parameter(bias, requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_packed(
        cls,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        bits: int,
        group_size: int,
        in_features: int,
        bias: torch.Tensor | None = None,
    ) -> DequantLinear:
        """Build from the stored form: ``qweight`` uint8 ``[out, ceil(in*bits/8)]`` (pack_codes)."""
        return cls(unpack_codes(qweight, bits, in_features), scales, zeros, bits, group_size, bias)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ŵ`` as a dense ``[out, in]`` tensor of ``dtype`` (computed in float32, then cast)."""
        return dequantize(self.codes, self.scales, self.zeros, self.group_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )


class NeuqiOutput:
    """A neuqi output folder, validated when opened (neuqi.json, format version, index, shards).

    Attributes: ``path``, ``meta`` (parsed neuqi.json), ``quantized`` (weight name -> metadata:
    bits, group_size, shape, in_features, qweight/scales/zeros stored names), ``weight_map``
    (stored name -> shard file name).
    """

    def __init__(self, path: Path, meta: dict[str, Any], weight_map: dict[str, str]) -> None:
        self.path = path
        self.meta = meta
        self.weight_map = weight_map
        self.quantized: dict[str, dict[str, Any]] = dict(meta.get("quantized") or {})

    @classmethod
    def open(cls, path: str | Path) -> NeuqiOutput:
        """Open ``path``; every problem is a one-line UserError naming the file."""
        path = Path(path).expanduser()
        meta_file = path / META_FILE
        if not path.is_dir():
            raise UserError(f"{path}: folder does not exist; pass the --out folder of neuqi")
        if not meta_file.is_file():
            raise UserError(
                f"{path}: not a neuqi output (no {META_FILE}); pass a folder written by neuqi"
            )
        meta = _read_json(meta_file)
        fmt, version = meta.get("format"), meta.get("format_version")
        if fmt != FORMAT or version != FORMAT_VERSION:
            raise UserError(
                f"{meta_file}: format {fmt!r} version {version!r} is not supported (this neuqi "
                f"reads {FORMAT} version {FORMAT_VERSION}); re-quantize with this neuqi"
            )
        quantized = meta.get("quantized")
        if not isinstance(quantized, dict):
            raise UserError(f"{meta_file}: has no 'quantized' table; the output is damaged")
        index_file = path / INDEX_FILE
        if not index_file.is_file():
            raise UserError(f"{index_file}: missing; the output is incomplete, re-run neuqi")
        index = _read_json(index_file)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index_file}: has no weight_map; the output is damaged, re-run neuqi")
        for shard in sorted(set(weight_map.values())):
            if (
                not isinstance(shard, str)
                or Path(shard).name != shard
                or not (path / shard).is_file()
            ):
                raise UserError(
                    f"{path}: shard {shard!r} named in {INDEX_FILE} is missing; "
                    f"the output is incomplete, re-run neuqi"
                )
        out = cls(path, meta, dict(weight_map))
        for name, info in quantized.items():
            for key in ("bits", "group_size", "in_features", "shape", "qweight", "scales", "zeros"):
                if key not in info:
                    raise UserError(
                        f"{meta_file}: entry {name} lacks {key!r}; the output is damaged"
                    )
            for key in ("qweight", "scales", "zeros"):
                if info[key] not in weight_map:
                    raise UserError(
                        f"{index_file}: tensor {info[key]} of {name} is not in the weight_map; "
                        f"the output is damaged, re-run neuqi"
                    )
        return out

    @property
    def stored_names(self) -> list[str]:
        """Every stored tensor name, sorted."""
        return sorted(self.weight_map)

    @property
    def plain_names(self) -> list[str]:
        """Stored tensors that are not part of a quantized weight (embeddings, norms, biases...)."""
        parts = {
            info[k] for info in self.quantized.values() for k in ("qweight", "scales", "zeros")
        }
        return [n for n in self.stored_names if n not in parts]

    def read(self, name: str) -> torch.Tensor:
        """One stored tensor, as stored."""
        return self.read_many([name])[name]

    def read_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """Stored tensors by name, opening each shard once."""
        from safetensors import safe_open

        by_shard: dict[str, list[str]] = defaultdict(list)
        for name in names:
            if name not in self.weight_map:
                raise UserError(f"{self.path}: tensor {name} is not in the output")
            by_shard[self.weight_map[name]].append(name)
        out: dict[str, torch.Tensor] = {}
        for shard, keys in by_shard.items():
            file = self.path / shard
            try:
                with safe_open(str(file), framework="pt") as f:
                    for key in keys:
                        out[key] = f.get_tensor(key)
            except UserError:
                raise
            except Exception as e:  # noqa: BLE001 - damaged or truncated file
                msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise UserError(f"{file}: unreadable ({msg}); re-run neuqi") from None
        return out

    def _info(self, name: str) -> dict[str, Any]:
        try:
            return self.quantized[name]
        except KeyError:
            raise UserError(
                f"{self.path}: {name} is not a quantized weight of this output "
                f"({len(self.quantized)} are; e.g. {next(iter(sorted(self.quantized)), 'none')})"
            ) from None

    def linear(
        self,
        name: str,
        bias: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
    ) -> DequantLinear:
        """The :class:`DequantLinear` of quantized weight ``name``, its buffers on ``device``."""
        info = self._info(name)
        t = self.read_many([info["qweight"], info["scales"], info["zeros"]])
        bits, group_size, in_features = info["bits"], info["group_size"], info["in_features"]
        qweight = t[info["qweight"]]
        out_features = int(info["shape"][0])
        expected = (out_features, packed_size(in_features, bits))
        if tuple(qweight.shape) != expected or qweight.dtype != torch.uint8:
            raise UserError(
                f"{self.path}: {info['qweight']} has shape {tuple(qweight.shape)} "
                f"{qweight.dtype}, expected {expected} uint8; the output is damaged"
            )
        try:
            return DequantLinear.from_packed(
                qweight.to(device),
                t[info["scales"]].to(device),
                t[info["zeros"]].to(device),
                bits,
                group_size,
                in_features,
                bias,
            )
        except ValueError as e:
            raise UserError(f"{self.path}: {name}: {e}; the output is damaged") from None

    def dequantized(self, name: str) -> torch.Tensor:
        """The dequantized float32 weight ``[out, in]`` of quantized linear ``name``."""
        return self.linear(name).dequantized_weight(torch.float32)

    def weight(self, name: str) -> torch.Tensor:
        """A model tensor by its original name: dequantized float32 if quantized, else as stored."""
        if name in self.quantized:
            return self.dequantized(name)
        return self.read(name)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(
            f"{path}: not valid JSON ({e}); the output is damaged, re-run neuqi"
        ) from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a JSON object; the output is damaged, re-run neuqi")
    return data


def read_dequantized(out_dir: str | Path, name: str) -> torch.Tensor:
    """Dequantized float32 weight ``[out, in]`` of linear ``name`` (e.g. ``"...q_proj.weight"``)."""
    return NeuqiOutput.open(out_dir).dequantized(name)


def _load_config(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path / 'config.json'}: transformers cannot read it ({msg})") from None
    # Our quantization_config is informative only: transformers must not look for a quantizer.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load_quantized(
    out_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """A transformers causal LM from a neuqi output, quantized linears as :class:`DequantLinear`.

    Built on the meta device from config.json (no random init); the unquantized tensors are cast
    to ``dtype`` (scales and zero-points stay float32; weights are dequantized in the input's
    dtype). Returned in eval mode with gradients off. UserError for a folder that is not a neuqi
    output, an unsupported format version, or tensors that do not match config.json.
    """
    from transformers import AutoModelForCausalLM

    out = NeuqiOutput.open(out_dir)
    path = out.path
    device = torch.device(device)
    config = _load_config(path)
    arch = arch_for(config, [*out.quantized, *out.plain_names])  # MoE block: as stored
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=arch.attn_implementation(config)
        )
    from neuqi.model.moe import unfuse_experts

    unfuse_experts(model, arch)  # MoE: one linear per expert projection, as stored

    # 1. quantized linears
    for name, info in sorted(out.quantized.items()):
        module_name = name[: -len(".weight")]
        try:
            old = model.get_submodule(module_name)
        except AttributeError:
            raise UserError(
                f"{path / META_FILE}: {name} has no linear layer in the model of config.json; "
                f"the output does not match its config"
            ) from None
        shape = (int(info["shape"][0]), int(info["in_features"]))
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != shape:
            raise UserError(
                f"{path / META_FILE}: {name} has shape {shape}, but the model of config.json has "
                f"{old}; the output does not match its config"
            )
        bias = None
        if old.bias is not None:  # filled from the state dict below
            bias = torch.empty(old.out_features, dtype=dtype, device="meta")
        new = out.linear(name, bias=bias, device=device)
        _set_submodule(model, module_name, new)

    # 2. everything else
    names = out.plain_names
    state = {}
    for key, t in out.read_many(names).items():
        if t.is_floating_point():
            t = t.to(dtype)
        state[key] = t.to(device)
    result = model.load_state_dict(state, strict=False, assign=True)
    unexpected = [k for k in result.unexpected_keys if not k.endswith("rotary_emb.inv_freq")]
    if unexpected:
        raise UserError(
            f"{path}: tensor {unexpected[0]} is not used by the model of config.json "
            f"({len(unexpected)} unexpected); the output does not match its config"
        )

    # 3. tied head, rotary buffers (recomputed, never stored)
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if (
        isinstance(head, nn.Linear)
        and head.weight.is_meta
        and getattr(model.config, "tie_word_embeddings", False)
        and embed is not None
        and not embed.weight.is_meta
    ):
        head.weight = embed.weight
    for module_name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding") and any(
            b.is_meta for b in module.buffers()
        ):
            with torch.device("cpu"):
                rotary = type(module)(config=model.config)
            _set_submodule(model, module_name, rotary.to(device))
        # Gemma's scaled embedding keeps its factor in a non-persistent buffer
        if hasattr(module, "scalar_embed_scale") and module.embed_scale.is_meta:
            module.embed_scale = torch.tensor(module.scalar_embed_scale, device=device)

    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise UserError(
            f"{path}: tensor {left[0]} is missing from the output ({len(left)} missing); the "
            f"output is incomplete or does not match its config.json"
        )
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        try:
            model.generation_config = GenerationConfig.from_pretrained(str(path))
        except Exception:  # noqa: BLE001, S110 - optional: keep the default from config.json
            pass
    model.requires_grad_(False)
    return model.eval()
