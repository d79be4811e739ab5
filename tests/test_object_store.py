"""A job store on object storage: a real S3 server (moto's, on 127.0.0.1) started by the tests.

Every job here is compared bit for bit with the same job on a local folder; the writer lease,
a killed client, a second client, workers that share nothing but the store, and bad endpoints,
buckets and options are checked against the server itself (nothing of S3 is mocked in-process).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers import neuqi, one_line_error, output_files
from rich.console import Console

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from neuqi.pipeline.config import QuantizeConfig
from neuqi.pipeline.jobinfo import job_status
from neuqi.pipeline.lock import LEASE_ENV
from neuqi.pipeline.plan import make_plan
from neuqi.pipeline.runner import quantize
from neuqi.pipeline.store import JobStore
from neuqi.pipeline.tasks import KILL_AFTER_ENV
from neuqi.util.errors import UserError

OPTIONS = {"bits": 3, "group_size": 16, "nsamples": 5, "seqlen": 32, "batch_size": 2}
CLI_OPTIONS = ["--bits", "3", "--group-size", "16", "--nsamples", "5", "--seqlen", "32",
               "--batch-size", "2", "--device", "cpu"]
# fake credentials: moto accepts any; the secret must never appear in an output, log or object
FAKE_ENV = {"AWS_ACCESS_KEY_ID": "neuqi-test-key", "AWS_SECRET_ACCESS_KEY": "neuqi-test-secret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
SECRET = "s3cr3t-NEUQI-never-shown-0xC0FFEE"
# one BLAS thread everywhere (dask workers' default), so every run rounds alike
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class S3:
    """The running server: its endpoint, storage options, and a boto3 client for the checks."""

    def __init__(self, server: Any, endpoint: str) -> None:
        import boto3

        self.server = server
        self.endpoint = endpoint
        self.options = {"endpoint_url": endpoint}
        self.client = boto3.client("s3", endpoint_url=endpoint)

    def bucket(self, name: str) -> str:
        self.client.create_bucket(Bucket=name)
        return name

    def upload(self, folder: Path, bucket: str, prefix: str) -> str:
        """Every file of ``folder`` under ``prefix``; the folder's URL."""
        for path in folder.iterdir():
            if path.is_file():
                self.client.upload_file(str(path), bucket, f"{prefix}/{path.name}")
        return f"s3://{bucket}/{prefix}"

    def objects(self, bucket: str) -> dict[str, bytes]:
        keys = [o["Key"] for page in self.client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket) for o in page.get("Contents", [])]
        return {k: self.client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    saved = {k: os.environ.get(k) for k in FAKE_ENV}
    os.environ.update(FAKE_ENV)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    try:
        yield S3(server, f"http://{host}:{port}")
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def run(model: Path | str, out: Path, job: str | None,
        storage_options: dict[str, Any] | None = None, scheduler: str | None = None,
        keep_job: bool = False, **options: Any) -> Path:
    config = QuantizeConfig(model=str(model), out=str(out), **{**OPTIONS, **options})
    with one_thread():
        return quantize(config, job, "cpu", Console(stderr=True, quiet=True), scheduler,
                        keep_job=keep_job, storage_options=storage_options)


@pytest.fixture(scope="module")
def reference(tiny_llama: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """The job on a local folder, in this process."""
    folder = tmp_path_factory.mktemp("ref")
    return output_files(run(tiny_llama, folder / "out", str(folder / "job")))


def test_s3_job_is_bitwise_the_local_one(
    s3: S3, tiny_llama: Path, tmp_path: Path, reference: dict[str, bytes]
) -> None:
    """Kept (--keep-job), so that the bucket's objects are held against `neuqi plan`'s count."""
    bucket = s3.bucket("single")
    url = f"s3://{bucket}/jobs/tiny"
    out = run(tiny_llama, tmp_path / "out", url, s3.options, keep_job=True)
    assert output_files(out) == reference
    objects = s3.objects(bucket)
    keys = set(objects)
    # the plan's objects: exact (one object a chunk, a zarr.json an array, one a record); its
    # bytes within 2 %: the zarr.json and record sizes are estimates (RECORD_BYTES, ...)
    config = QuantizeConfig(model=str(tiny_llama), out="-", **OPTIONS)
    cost = make_plan(config, "cpu", with_probe=False).store
    assert cost is not None
    assert cost.objects_kept == len(objects)
    stored = sum(len(v) for v in objects.values())
    assert abs(cost.bytes_kept - stored) <= 0.02 * stored, (cost.bytes_kept, stored)
    assert cost.objects_written > cost.objects_peak > cost.objects_kept
    assert "jobs/tiny/zarr.json" in keys and "jobs/tiny/done/pack.json" in keys
    assert not any(k.startswith("jobs/tiny/arrays/") and k.endswith("/c/0/0/0") for k in keys)
    assert "jobs/tiny/LOCK" not in keys  # released
    info = job_status(url, s3.options)
    assert info["complete"] and info["done"] == info["total"] and info["job"] == url
    assert not list(tmp_path.glob("*.job"))  # nothing of the job on this disk


def _age(s3: S3, bucket: str, key: str) -> float:
    """Seconds since ``key`` was last written, by the server's clock."""
    from email.utils import parsedate_to_datetime

    head = s3.client.head_object(Bucket=bucket, Key=key)
    date = parsedate_to_datetime(head["ResponseMetadata"]["HTTPHeaders"]["date"])
    return (date - head["LastModified"]).total_seconds()


def test_lease_refuses_a_live_holder_takes_over_a_stale_one_and_is_renewed(
    s3: S3, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rule: a lease not rewritten for its lease_s (server time) is stale and taken over with
    a conditional PUT; its holder renews it every lease_s / 3 and stops writing once it lost it."""
    bucket = s3.bucket("lease")
    url = f"s3://{bucket}/job"
    store = JobStore.create_or_open(url, {"m": 1}, s3.options)
    foreign = {"pid": 4242, "host": "elsewhere", "started": "then", "lease_s": 2}
    s3.client.put_object(Bucket=bucket, Key="job/LOCK", Body=json.dumps(foreign).encode())
    with pytest.raises(UserError, match="in use by process 4242 on elsewhere") as err:
        store.acquire_lock()
    assert "\n" not in str(err.value)
    assert job_status(url, s3.options)["lock"]["host"] == "elsewhere"
    time.sleep(3.2)  # Last-Modified has whole seconds
    monkeypatch.setenv(LEASE_ENV, "1.5")
    store.acquire_lock()  # stale: taken over
    assert json.loads(s3.client.get_object(Bucket=bucket, Key="job/LOCK")["Body"].read())[
        "pid"] == os.getpid()
    time.sleep(2.5)
    assert _age(s3, bucket, "job/LOCK") <= 1.5  # renewed while held
    other = JobStore.open_existing(url, s3.options)
    with pytest.raises(UserError, match=f"in use by process {os.getpid()}"):
        other.acquire_lock()  # never two writers, even in one process
    # someone else takes the lease (as a client would after a stall): this holder stops writing
    s3.client.put_object(Bucket=bucket, Key="job/LOCK", Body=json.dumps(foreign).encode())
    time.sleep(1.2)
    with pytest.raises(UserError, match="stopped writing because another process took"):
        store.mark_done("embed")
    store.release_lock()
    assert not store.is_done("embed")
    assert json.loads(s3.client.get_object(Bucket=bucket, Key="job/LOCK")["Body"].read()) == foreign


def _cli_job(tiny_llama: Path, out: Path, url: str, options: dict[str, Any]) -> list[str]:
    return ["quantize", str(tiny_llama), "--out", str(out), "--job", url, *CLI_OPTIONS,
            "--storage-options", json.dumps(options)]


def test_killed_client_is_resumed_bitwise_and_a_second_client_is_refused(
    s3: S3, tiny_llama: Path, tmp_path: Path, reference: dict[str, bytes]
) -> None:
    bucket = s3.bucket("killed")
    url = f"s3://{bucket}/jobs/tiny"
    options = {**s3.options, "key": "neuqi-option-key", "secret": SECRET}
    args = _cli_job(tiny_llama, tmp_path / "out", url, options)
    killed = neuqi(*args, env={**ONE_THREAD, KILL_AFTER_ENV: "6"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    status = neuqi("status", url, "--json", "--storage-options", json.dumps(options))
    info = json.loads(status.stdout)
    assert 0 < info["done"] < info["total"] and not info["complete"]
    assert info["lock"] is None  # its process is gone: the lease is stale at once on this host
    holder = JobStore.open_existing(url, options)
    holder.acquire_lock()
    try:
        refused = neuqi(*args, env=ONE_THREAD)
        line = one_line_error(refused)
        assert f"is in use by process {os.getpid()} on {socket.gethostname()}" in line
        assert url in line
    finally:
        holder.release_lock()
    done = neuqi(*args, env=ONE_THREAD)
    assert done.returncode == 0, done.stderr
    assert "resuming job" in done.stderr
    assert output_files(tmp_path / "out") == reference
    again = neuqi("resume", url, "--storage-options", json.dumps(options))  # `neuqi resume URL`
    assert again.returncode == 0 and "is complete" in again.stderr, again.stderr
    # the secret given in --storage-options is nowhere: outputs, logs, the store, the output
    texts = [r.stdout + r.stderr for r in (killed, status, refused, done, again)]
    stored = list(s3.objects(bucket).values()) + [
        p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert "done/pack.json" in " ".join(s3.objects(bucket))
    assert not any(SECRET in t for t in texts)
    assert not any(SECRET.encode() in data for data in stored)


def test_bad_endpoint_bucket_and_options_are_one_line_before_any_work(
    s3: S3, tiny_llama: Path, tmp_path: Path
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    out = tmp_path / "out"
    cases = [
        (_cli_job(tiny_llama, out, "s3://no-such-bucket/job", s3.options),
         "the bucket does not exist"),
        (_cli_job(tiny_llama, out, "s3://any/job", {"endpoint_url": f"http://127.0.0.1:{closed}"}),
         "cannot reach the object store"),
        (["status", "s3://no-such-bucket/job", "--storage-options", json.dumps(s3.options)],
         "the bucket does not exist"),
        (["resume", "s3://any/job", "--storage-options", "{endpoint_url: x}"],
         "--storage-options: not valid JSON"),
        (["quantize", str(tiny_llama), "--out", str(out), "--job", "nosuchproto://b/j"],
         "no filesystem for nosuchproto://"),
        (["quantize", "s3://no-such-bucket/model", "--out", str(out), "--storage-options",
          json.dumps(s3.options)], "MODEL s3://no-such-bucket/model: cannot read it"),
    ]
    for args, want in cases:
        started = time.perf_counter()
        line = one_line_error(neuqi(*args))
        assert want in line, line
        assert time.perf_counter() - started < 60
    assert not out.exists()


def _same_but_the_source_path(files: dict[str, bytes], source: str) -> dict[str, bytes]:
    """``files`` (of :func:`output_files`) with neuqi.json's source path checked and left out."""
    meta = json.loads(files["neuqi.json"])
    assert meta["source"].pop("path") == source
    return {**files, "neuqi.json": json.dumps(meta, sort_keys=True).encode()}


def test_workers_sharing_nothing_but_the_bucket(
    s3: S3, tiny_llama: Path, tmp_path: Path, reference: dict[str, bytes]
) -> None:
    """Two `dask worker` processes, each started in its own empty folder, with no path of this
    process's disk: MODEL and the job store are on S3 (the workers read the model's tensors by
    byte ranges from the bucket), the output is packed here. Bitwise the local job's output,
    the source's fingerprint (samples of every tensor's bytes) included."""
    import distributed

    bucket = s3.bucket("workers")
    url = f"s3://{bucket}/job"
    model = s3.upload(tiny_llama, bucket, "models/tiny")
    env = {**os.environ, **ONE_THREAD}
    with distributed.LocalCluster(n_workers=0, processes=False, dashboard_address=None,
                                  protocol="tcp", host="127.0.0.1") as cluster:
        homes = [tmp_path / f"worker{i}" for i in range(2)]
        procs = []
        for home in homes:
            home.mkdir()
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
                 "--nthreads", "1", "--no-nanny", "--no-dashboard",
                 "--local-directory", str(home / "scratch")],
                cwd=home, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        try:
            with distributed.Client(cluster) as client:
                client.wait_for_workers(2, timeout=90)
                cwds = set(client.run(os.getcwd).values())
                assert cwds == {str(h) for h in homes}
            out = run(model, tmp_path / "out", url, s3.options,
                      scheduler=cluster.scheduler_address)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=60)
    assert _same_but_the_source_path(output_files(out), model) == _same_but_the_source_path(
        reference, str(tiny_llama))
    for home in homes:  # nothing written beside the workers' own scratch
        assert {p.name for p in home.iterdir()} <= {"scratch"}
    records = JobStore.open_existing(url, s3.options).records()
    assert len([k for k in records if k.startswith("solve/")]) == 3 * 7


@pytest.mark.slow
def test_server_stopped_mid_job_is_one_line_and_the_rerun_is_bitwise(
    s3: S3, tiny_llama: Path, tmp_path: Path, reference: dict[str, bytes]
) -> None:
    """A second server of this process (moto keeps its buckets in the process, so a server
    started again on the same port serves the same objects)."""
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    options = {"endpoint_url": f"http://{host}:{port}"}
    bucket = s3.bucket("stopped")
    args = [sys.executable, "-c", "from neuqi.cli import main; main()",
            *_cli_job(tiny_llama, tmp_path / "out", f"s3://{bucket}/job", options)]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD})
    try:
        while len([k for k in s3.objects(bucket) if k.startswith("job/done/")]) < 4:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.2)
        server.stop()
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "cannot reach the object store" in errors[0], stderr
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        rerun = neuqi(*args[3:], env=ONE_THREAD)
    finally:
        server.stop()
    assert rerun.returncode == 0, rerun.stderr
    assert output_files(tmp_path / "out") == reference


def test_denied_credentials_are_one_line_before_any_work(tiny_llama: Path, tmp_path: Path) -> None:
    """A second S3 server that checks credentials (moto with authentication on from its first
    request): a key it does not know is refused in one line naming the job store, exit 2, and
    the key's secret is not in it."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, **FAKE_ENV, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:  # until it listens
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert server.poll() is None and time.monotonic() < deadline, "moto did not start"
            time.sleep(0.2)
        options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "AKIAUNKNOWN000000000",
                   "secret": SECRET}
        out = tmp_path / "out"
        r = neuqi(*_cli_job(tiny_llama, out, "s3://bucket/job", options), env=FAKE_ENV)
        line = one_line_error(r)
        assert "s3://bucket/job: access denied" in line, line
        assert SECRET not in r.stdout + r.stderr
        assert not out.exists()
    finally:
        server.terminate()
        server.wait(timeout=30)
