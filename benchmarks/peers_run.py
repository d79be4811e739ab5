"""One peer quantization, run by benchmarks/peers.py in the peers' own virtual environment.

    PEERS_PYTHON benchmarks/peers_run.py --tool {autoround,gptq,hqq} --model DIR
        --windows WINDOWS.safetensors --bits B --group-size G --out OUT [--iters N]

Loads the float checkpoint DIR with transformers (float32, on the CPU), quantizes its decoder
linears with the peer tool (lm_head / the tied embedding stay in float, as every tool does by
default and as ``neuqi quantize`` does), and writes OUT as a plain float checkpoint: config.json
(``dtype`` float32, no quantization_config), the tokenizer files, and model.safetensors holding
every tensor of DIR's checkpoint under its own name, the quantized linears as the tool's
quantize-dequantized weights (float32). OUT/peer.json records the tool, its version, its settings
and ``quantize_seconds``: the wall time of the tool's quantize call alone (not loading or saving).

The calibration windows come from ``--windows`` (int64 ``[nsamples, seqlen]``, cut by the
project's sampler in benchmarks/peers.py) and reach each tool as its API takes them:

- AutoRound: ``AutoRound(..., dataset=[{"input_ids": [1, seqlen], "attention_mask": ones}, ...],
  nsamples=N, seqlen=L)``: a list of tokenized samples is iterated as the calibration data as is.
- llm-compressor: ``oneshot(..., dataset=datasets.Dataset.from_dict({"input_ids": ...,
  "attention_mask": ...}), num_calibration_samples=N, max_seq_length=L)``: a tokenized dataset
  is not tokenized again.
- HQQ: calibration-free; the windows are not used.

This file imports only what the peers' environment has (torch, transformers, safetensors and the
peer packages), never neuqi. A failure prints ``peer error: ...`` as its last stderr line (the
traceback above it) and exits 3.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

PACKAGES = {"autoround": "auto-round", "gptq": "llmcompressor", "hqq": "hqq"}
# files of the model folder copied to OUT as they are (config.json is rewritten)
SKIP_FILES = {"model.safetensors", "model.safetensors.index.json", "config.json",
              "NEUQI_SOURCE.txt"}


def version(tool: str) -> str:
    return importlib.metadata.version(PACKAGES[tool])


def load_model(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model.eval()


def windows_of(path: Path) -> Any:
    from safetensors.torch import load_file

    return load_file(str(path))["input_ids"]


def autoround(model: Any, tokenizer: Any, windows: Any, args: argparse.Namespace) -> dict:
    """AutoRound (SignRound) with its defaults but our windows; iters default 200, ``--lr``
    AutoRound's own (1 / iters) unless given."""
    import torch
    from auto_round import AutoRound

    samples = [{"input_ids": w[None, :], "attention_mask": torch.ones_like(w[None, :])}
               for w in windows]
    settings = {"bits": args.bits, "group_size": args.group_size, "sym": False,
                "iters": args.iters, "nsamples": len(samples), "seqlen": windows.shape[1],
                "device_map": "cpu"}
    if args.lr is not None:
        settings["lr"] = args.lr
    start = time.perf_counter()
    rounder = AutoRound(model, tokenizer, dataset=samples, **settings)
    rounder.quantize()
    seconds = time.perf_counter() - start
    settings["torch_compile"] = getattr(rounder, "enable_torch_compile", None)
    return {"seconds": seconds, "settings": settings, "model": rounder.model}


def gptq(model: Any, tokenizer: Any, windows: Any, args: argparse.Namespace) -> dict:
    """llm-compressor's GPTQModifier (its defaults: block 128, dampening, actorder) on all Linear
    layers but lm_head, asymmetric int weights in groups."""
    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = QuantizationArgs(num_bits=args.bits, type="int", symmetric=False,
                               strategy="group", group_size=args.group_size)
    recipe = GPTQModifier(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
        ignore=["lm_head"],
    )
    data = Dataset.from_dict({
        "input_ids": windows.tolist(),
        "attention_mask": torch.ones_like(windows).tolist(),
    })
    settings = {"bits": args.bits, "group_size": args.group_size, "symmetric": False,
                "nsamples": len(windows), "seqlen": windows.shape[1],
                "block_size": recipe.block_size, "dampening_frac": recipe.dampening_frac,
                "actorder": str(getattr(recipe.actorder, "value", recipe.actorder)),
                "ignore": ["lm_head"]}
    start = time.perf_counter()
    quantized = oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe,
                        num_calibration_samples=len(windows), max_seq_length=windows.shape[1],
                        shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "settings": settings, "model": quantized or model}


