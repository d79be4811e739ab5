"""The job store on a local folder and on S3: time, objects, bytes and requests, measured and
planned (issue 32).

    python benchmarks/object_store.py [--nsamples 16 --seqlen 512]

Starts an S3 server (moto's, on 127.0.0.1) in this process, then runs the demo model's job
(``neuqi quantize smollm2 --bits 4 --group-size 64 --method minmax``, one BLAS thread) twice as a
separate process: once with ``--job`` a local folder, once with ``--job s3://BUCKET/job``, both
with ``--keep-job``, so that the store's files and objects are counted at the end. The server
counts every request it answers (by its log, by method; a LIST is a GET with ``list-type``).
Beside them: what ``neuqi plan`` says of the same job, and of Llama-3.1-70B (a synthetic checkpoint
whose shards are holes behind real headers, :func:`neuqi.model.synthetic.build_checkpoint`) with
the default calibration of 128 x 2048 tokens. The table is saved as the record ``object-store``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import records

FAKE_ENV = {"AWS_ACCESS_KEY_ID": "bench-key", "AWS_SECRET_ACCESS_KEY": "bench-secret",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Requests(logging.Handler):
    """Counts the requests the moto server logs (werkzeug's access log), by kind."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        for method in ("PUT", "GET", "HEAD", "DELETE", "POST"):
            if f'"{method} ' in text:
                line = text.split(f'"{method} ', 1)[1].split(" ", 1)[0]
                kind = "LIST" if method == "GET" and "list-type" in line else method
                self.counts[kind] += 1
                return


def neuqi(*args: str, env: dict[str, str] | None = None) -> tuple[float, str]:
    started = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", "from neuqi.cli import main; main()", *args],
                       capture_output=True, text=True, env={**os.environ, **(env or {})},
                       check=False)
    if r.returncode != 0:
        raise SystemExit(f"neuqi {' '.join(args[:2])} failed:\n{r.stderr[-3000:]}")
    return time.perf_counter() - started, r.stdout


def outputs(out: Path) -> dict[str, bytes]:
    """Every file of an output folder; neuqi.json without its creation time."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "neuqi.json":
            meta = json.loads(data)
            meta["created"].pop("time", None)
            data = json.dumps(meta, sort_keys=True).encode()
        files[path.relative_to(out).as_posix()] = data
    return files


def mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    args = ap.parse_args()
    os.environ.update(FAKE_ENV)
    import boto3
    from moto.server import ThreadedMotoServer

    job = ["--bits", "4", "--group-size", "64", "--nsamples", str(args.nsamples), "--seqlen",
           str(args.seqlen), "--method", "minmax", "--device", "cpu"]
    started = records.now()
    where = records.machine()
    rows = []
    with tempfile.TemporaryDirectory(prefix="neuqi-object-store-") as tmp:
        work = Path(tmp)
        wall, _ = neuqi("quantize", "smollm2", "--out", str(work / "out-local"), "--job",
                        str(work / "job"), "--keep-job", *job, env=ONE_THREAD)
        files = [p for p in (work / "job").rglob("*") if p.is_file()]
        rows.append(["smollm2, --job FOLDER --keep-job", f"{wall:.0f} s",
                     f"{len(files)} files", mib(sum(p.stat().st_size for p in files)), "-"])
        print(rows[-1], flush=True)

        requests = Requests()
        logging.getLogger("werkzeug").addHandler(requests)
        logging.getLogger("werkzeug").setLevel(logging.INFO)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket="bench")
            requests.counts.clear()
            wall, _ = neuqi("quantize", "smollm2", "--out", str(work / "out-s3"), "--job",
                            "s3://bench/job", "--keep-job", *job, "--storage-options",
                            json.dumps({"endpoint_url": endpoint}), env=ONE_THREAD)
            counted = dict(requests.counts)
            objects = [o for page in client.get_paginator("list_objects_v2").paginate(
                Bucket="bench") for o in page.get("Contents", [])]
        finally:
            server.stop()
        same = outputs(work / "out-local") == outputs(work / "out-s3")
        rows.append([(f"smollm2, --job s3://... --keep-job (moto on 127.0.0.1; output "
                     f"{'bitwise' if same else 'NOT'} the local one's)"), f"{wall:.0f} s",
                     f"{len(objects)} objects", mib(sum(o['Size'] for o in objects)),
                     ", ".join(f"{n} {k}" for k, n in sorted(counted.items()))])
        print(rows[-1], flush=True)

        _, out = neuqi("plan", "smollm2", *job, "--no-probe", "--json")
        cost = json.loads(out)["store"]
        layers = json.loads(out)["layers"]
        req = cost["requests_per_layer"]
        rows.append(["smollm2, planned (`neuqi plan`, same options)", "-",
                     (f"{cost['objects_kept']} kept ({cost['objects_written']} written, "
                     f"{cost['objects_peak']} at most)"), mib(cost["bytes_kept"]),
                     ", ".join(f"{n * layers} {k}" for k, n in req.items()) + " (per layer x "
                     f"{layers})"])
        print(rows[-1], flush=True)

        from neuqi.model.synthetic import FULL_MODELS, SHAPES, build_checkpoint

        n_layers, vocab = FULL_MODELS["llama-3.1-70b"]
        import dataclasses

        folder = work / "llama-3.1-70b"
        build_checkpoint(folder, dataclasses.replace(SHAPES["llama-3.1-70b"], vocab=vocab),
                         n_layers, sparse=True)
        _, out = neuqi("plan", str(folder), "--bits", "4", "--group-size", "128", "--device",
                       "cpu", "--no-probe", "--json")
        cost = json.loads(out)["store"]
        req = cost["requests_per_layer"]
        rows.append(["Llama-3.1-70B, planned (4 bits, group 128, 128 x 2048 tokens)", "-",
                     (f"{cost['objects_kept']} kept ({cost['objects_written']} written, "
                     f"{cost['objects_peak']} at most)"),
                     (f"{mib(cost['bytes_kept'])} kept ({mib(cost['bytes_written'])} written, "
                     f"{mib(cost['bytes_peak'])} at most)"),
                     ", ".join(f"{n} {k}" for k, n in req.items()) + " per layer"])
        print(rows[-1], flush=True)
    path = records.save(
        "object-store",
        "The job store on a local folder and on S3 (moto's server on this machine): the demo "
        f"job measured (--bits 4 --group-size 64 --method minmax, {args.nsamples} x "
        f"{args.seqlen} tokens, one BLAS thread), and planned",
        ["job", "wall time", "objects (files)", "bytes", "requests"], rows, records.command(),
        "The S3 server runs on the same machine as the job, so the time says what the requests "
        "cost in processing, not in network latency. A local store also holds a zarr.json per "
        "folder (group) and the lock's guard file; the plan counts arrays' objects, records and "
        "the root. Planned requests leave out the lease's renewals and metadata reads.",
        started=started, where=where)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
