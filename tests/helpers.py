"""Helpers shared by the test files: running the real CLI, reading an output folder, comparing
two outputs bit for bit. (Fixtures that build models live in conftest.py.)"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

#: Calibration small enough for the tiny models: 4 windows of 32 tokens, batches of 3.
TINY = ["--nsamples", "4", "--seqlen", "32", "--batch-size", "3", "--device", "cpu"]


def neuqi_cmd(*args: str) -> list[str]:
    """The argv of a ``neuqi`` process (this interpreter, so the installed package is the one
    under test)."""
    return [sys.executable, "-c", "from neuqi.cli import main; main()", *args]


def neuqi(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``neuqi ARGS`` as a real process; its exit code and output, never raising."""
    return subprocess.run(
        neuqi_cmd(*args), check=False, capture_output=True, text=True,
        env={**os.environ, **(env or {})}, timeout=600,
    )


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The single stderr line of a refused command (exit 2, no traceback)."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def output_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a neuqi output folder, by name."""
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(out / shard, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                tensors[name] = f.get_tensor(name)
    return tensors


def assert_bitwise_equal(a: Path, b: Path) -> None:
    """The two outputs hold the same tensors, bit for bit."""
    ta, tb = output_tensors(a), output_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].dtype == tb[name].dtype and torch.equal(ta[name], tb[name]), name


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of an output folder, byte for byte; neuqi.json without its creation time."""
    files = {}
    for path in sorted(out.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        if path.name == "neuqi.json":
            meta = json.loads(data)
            del meta["created"]["time"]
            data = json.dumps(meta, sort_keys=True).encode()
        files[path.relative_to(out).as_posix()] = data
    return files


def assert_same_output(out: Path, reference: Path) -> None:
    """Every file of ``out`` equals the ``reference`` output's, byte for byte."""
    got, want = output_files(out), output_files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{name} differs from the uninterrupted run"


@contextlib.contextmanager
def local_cluster(**kwargs: Any) -> Iterator[Any]:
    """A ``distributed.LocalCluster(dashboard_address=None, **kwargs)`` for a ``with`` block.

    Its close tolerates distributed's fixed 5 s nanny timeout, which a loaded machine (the test
    suite runs in two processes) can miss after the nanny has already killed its worker: the
    test's assertions have run by then.
    """
    import distributed

    cluster = distributed.LocalCluster(dashboard_address=None, **kwargs)
    try:
        yield cluster
    finally:
        with contextlib.suppress(TimeoutError):
            cluster.close()


def gguf_in_transformers(path: Path) -> torch.nn.Module:
    """A GGUF file loaded by transformers' own GGUF reader (float32), its config completed with
    what llama.cpp takes from the file's keys (or fixes for the architecture) and transformers'
    reader leaves at the config class's defaults: Phi-3's rotated dimensions
    (``rope.dimension_count``) and LongRoPE (``rope_factors_*``, the attention factor), Gemma 2/3's query scale (llama.cpp: 1/sqrt(``key_length``)) and
    soft-capping, the MoE expert widths and Qwen2-MoE's top-k weights (llama.cpp's qwen2moe does
    not renormalize them)."""
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoModelForCausalLM

    reader = GGUFReader(path)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
    tensors = {t.name: t.data.tolist() for t in reader.tensors if t.name.startswith("rope_")}
    arch = fields["general.architecture"]

    def key(name: str) -> Any:
        return fields.get(f"{arch}.{name}")

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if arch == "phi3":
        config.rope_parameters["partial_rotary_factor"] = (
            key("rope.dimension_count") / key("attention.key_length"))
        if "rope_factors_short.weight" in tensors:  # LongRoPE: what llama.cpp reads
            config.rope_parameters.update(
                rope_type="longrope", short_factor=tensors["rope_factors_short.weight"],
                long_factor=tensors["rope_factors_long.weight"],
                original_max_position_embeddings=key("rope.scaling.original_context_length"),
                attention_factor=key("rope.scaling.attn_factor"))
    if arch in ("gemma2", "gemma3"):  # tiny models: not the 27B, whose scale is hidden/heads
        config.query_pre_attn_scalar = key("attention.key_length")
        config.final_logit_softcapping = key("final_logit_softcapping")
        config.attn_logit_softcapping = key("attn_logit_softcapping")
    if arch in ("qwen2moe", "qwen3moe"):
        config.moe_intermediate_size = key("expert_feed_forward_length")
        config.norm_topk_prob = arch == "qwen3moe"
        if key("expert_shared_feed_forward_length"):
            config.shared_expert_intermediate_size = key("expert_shared_feed_forward_length")
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                dtype=torch.float32)


def quantize_w4g32_gguf(model: Path, tmp_path: Path) -> tuple[Path, dict[str, Any], dict[str, Any]]:
    """``model`` quantized by NeUQI at 4 bits in groups of 32 (4 x 32 calibration tokens), its
    output exported as GGUF with the output's own codes (nothing re-solved), and the file read
    back: ``(output folder, tensors by name, metadata values by key)``."""
    from gguf import GGUFReader

    from neuqi.formats.export import export
    from neuqi.pipeline.config import QuantizeConfig
    from neuqi.pipeline.runner import quantize

    out = quantize(QuantizeConfig(model=str(model), out=str(tmp_path / "out"), nsamples=4,
                                  seqlen=32, batch_size=3, bits=4, group_size=32,
                                  method="neuqi"), None, "cpu")
    file = tmp_path / "m.gguf"
    assert export(out, "gguf", file).re_solved == 0
    reader = GGUFReader(file)
    return (out, {t.name: t for t in reader.tensors},
            {k: f.contents() for k, f in reader.fields.items()})