def hqq(model: Any, tokenizer: Any, windows: Any, args: argparse.Namespace) -> dict:
    """HQQ's defaults (BaseQuantizeConfig: optimize=True, axis=1, float zero and scale; the zero
    rounded at 4 bits) on every decoder linear; compute in float32 on the CPU."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig
    from hqq.models.hf.base import AutoHQQHFModel

    config = BaseQuantizeConfig(nbits=args.bits, group_size=args.group_size)
    params = config["weight_quant_params"]
    settings = {"bits": args.bits, "group_size": args.group_size, "axis": params["axis"],
                "optimize": params["optimize"], "round_zero": params["round_zero"],
                "compute_dtype": "float32"}
    start = time.perf_counter()
    AutoHQQHFModel.quantize_model(model, quant_config=config, compute_dtype=torch.float32,
                                  device="cpu")
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "settings": settings, "model": model}


TOOLS = {"autoround": autoround, "gptq": gptq, "hqq": hqq}


def dequantized_state(model: Any, names: list[str]) -> dict:
    """The float32 tensors of ``names`` from the quantized ``model``: a module that holds its
    weight quantized (HQQLinear) is asked for it dequantized; any other module's parameters are
    taken as they are (AutoRound and llm-compressor leave the quantize-dequantized weight)."""
    import torch

    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if hasattr(module, "dequantize") and hasattr(module, "W_q"):  # hqq.core.quantize.HQQLinear
            tensors[f"{dot}weight"] = module.dequantize()
            if getattr(module, "bias", None) is not None:
                tensors[f"{dot}bias"] = module.bias
        for name, tensor in module.named_parameters(recurse=False):
            tensors.setdefault(f"{dot}{name}", tensor)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise RuntimeError(f"the quantized model has no tensor {missing[0]} "
                           f"({len(missing)} of the checkpoint's {len(names)} missing)")
    return {n: tensors[n].detach().to("cpu", torch.float32).contiguous().clone() for n in names}


def write_output(model: Any, source: Path, out: Path, record: dict) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    state = dequantized_state(model, names)
    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name not in SKIP_FILES:
            shutil.copy2(path, out / path.name)
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "peer.json").write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tool", choices=sorted(TOOLS), required=True)
    parser.add_argument("--model", type=Path, required=True, help="float checkpoint folder")
    parser.add_argument("--windows", type=Path, required=True)
    parser.add_argument("--bits", type=int, required=True)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--iters", type=int, default=200, help="AutoRound's tuning steps")
    parser.add_argument("--lr", type=float, default=None,
                        help="AutoRound's learning rate (default: its own, 1 / iters)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        import torch
        from transformers import AutoTokenizer

        torch.manual_seed(0)
        windows = windows_of(args.windows)
        tokenizer = AutoTokenizer.from_pretrained(str(args.model))
        model = load_model(args.model)
        result = TOOLS[args.tool](model, tokenizer, windows, args)
        record = {"tool": args.tool, "package": PACKAGES[args.tool],
                  "version": version(args.tool), "torch": torch.__version__,
                  "transformers": importlib.metadata.version("transformers"),
                  "threads": torch.get_num_threads(),
                  "quantize_seconds": round(result["seconds"], 1), "settings": result["settings"]}
        write_output(result["model"], args.model, args.out, record)
    except Exception as exc:  # noqa: BLE001 - any failure of a peer is one line for the table
        traceback.print_exc()
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"peer error: {type(exc).__name__}: {text[:300]}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    main()
