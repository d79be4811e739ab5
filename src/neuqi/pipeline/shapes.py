"""What `neuqi plan` knows of a checkpoint: its shapes (:class:`ModelShape`, :func:`read_shape`)
from config.json and the safetensors headers, or from config.json alone.

`neuqi plan` reads the safetensors headers; a folder holding only config.json (the published
configs in ``tests/data/configs``) is planned from this table instead: one decoder layer of each
kind (dense, mixture of experts) is built on the meta device with transformers' own modelling
code and the checkpoint's per-expert names (:func:`neuqi.model.layers.new_layer`), and its tensors are
repeated for every layer of that kind. An FP8 config (``quantization_config.quant_method`` fp8,
as DeepSeek-V3's) stores the decoder-layer linears as ``F8_E4M3`` with their float32
``weight_scale_inv`` block scales, as the published checkpoint does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuqi.util.errors import UserError

ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know about a checkpoint, from config.json and the headers."""

    path: str
    family: str
    layers: int
    hidden: int
    vocab: int
    linears: tuple[tuple[str, int, int], ...]  # (name relative to a layer, out, in), in order
    groups: tuple[tuple[str, int], ...]  # (input group, its width)
    layer_other_bytes: int  # norms, biases of one layer, as stored
    stored_bytes: dict[str, int] = field(default_factory=dict)  # dtype name -> bytes/elt seen
    other_bytes: int = 0  # embeddings, final norm, lm_head, as stored
    weight_bytes: int = 2  # bytes per stored linear weight element
    total_bytes: int = 0  # the checkpoint's tensor data

    @property
    def layer_params(self) -> int:
        return sum(o * i for _, o, i in self.linears)

    @property
    def largest(self) -> tuple[str, int, int]:
        return max(self.linears, key=lambda t: t[1] * t[2])


