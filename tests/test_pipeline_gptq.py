"""`neuqi quantize --gptq` end to end through the real command line and job store."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from helpers import TINY, assert_bitwise_equal, neuqi, one_line_error, output_tensors

from neuqi.formats.loader import load_quantized
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.runner import KILL_AFTER_ENV, quantize
from neuqi.pipeline.store import JobStore
from neuqi.quant.gptq import DAMP
from neuqi.stages.common import h_name
from neuqi.stages.gptq import hessian_name

GPTQ = ["--bits", "3", "--group-size", "16", "--gptq", *TINY]
GROUPS = ("attn_in", "attn_out", "mlp_in", "mlp_out")


@pytest.fixture(scope="module")
def gptq_reference(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("gptq") / "out"
    # --keep-job: a test checks that the full Hessians are deleted as soon as their layer is done
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), *GPTQ, "--keep-job")
    assert r.returncode == 0, r.stderr
    return out, r.stderr


def test_gptq_output_loads_and_runs(gptq_reference: tuple[Path, str], tiny_llama: Path):
    from transformers import AutoModelForCausalLM

    out, log = gptq_reference
    assert "output error" in log
    model = load_quantized(out)
    full = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, ref = model(ids).logits, full(ids).logits
    rel = (logits - ref).norm() / ref.norm()
    assert torch.isfinite(logits).all() and 0 < rel < 0.5
    meta = json.loads((out / "neuqi.json").read_text())
    assert meta["quantization"]["gptq"] == {"act_order": True, "block_size": 128,
                                            "params": QuantizeConfig.gptq_params,
                                            "refit": QuantizeConfig.gptq_refit}


def test_gptq_records_and_cleans_up(gptq_reference: tuple[Path, str]):
    out, _ = gptq_reference
    store = JobStore.open_existing(out.with_name("out.job"))
    solves = store.records("solve")
    assert len(solves) == 3 * 7
    for record in solves.values():
        info = record["info"]
        assert info["damp"] == DAMP and info["output_error"] > 0 and info["loss"] > 0
    # the full Hessians are gone once their layer is solved
    assert not [name for name in store.array_names("layers") if "/H/" in name]


def test_gptq_differs_from_plain_rounding(gptq_reference: tuple[Path, str], tiny_llama: Path,
                                         tmp_path: Path):
    out, _ = gptq_reference
    config = QuantizeConfig(model=str(tiny_llama), out=str(tmp_path / "plain"), bits=3,
                            group_size=16, nsamples=4, seqlen=32, batch_size=3)
    a, b = output_tensors(out), output_tensors(quantize(config, device="cpu"))
    codes = [k for k in a if "proj" in k]
    assert codes and any(not torch.equal(a[k], b[k]) for k in codes)


def test_full_hessian_is_stored_in_row_blocks_and_matches_the_diagonal(
    tiny_llama: Path, tmp_path: Path
):
    out = tmp_path / "out"
    # stop right after `embed` and `hessian/0`: layer 0's Hessians are in the store
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), *GPTQ, env={KILL_AFTER_ENV: "2"})
    assert r.returncode == -9, r.stderr
    store = JobStore.open_existing(out.with_name("out.job"))
    assert store.is_done("hessian/0")
    for group in GROUPS:
        full = store.read_array(hessian_name(0, group))
        h = store.read_array(h_name(0, group)).double()
        assert full.dtype == torch.float32 and full.shape[0] == full.shape[1] == h.shape[0]
        assert torch.allclose(full, full.T)
        assert torch.linalg.eigvalsh(full.double()).min() > -1e-5 * full.diagonal().mean()
        diag = full.diagonal().double()
        assert torch.allclose(diag + DAMP * diag.mean(), h, rtol=1e-5)


def test_gptq_killed_and_resumed_is_bitwise_identical(
    gptq_reference: tuple[Path, str], tiny_llama: Path, tmp_path: Path
):
    out = tmp_path / "out"
    cmd = ["quantize", str(tiny_llama), "--out", str(out), *GPTQ]
    total = 1 + 3 * 8 + 2 + 1
    kills = [2, random.Random(5).randrange(3, total)]  # after the first hessian, then anywhere
    records = 0
    for k in kills:
        r = neuqi(*cmd, env={KILL_AFTER_ENV: str(k - records)})
        assert r.returncode == -9, r.stderr
        records = k
    r = neuqi("resume", str(out.with_name("out.job")), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert_bitwise_equal(out, gptq_reference[0])


@pytest.mark.parametrize("method,params,refit", [("minmax-lazy", "static", False),
                                                 ("neuqi-int", "static", False),
                                                 ("neuqi", "lazy", True)])
def test_other_gptq_methods_run(method: str, params: str, refit: bool, tiny_llama: Path,
                                tmp_path: Path):
    config = QuantizeConfig(model=str(tiny_llama), out=str(tmp_path / "o"), bits=3,
                            group_size=16, method=method, nsamples=4, seqlen=32, batch_size=3,
                            gptq=True, act_order=False, gptq_block_size=8, gptq_params=params,
                            gptq_refit=refit)
    out = quantize(config, device="cpu")
    meta = json.loads((out / "neuqi.json").read_text())
    assert meta["quantization"]["method"] == method
    assert meta["quantization"]["gptq"]["refit"] is refit
    assert torch.isfinite(load_quantized(out)(torch.arange(10).unsqueeze(0)).logits).all()


@pytest.fixture(scope="module")
def lazy_reference(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gptq-lazy") / "out"
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), *GPTQ, "--gptq-params", "lazy")
    assert r.returncode == 0, r.stderr
    return out


def test_lazy_neuqi_gptq_differs_from_static_and_resumes_bitwise(
    lazy_reference: Path, gptq_reference: tuple[Path, str], tiny_llama: Path, tmp_path: Path
):
    meta = json.loads((lazy_reference / "neuqi.json").read_text())
    assert meta["quantization"]["gptq"]["params"] == "lazy"
    static = gptq_reference[0]
    assert json.loads((static / "neuqi.json").read_text())["quantization"]["gptq"]["params"] \
        == QuantizeConfig.gptq_params
    a, b = output_tensors(lazy_reference), output_tensors(static)
    if QuantizeConfig.gptq_params == "static":
        assert any(not torch.equal(a[k], b[k]) for k in a if "proj" in k)
    out = tmp_path / "out"
    cmd = ["quantize", str(tiny_llama), "--out", str(out), *GPTQ, "--gptq-params", "lazy"]
    r = neuqi(*cmd, env={KILL_AFTER_ENV: "6"})  # in layer 0's solves
    assert r.returncode == -9, r.stderr
    # the job is pinned to its --gptq-params: the other one is refused in one line
    line = one_line_error(neuqi(*cmd[:-1], "static"))
    assert "gptq_params" in line
    r = neuqi(*cmd)
    assert r.returncode == 0, r.stderr
    assert_bitwise_equal(out, lazy_reference)


def test_lazy_minmax_without_gptq_is_refused(tiny_llama: Path, tmp_path: Path):
    line = one_line_error(neuqi("quantize", str(tiny_llama), "--out", str(tmp_path / "o"),
                                "--method", "minmax-lazy", *TINY))
    assert "--method minmax-lazy" in line and "--gptq" in line
    assert not (tmp_path / "o.job").exists()


def test_bad_gptq_block_size_is_refused(tiny_llama: Path, tmp_path: Path):
    line = one_line_error(neuqi("quantize", str(tiny_llama), "--out", str(tmp_path / "o"),
                                "--gptq-block-size", "0", *GPTQ))
    assert "--gptq-block-size 0" in line


def test_manifest_round_trips_the_gptq_options_and_reads_old_stores_as_static():
    for config in (QuantizeConfig(model="m", out="o"), QuantizeConfig(model="m", out="o", gptq=True),
                   QuantizeConfig(model="m", out="o", gptq=True, gptq_params="static",
                                  gptq_refit=False)):
        assert QuantizeConfig.from_manifest(config.manifest("f", "c")) == config
    old = QuantizeConfig(model="m", out="o", gptq=True).manifest("f", "c")
    for key in ("gptq_params", "gptq_refit"):  # a store made before the options existed
        old["options"].pop(key, None)
    config = QuantizeConfig.from_manifest(old)
    assert (config.gptq_params, config.gptq_refit) == ("static", False)
