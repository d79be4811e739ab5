"""`neuqi plan` of published mixture-of-experts models from their config.json alone
(tests/data/configs: Mixtral-8x7B, Qwen3-30B-A3B, DeepSeek-V3), on a 24 GB GPU (20 GiB)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from neuqi.model.synthetic import build_from_config, tiny_moe_config
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.plan import GiB, make_plan, read_shape
from neuqi.pipeline.shapes import tensors_from_config

CONFIGS = Path(__file__).parent / "data" / "configs"


@pytest.mark.parametrize(("name", "experts", "streamed"), [
    ("mixtral-8x7b", 8, False), ("qwen3-30b-a3b", 128, False), ("deepseek-v3", 256, True)])
def test_published_moe_models_fit_a_24gb_gpu(name: str, experts: int, streamed: bool) -> None:
    folder = CONFIGS / name
    shape = read_shape(str(folder))
    assert sum(".experts." in n for n, _, _ in shape.linears) == 3 * experts  # the largest layer
    config = QuantizeConfig(model=str(folder), out="/nonexistent")
    plan = make_plan(config, "cuda", budget=20 * GiB, with_probe=False)
    assert plan.fits and plan.device_peak <= 20 * GiB
    # DeepSeek-V3's MoE layer (23 GB in bf16, 46 GB in float32) cannot be held whole: its
    # linears, expert projections included, are brought to the device one at a time
    assert plan.knobs.linear_at_a_time is streamed
    assert plan.layers == json.loads((folder / "config.json").read_text())["num_hidden_layers"]


def test_deepseek_v3_plan_reads_fp8_weights() -> None:
    shape = read_shape(str(CONFIGS / "deepseek-v3"))
    assert shape.weight_bytes == 1  # F8_E4M3
    assert 22e9 < 2 * shape.layer_params < 24e9  # ~22 GB of bf16 per MoE layer (the issue's)


def test_shapes_from_config_are_the_checkpoints(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    """The table planned from config.json alone is the header of a checkpoint of that config."""
    from safetensors import safe_open

    folder = build_from_config(tmp_path / "ds", tiny_moe_config("deepseek_v3", layers=2),
                               tokenizer_dir=tiny_tokenizer_dir, fp8_block=8)
    config = json.loads((folder / "config.json").read_text())
    planned = tensors_from_config(config, str(folder))
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        stored = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    assert {k: v["shape"] for k, v in planned.items()} == stored
    assert planned["model.layers.1.mlp.experts.3.down_proj.weight"]["dtype"] == "F8_E4M3"