def _header(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100 * 10**6:
                raise UserError(f"{path}: not a safetensors file (header of {n} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror})") from None
    except ValueError:
        raise UserError(f"{path}: damaged safetensors header; re-download it") from None
    header.pop("__metadata__", None)
    return header


def _local_files(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise UserError(f"{folder}: no config.json; give a model folder (config.json + "
                        "safetensors) or a hub id")
    try:
        config = json.loads(config_path.read_text())
    except ValueError:
        raise UserError(f"{config_path}: not valid JSON") from None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError):
            raise UserError(f"{index}: not a valid safetensors index") from None
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:  # config.json alone: the shapes transformers' model of it has
        return config, tensors_from_config(config, str(folder))
    tensors: dict[str, Any] = {}
    for name in files:
        if not (folder / name).is_file():
            raise UserError(f"{folder / name}: missing (named by the index); re-download it")
        tensors.update(_header(folder / name))
    return config, tensors


def _hub_files(repo: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        from huggingface_hub import get_safetensors_metadata, hf_hub_download

        config = json.loads(Path(hf_hub_download(repo, "config.json")).read_text())
        meta = get_safetensors_metadata(repo)
    except Exception as e:  # noqa: BLE001 - offline, unknown repo, gated: one line
        raise UserError(f"{repo}: not a local model folder, and its config and safetensors "
                        f"headers could not be read from the hub ({type(e).__name__})") from None
    tensors = {
        name: {"dtype": info.dtype, "shape": info.shape}
        for file in meta.files_metadata.values() for name, info in file.tensors.items()
    }
    return config, tensors


def read_shape(model: str) -> ModelShape:
    """The checkpoint's shapes from config.json and its safetensors headers (no tensor data)."""
    from neuqi.model.demo import BUILTIN, ensure_builtin
    from neuqi.model.layers import arch_for

    folder = Path(model).expanduser()
    if not folder.exists() and model in BUILTIN:  # as quantize reads it: converted once
        folder = ensure_builtin(model)
    if folder.is_dir():
        config, tensors = _local_files(folder)
    elif model.count("/") == 1 and not folder.exists() and not model.startswith((".", "/")):
        config, tensors = _hub_files(model)
    else:
        raise UserError(f"{model}: no such model folder")
    arch = arch_for(config, tensors)  # MoE block (Mixtral): as the checkpoint names it
    layers = int(config.get("num_hidden_layers", 0))
    if layers < 1:
        raise UserError(f"{model}: config.json has no num_hidden_layers")
    # the largest layer (an MoE model's sparse layers are larger than its dense ones)
    index = max(range(layers), key=lambda i: (len(arch.linears_of(i)), -i))
    prefix = arch.layer_prefix(index)
    linears = []
    weight_bytes = 2
    for linear in arch.linears_of(index):
        info = tensors.get(f"{prefix}{linear}.weight")
        if info is None:
            raise UserError(f"{model}: tensor {prefix}{linear}.weight is not in the checkpoint")
        out_f, in_f = info["shape"]
        linears.append((linear, int(out_f), int(in_f)))
        weight_bytes = ST_BYTES.get(info["dtype"], 4)
    widths = {lin: i for lin, _, i in linears}
    groups = tuple((g, widths[names[0]]) for g, names in arch.groups(index))
    quantized = {f"{prefix}{lin}.weight" for lin in arch.linears_of(index)}

    def nbytes(info: dict[str, Any]) -> int:
        return math.prod(info["shape"]) * ST_BYTES.get(info["dtype"], 4)

    layer_other = sum(nbytes(t) for n, t in tensors.items()
                      if n.startswith(prefix) and n not in quantized)
    in_layers = arch.layers_prefix + "."
    other = sum(nbytes(t) for n, t in tensors.items() if not n.startswith(in_layers))
    embed = tensors.get(arch.embed)
    vocab = int(embed["shape"][0]) if embed else int(config.get("vocab_size", 0))
    return ModelShape(
        path=str(model), family=str(config.get("model_type")), layers=layers,
        hidden=int(config["hidden_size"]), vocab=vocab, linears=tuple(linears), groups=groups,
        layer_other_bytes=layer_other, other_bytes=other, weight_bytes=weight_bytes,
        total_bytes=sum(nbytes(t) for t in tensors.values()),
    )


_ST = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def tensors_from_config(config: dict[str, Any], where: str) -> dict[str, dict[str, Any]]:
    """Tensor name -> ``{"dtype", "shape"}`` of the checkpoint ``config`` describes."""
    from transformers import AutoConfig

    from neuqi.model.layers import arch_for, new_layer

    arch = arch_for(config)  # the one-line refusal of an unsupported family first
    try:
        cfg = AutoConfig.for_model(**config)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot parse: one line
        raise UserError(f"{where}: transformers cannot read config.json ({e})") from None
    arch = arch_for(cfg)
    dtype = _ST.get(str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"), "BF16")
    qc = config.get("quantization_config") or {}
    fp8 = qc.get("quant_method") == "fp8"
    block = qc.get("weight_block_size") or (128, 128)
    kinds: dict[bool, tuple[dict[str, tuple[int, ...]], set[str]]] = {}
    out: dict[str, dict[str, Any]] = {}
    for i in range(int(cfg.num_hidden_layers)):
        kind = arch.is_moe_layer(i)
        if kind not in kinds:
            layer = new_layer(cfg, i)
            kinds[kind] = ({k: tuple(v.shape) for k, v in layer.state_dict().items()},
                           {f"{lin}.weight" for lin in arch.linears_of(i)})
        shapes, linears = kinds[kind]
        prefix = arch.layer_prefix(i)
        for key, shape in shapes.items():
            if fp8 and key in linears:
                out[prefix + key] = {"dtype": "F8_E4M3", "shape": list(shape)}
                scales = [math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])]
                out[prefix + key + "_scale_inv"] = {"dtype": "F32", "shape": scales}
            else:
                st = "F32" if key.endswith("e_score_correction_bias") else dtype
                out[prefix + key] = {"dtype": st, "shape": list(shape)}
    h, vocab = int(cfg.hidden_size), int(cfg.vocab_size)
    out[arch.embed] = {"dtype": dtype, "shape": [vocab, h]}
    out[arch.final_norm] = {"dtype": dtype, "shape": [h]}
    if not getattr(cfg, "tie_word_embeddings", False):
        out[arch.lm_head] = {"dtype": dtype, "shape": [vocab, h]}
    return out
