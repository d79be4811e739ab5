"""A checkpoint's tensor table (name -> dtype, shape) from its config.json alone.

`neuqi plan` reads the safetensors headers; a folder holding only config.json (the published
configs in ``tests/data/configs``) is planned from this table instead: one decoder layer of each
kind (dense, mixture of experts) is built on the meta device with transformers' own modelling
code and the checkpoint's per-expert names (:func:`neuqi.model.layers.new_layer`), and its tensors are
repeated for every layer of that kind. An FP8 config (``quantization_config.quant_method`` fp8,
as DeepSeek-V3's) stores the decoder-layer linears as ``F8_E4M3`` with their float32
``weight_scale_inv`` block scales, as the published checkpoint does.
"""

from __future__ import annotations

import math
from typing import Any

from neuqi.util.errors import UserError

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
