"""Light distillation of scales and zero-points: the training code, the block-wise stage of the
pipeline and the end-to-end `neuqi distill` command, on tiny real checkpoints, through the CLI."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import TINY, assert_bitwise_equal, neuqi, output_tensors

from neuqi.formats.loader import NeuqiOutput, load_quantized
from neuqi.pipeline.distill_e2e import KILL_AFTER_STEPS_ENV
from neuqi.pipeline.runner import KILL_AFTER_ENV
from neuqi.pipeline.store import JobStore
from neuqi.quant.distill import DistillSettings, QuantLinear, Trainer, lr_at, sample_index
from neuqi.quant.packing import unpack_codes
from neuqi.quant.solver import quantize_tensor
from neuqi.stages.common import distilled_name, q_name

QUANT = ["--bits", "2", "--group-size", "16", *TINY]
BLOCKWISE = ["--distill-steps", "12", "--distill-lr", "1e-3", "--distill-norms"]
E2E = ["--steps", "10", "--lr", "1e-3", "--nsamples", "4", "--seqlen", "32", "--save-every",
       "3", "--norms", "--batch-size", "3", "--device", "cpu"]
LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


# ---------------------------------------------------------------------------------- training code
def test_schedule_warms_up_then_decays_to_zero():
    s = DistillSettings(steps=50, lr=3e-4)
    lrs = [lr_at(k, s) for k in range(50)]
    warm = 5  # 10% of 50
    assert all(a < b for a, b in pairwise(lrs[:warm]))
    assert lrs[warm - 1] == pytest.approx(3e-4) and lrs[warm] == pytest.approx(3e-4)
    assert all(a >= b for a, b in pairwise(lrs[warm:]))
    assert 0 < lrs[-1] < 1e-5


def test_sample_order_is_a_permutation_per_epoch():
    order = [sample_index(k, 7, seed=3) for k in range(21)]
    for epoch in range(3):
        assert sorted(order[7 * epoch: 7 * epoch + 7]) == list(range(7))
    assert order != [sample_index(k, 7, seed=4) for k in range(21)]


def _toy_problem(seed: int = 0) -> tuple[QuantLinear, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(24, 32, generator=g) / 32**0.5
    x = torch.randn(6, 10, 32, generator=g) * (1 + torch.arange(32) / 8)  # uneven channels
    q = quantize_tensor(weight, x.pow(2).mean((0, 1)), bits=2, group_size=16, method="neuqi",
                        device=torch.device("cpu"))
    return QuantLinear(q.codes, q.scale, q.zero_point, 16), x, x @ weight.T, q.codes.clone()


def _trainer(module: QuantLinear, x: torch.Tensor, y: torch.Tensor, steps: int) -> Trainer:
    params = {"scale": module.scale, "zero_point": module.zero_point}
    return Trainer(params, DistillSettings(steps=steps, lr=1e-2), x.shape[0],
                   lambda j: F.mse_loss(module(x[j:j + 1]), y[j:j + 1]))


def test_training_lowers_the_loss_and_keeps_the_codes():
    module, x, y, codes = _toy_problem()
    with torch.no_grad():
        before = F.mse_loss(module(x), y).item()
    _trainer(module, x, y, 60).train()
    with torch.no_grad():
        after = F.mse_loss(module(x), y).item()
    assert after < 0.97 * before
    assert torch.equal(module.codes, codes) and module.codes.dtype == torch.uint8


def test_interrupted_and_resumed_training_gives_the_same_parameters():
    full, x, y, _ = _toy_problem()
    _trainer(full, x, y, 20).train()

    part, _, _, _ = _toy_problem()
    first = _trainer(part, x, y, 20)
    first.train(until=7)
    saved, step = first.state(), first.step

    resumed, _, _, _ = _toy_problem()  # a fresh process: the solved parameters again
    second = _trainer(resumed, x, y, 20)
    second.load_state(saved, step)
    second.train()
    assert torch.equal(resumed.scale, full.scale)
    assert torch.equal(resumed.zero_point, full.zero_point)


# ---------------------------------------------------------------------------------- block-wise
@pytest.fixture(scope="module")
def blockwise(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("blockwise") / "out"
    # --keep-job: the tests read the solved and distilled parameters from the job store
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), *QUANT, *BLOCKWISE, "--keep-job")
    assert r.returncode == 0, r.stderr
    return out


def test_blockwise_distillation_lowers_each_layers_loss(blockwise: Path):
    store = JobStore.open_existing(blockwise.with_name("out.job"))
    for i in range(3):
        info = store.record(f"distill/{i}")["info"]
        assert info["mse_after"] < info["mse_before"], (i, info)
        assert set(info["norms"]) == {"input_layernorm.weight", "post_attention_layernorm.weight"}
    meta = json.loads((blockwise / "neuqi.json").read_text())
    assert meta["quant_info"]["distill"]["steps"] == 12


def test_blockwise_output_has_the_solved_codes_and_the_distilled_scales(
    blockwise: Path, tiny_llama: Path
):
    store = JobStore.open_existing(blockwise.with_name("out.job"))
    out = NeuqiOutput.open(blockwise)
    for i in range(3):
        for lin in LINEARS:
            name = f"model.layers.{i}.{lin}.weight"
            info = out.quantized[name]
            codes = unpack_codes(out.read(info["qweight"]), 2, info["in_features"])
            assert torch.equal(codes, store.read_array(q_name(i, lin, "codes")))
            scale = out.read(info["scales"])
            assert torch.equal(scale, store.read_array(distilled_name(i, lin, "scale")))
            assert not torch.equal(scale, store.read_array(q_name(i, lin, "scale")))
    # distilled norms are in the output, not the checkpoint's
    from safetensors.torch import load_file

    original = load_file(tiny_llama / "model.safetensors")["model.layers.0.input_layernorm.weight"]
    assert not torch.equal(out.read("model.layers.0.input_layernorm.weight"), original)


def test_blockwise_output_loads_and_runs(blockwise: Path):
    model = load_quantized(blockwise)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_blockwise_status_counts_the_distill_stage(blockwise: Path):
    r = neuqi("status", str(blockwise.with_name("out.job")), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["stages"]["distill"] == {"done": 3, "total": 3}
    assert info["complete"]
    # both activation streams are deleted once used
    job = blockwise.with_name("out.job") / "arrays"
    assert not any(job.glob("acts*/*/zarr.json"))


def test_blockwise_killed_and_resumed_is_bitwise_identical(
    blockwise: Path, tiny_llama: Path, tmp_path: Path
):
    out = tmp_path / "out"
    cmd = ["quantize", str(tiny_llama), "--out", str(out), *QUANT, *BLOCKWISE]
    # records of layer 0: embed, hessian, 7 solves, forward_fp (10), distill (11), forward (12)
    # kills: after forward_fp/0, after forward_fp/1, then in layer 2's solves
    for after in (10, 11, 9):
        r = neuqi(*cmd, env={KILL_AFTER_ENV: str(after)})
        assert r.returncode == -9, r.stderr
    r = neuqi("resume", str(out.with_name("out.job")), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert_bitwise_equal(out, blockwise)


def test_bad_distill_options_are_one_line_errors(tiny_llama: Path, tmp_path: Path):
    r = neuqi("quantize", str(tiny_llama), "--out", str(tmp_path / "o"), *QUANT,
              "--distill-steps", "-1")
    assert r.returncode == 2
    assert "--distill-steps -1" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def plain(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plain") / "out"
    r = neuqi("quantize", str(tiny_llama), "--out", str(out), *QUANT)
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def e2e(plain: Path, tiny_llama: Path) -> Path:
    out = plain.with_name("e2e")
    r = neuqi("distill", str(plain), "--teacher", str(tiny_llama), "--out", str(out), *E2E)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    return out


def test_e2e_lowers_the_loss_and_keeps_the_codes(e2e: Path, plain: Path):
    info = json.loads((e2e / "neuqi.json").read_text())["quant_info"]
    assert info["bits"] == 2 and info["distill"]["mode"] == "end-to-end"
    assert info["distill"]["mse_after"] < info["distill"]["mse_before"]
    before, after = output_tensors(plain), output_tensors(e2e)
    assert before.keys() == after.keys()
    for name in before:
        if name.endswith(".qweight"):
            assert torch.equal(before[name], after[name]), name
        if name.endswith(".scales"):
            assert not torch.equal(before[name], after[name]), name
    assert not torch.equal(before["model.norm.weight"], after["model.norm.weight"])  # --norms


def test_e2e_killed_and_resumed_is_bitwise_identical(e2e: Path, plain: Path, tiny_llama: Path,
                                                      tmp_path: Path):
    out = tmp_path / "e2e"
    cmd = ["distill", str(plain), "--teacher", str(tiny_llama), "--out", str(out), *E2E]
    r = neuqi(*cmd, env={KILL_AFTER_STEPS_ENV: "5"})  # saved at step 3, killed after step 5
    assert r.returncode == -9, r.stderr
    assert not out.exists()
    r = neuqi(*cmd, env={KILL_AFTER_STEPS_ENV: "4"})  # from 3: saved at 6, killed after 7
    assert r.returncode == -9, r.stderr
    assert "from step 3" in r.stderr
    r = neuqi(*cmd)
    assert r.returncode == 0, r.stderr
    assert "from step 6" in r.stderr
    assert_bitwise_equal(out, e2e)


def test_e2e_refuses_a_teacher_that_does_not_match(plain: Path, tiny_qwen3: Path,
                                                   tmp_path: Path):
    r = neuqi("distill", str(plain), "--teacher", str(tiny_qwen3), "--out", str(tmp_path / "d"),
              *E2E)
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert "--teacher" in line and "Traceback" not in r.stderr


def test_e2e_refuses_a_folder_that_is_not_an_output(tiny_llama: Path, tmp_path: Path):
    r = neuqi("distill", str(tiny_llama), "--teacher", str(tiny_llama), "--out",
              str(tmp_path / "d"), *E2E)
    assert r.returncode == 2
    assert "not a neuqi output" in r.stderr and "Traceback" not in r.stderr


def test_manifest_names_distillation_only_when_it_is_on():
    from neuqi.pipeline.config import QuantizeConfig

    plain = QuantizeConfig(model="m", out="o")
    assert not any(k.startswith("distill") for k in plain.manifest("f", "c")["options"])
    assert QuantizeConfig.from_manifest(plain.manifest("f", "c")) == plain
    on = QuantizeConfig(model="m", out="o", distill_steps=5, distill_norms=True)
    assert on.manifest("f", "c")["options"]["distill_steps"] == 5
    assert QuantizeConfig.from_manifest(on.manifest("f", "c")) == on


def test_resume_of_a_distill_job_store_says_what_to_do(e2e: Path):
    r = neuqi("resume", str(e2e.with_name("e2e.job")), "--device", "cpu")
    assert r.returncode == 2
    assert "neuqi distill" in r.stderr and "Traceback" not in r.stderr
