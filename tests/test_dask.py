"""Running a job's tasks on a real dask.distributed LocalCluster (worker processes, CPU)."""

from __future__ import annotations

import os
from pathlib import Path

import distributed
import pytest
import torch
from helpers import local_cluster, neuqi, one_line_error, output_files
from rich.console import Console

from neuqi.model.checkpoint import Checkpoint
from neuqi.model.layers import build_layer, build_rotary
from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.executor import check_scheduler, open_executor
from neuqi.pipeline.runner import quantize
from neuqi.pipeline.store import JobStore
from neuqi.pipeline.tasks import KILL_AFTER_ENV, KILL_ONCE_ENV, split
from neuqi.stages.common import acts_name, h_name
from neuqi.stages.hessian import batch_starts, batch_sums, write_hessian
from neuqi.util.errors import UserError

OPTIONS = {"bits": 3, "group_size": 16, "nsamples": 5, "seqlen": 32, "batch_size": 2}


def run(model: Path, out: Path, scheduler: str | None, keep_job: bool = False,
        **options: object) -> Path:
    config = QuantizeConfig(model=str(model), out=str(out), **{**OPTIONS, **options})
    return quantize(config, None, "cpu", Console(stderr=True, quiet=True), scheduler, keep_job)


def in_process(model: Path, folder: Path, **options: object) -> dict[str, bytes]:
    # dask workers compute with one BLAS thread (distributed's default environment for them), so
    # the reference does too: float32 matmuls may round differently on another thread count
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return output_files(run(model, folder / "out", None, **options))
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    return in_process(tiny_llama, tmp_path_factory.mktemp("ref"))


@pytest.fixture(scope="module")
def reference_no_sequential(
    tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, bytes]:
    return in_process(tiny_llama, tmp_path_factory.mktemp("ref-noseq"), sequential=False)


def test_local_cluster_output_is_bitwise_the_in_process_one(
    tiny_llama: Path, tmp_path: Path, reference: dict[str, bytes]
):
    out = run(tiny_llama, tmp_path / "out", "local:2")
    assert output_files(out) == reference
    records = JobStore.open_existing(tmp_path / "out.job").records()
    assert len([k for k in records if k.startswith("solve/")]) == 3 * 7


def test_killed_worker_mid_run_still_gives_the_identical_result(
    tiny_llama: Path, tmp_path: Path, reference_no_sequential: dict[str, bytes]
):
    """One worker process SIGKILLs itself while writing its 4th completion record (data written,
    record not); dask re-runs its task elsewhere and the nanny starts a new worker. Without
    sequential quantization the solves also overlap the later layers' calibration here."""
    marker = tmp_path / "killed"
    env = {KILL_AFTER_ENV: "4", KILL_ONCE_ENV: str(marker)}
    with (
        local_cluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit=None,
                      env=env) as cluster,
        distributed.Client(cluster) as client,
    ):
        pids = set(client.run(os.getpid).values())
        assert len(pids) == 2
        out = run(tiny_llama, tmp_path / "out", cluster.scheduler_address, sequential=False)
        assert marker.exists()  # the kill happened
        alive = set(client.run(os.getpid).values())
    assert len(pids - alive) == 1  # exactly one of the original workers died
    assert output_files(out) == reference_no_sequential


def test_hessian_does_not_depend_on_how_the_batches_are_split(tiny_llama: Path, tmp_path: Path):
    run(tiny_llama, tmp_path / "out", None, keep_job=True)  # its Hessians stay in the store
    store = JobStore.open_existing(tmp_path / "out.job")
    ckpt = Checkpoint.open(tiny_llama)
    names = [h_name(0, group) for group, _ in ckpt.arch.linear_groups]
    job_h = [store.read_array(name) for name in names]  # computed in one run of batches
    # acts/0 is deleted when layer 0 is done: recompute it the way the job did
    from neuqi.data.calib import calibration_windows, load_calibration_text
    from neuqi.model.checkpoint import load_tokenizer
    from neuqi.stages.embed import run_embed

    windows = calibration_windows(load_tokenizer(ckpt.path), load_calibration_text(None),
                                  OPTIONS["nsamples"], OPTIONS["seqlen"], 0)
    run_embed(store, ckpt, windows, torch.float32, OPTIONS["batch_size"], torch.device("cpu"))
    layer = build_layer(ckpt, 0, "cpu", torch.float32)
    rotary = build_rotary(ckpt.config, "cpu")
    starts = batch_starts(store.array_shape(acts_name(0))[0], OPTIONS["batch_size"])
    assert starts == [0, 2, 4]
    h = {}
    for parts in (1, 2, 3):
        runs = split(starts, parts)
        assert [s for r in runs for s in r] == starts and len(runs) == parts
        sums = [s for r in runs for s in batch_sums(store, 0, layer, ckpt.arch, rotary,
                                                      OPTIONS["batch_size"], "cpu", r)]
        assert write_hessian(store, 0, ckpt.arch, sums) == names
        h[parts] = [store.read_array(name) for name in names]
    for parts in (1, 2, 3):
        assert all(torch.equal(a, b) for a, b in zip(job_h, h[parts], strict=True))


@pytest.mark.parametrize("scheduler", ["local:0", "lokal", "local:x", "8786"])
def test_bad_scheduler_is_a_user_error(scheduler: str):
    with pytest.raises(UserError, match="--scheduler"):
        check_scheduler(scheduler)


def test_cuda_on_a_cluster_without_gpu_workers_is_refused():
    with (
        local_cluster(n_workers=1, threads_per_worker=1, processes=False) as cluster,
        pytest.raises(UserError, match="--resources GPU=1"),
    ):
        open_executor(cluster.scheduler_address, "cuda")


def test_cli_refuses_a_bad_scheduler_in_one_line(tiny_llama: Path, tmp_path: Path):
    line = one_line_error(neuqi("quantize", str(tiny_llama), "--out", str(tmp_path / "out"),
                                "--device", "cpu", "--scheduler", "lokal:2"))
    assert "--scheduler lokal:2" in line
    assert not (tmp_path / "out.job").exists()
