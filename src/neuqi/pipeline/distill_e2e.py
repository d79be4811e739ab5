"""`neuqi distill OUTPUT --teacher MODEL`: end-to-end light distillation of a quantized output.

The paper's recipe: the student is the quantized model with its integer codes frozen; its scales
and zero-points (optionally its RMSNorm weights) are trained by AdamW so that its final hidden
states (after the final norm) match the full-precision teacher's, mean squared error, batch 1.

* The teacher's final hidden states are precomputed one decoder layer at a time into a job store
  (the stages ``embed`` and ``forward`` of the quantization pipeline, then the final norm), so the
  teacher is never whole in memory.
* The student (the quantized output, its linears dequantized on the fly) must fit the device.
* Every ``save_every`` steps the trainable parameters, AdamW's moments and the step are saved to
  the store; running the same command again resumes from the last save and ends with the same
  parameters as an uninterrupted run (bitwise on CPU).
* The result is a new output folder (written atomically) with the same codes.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from neuqi.data.calib import calibration_windows, hub_max_chars, load_calibration_text, text_sha256
from neuqi.formats.output import OutputWriter, check_output_target, is_neuqi_output
from neuqi.model.checkpoint import Checkpoint, load_tokenizer, resolve_model
from neuqi.model.layers import build_head, build_layer, build_rotary
from neuqi.pipeline.store import JobStore
from neuqi.quant.distill import DistillSettings, QuantLinear, Trainer, trainable_parameters
from neuqi.stages.common import acts_name, batches
from neuqi.stages.embed import run_embed
from neuqi.stages.forward import run_forward
from neuqi.stages.pack import shard_bytes
from neuqi.util.errors import UserError

__all__ = ["KILL_AFTER_STEPS_ENV", "distill_output"]

# Fault injection for the resume tests: SIGKILL this process after that many training steps.
KILL_AFTER_STEPS_ENV = "NEUQI_FAULT_KILL_AFTER_STEPS"
MANIFEST_VERSION = 1
DTYPE = torch.float32
TARGET = "teacher/final"


def default_distill_out(output: Path) -> Path:
    return output.with_name(output.name + "-distilled")


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def distill_output(
    output: str | Path, teacher: str, out: str | Path | None = None, job: str | Path | None = None,
    *, steps: int = 256, lr: float = 3e-4, norms: bool = False, calib: str | Path | None = None,
    calib_field: str = "text",
    nsamples: int = 256, seqlen: int = 2048, seed: int = 0, save_every: int = 50,
    batch_size: int = 8, device: str = "auto", console: Console | None = None,
) -> Path:
    """Distil the quantized output ``output`` against ``teacher`` into ``out`` (default
    ``<output>-distilled``), using (and resuming) the job store ``job`` (default ``<out>.job``).
    Returns the new output folder."""
    from neuqi.formats.loader import NeuqiOutput, load_quantized
    from neuqi.util.devices import resolve_device

    console = console or Console(stderr=True)
    settings = DistillSettings(steps=steps, lr=lr, seed=seed)
    settings.validate()
    if save_every < 1:
        raise UserError(f"--save-every {save_every}: give 1 or more steps")
    dev = resolve_device(device)
    source_dir = Path(output).expanduser()
    if not is_neuqi_output(source_dir):
        raise UserError(f"{source_dir}: not a neuqi output (no neuqi.json); pass a folder "
                        f"written by `neuqi quantize`")
    source = NeuqiOutput.open(source_dir)
    ckpt = Checkpoint.open(resolve_model(teacher, "--teacher"))
    wanted = {n for n in ckpt.names if not n.endswith("rotary_emb.inv_freq")}
    have = set(source.quantized) | {
        n for n in source.plain_names if not n.endswith("rotary_emb.inv_freq")
    }
    if wanted != have:
        odd = min(wanted ^ have)
        raise UserError(
            f"--teacher {teacher}: its tensors do not match the quantized output {source_dir} "
            f"(e.g. {odd}); pass the model that output was quantized from"
        )
    target = Path(out).expanduser() if out else default_distill_out(source_dir)
    if target.resolve() == source_dir.resolve():
        raise UserError(f"--out {target}: is the quantized input itself; choose another folder")
    check_output_target(target)
    text = load_calibration_text(calib, field=calib_field,
                                 max_chars=hub_max_chars(nsamples, seqlen))
    windows = calibration_windows(load_tokenizer(ckpt.path), text, nsamples, seqlen, seed)
    if windows.max() >= ckpt.config.vocab_size:
        raise UserError(f"{ckpt.path}: the tokenizer gives ids beyond the model's vocabulary")
    manifest = {
        "neuqi_distill": MANIFEST_VERSION,
        "options": {
            "output": str(source_dir.resolve()), "teacher": teacher, "out": str(target.resolve()),
            "steps": steps, "lr": lr, "norms": norms, "calib": str(calib) if calib else None,
            "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "save_every": save_every,
        },
        "output_sha256": _file_sha256(source_dir / "neuqi.json"),
        "teacher_fingerprint": ckpt.fingerprint(),
        "calib_sha256": text_sha256(text),
    }
    store = JobStore.create_or_open(job or target.with_name(target.name + ".job"), manifest)
    with store.locked():
        _teacher_states(store, ckpt, windows, batch_size, dev, console)
        model = load_quantized(source_dir, device=dev, dtype=DTYPE)
        for name in sorted(source.quantized):
            module_name = name[: -len(".weight")]
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child,
                    QuantLinear.from_dequant(model.get_submodule(module_name)))
        params = trainable_parameters(model, norms)
        decoder = model.get_decoder()
        n = windows.shape[0]

        def loss_of(j: int) -> torch.Tensor:
            ids = windows[j:j + 1].to(dev)
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
            return F.mse_loss(hidden, store.read_array(TARGET, device=dev, rows=slice(j, j + 1)))

        def mean_loss() -> float:
            with torch.no_grad():
                return sum(float(loss_of(j).double()) for j in range(n)) / n

        if not store.is_done("mse_before"):
            store.mark_done("mse_before", {"mse": mean_loss()})
        record = store.record("mse_before")
        assert record is not None  # marked done just above
        before = record["info"]["mse"]
        trainer = Trainer(params, settings, n, loss_of)
        _resume(store, trainer, console)
        kill_after = os.environ.get(KILL_AFTER_STEPS_ENV)
        started, first = time.perf_counter(), trainer.step

        def on_step(done: int, loss: float) -> None:
            if done % save_every == 0 or done == steps:
                _save(store, trainer)
                rate = (done - first) / max(time.perf_counter() - started, 1e-9)
                console.print(f"step {done}/{steps}: loss {loss:.5g} ({rate:.2f} steps/s)",
                              highlight=False)
            if kill_after is not None and done - first >= int(kill_after):
                os.kill(os.getpid(), signal.SIGKILL)

        trainer.train(on_step=on_step)
        after = mean_loss()
        console.print(f"distilled: mse of the final hidden states {before:.5g} -> {after:.5g}",
                      highlight=False)
        info = dict(source.meta.get("quant_info") or {})
        info["distill"] = {
            "mode": "end-to-end", "teacher": teacher, "steps": steps, "lr": lr, "norms": norms,
            "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "calib": manifest["calib_sha256"],
            "mse_before": before, "mse_after": after,
        }
        trained = {name: p for name, p in params.items()}
        with OutputWriter(target, ckpt, info, max_shard_bytes=shard_bytes(ckpt)) as writer:
            for name in sorted(source.quantized):
                q = model.get_submodule(name[: -len(".weight")])
                meta = source.quantized[name]
                writer.add_quantized(name, q.codes, q.scale, q.zero_point, meta["bits"],
                                     meta["group_size"])
            for name in source.plain_names:
                tensor = source.read(name)
                if name in trained:
                    tensor = trained[name].detach().to(tensor.dtype)
                writer.add_tensor(name, tensor)
        console.print(f"distilled model written to {target}", highlight=False, soft_wrap=True)
        return target


def _teacher_states(store: JobStore, ckpt: Checkpoint, windows: torch.Tensor, batch_size: int,
                    device: torch.device, console: Console) -> None:
    """``teacher/final``: the teacher's final hidden states (after the final norm) of every
    window, one decoder layer at a time (resumable per layer)."""
    if store.is_done("final"):
        return
    n = ckpt.layer_count
    if not store.is_done("embed"):
        store.mark_done("embed", None, run_embed(store, ckpt, windows, DTYPE, batch_size, device))
    rotary = build_rotary(ckpt.config, device)
    for i in range(n):
        if store.is_done(f"forward/{i}"):
            store.delete(acts_name(i))
            continue
        t0 = time.perf_counter()
        layer = build_layer(ckpt, i, device, DTYPE)
        arrays = run_forward(store, i, layer, rotary, DTYPE, batch_size, device)
        store.mark_done(f"forward/{i}", None, arrays)
        store.delete(acts_name(i))
        del layer
        console.print(f"teacher layer {i + 1}/{n} ({time.perf_counter() - t0:.1f} s)",
                      highlight=False)
    norm = build_head(ckpt, device, DTYPE).norm
    src = acts_name(n)
    store.create_array(TARGET, store.array_shape(src), DTYPE, chunks=1)
    with torch.no_grad():
        for start, hidden in batches(store, src, batch_size, device):
            store.write_rows(TARGET, start, norm(hidden).to(DTYPE).cpu())
    store.mark_done("final", None, [TARGET])
    store.delete(src)


def _save(store: JobStore, trainer: Trainer) -> None:
    """The trainer's state under ``train/<step>``, then the ``train`` record pointing at it, then
    the previous save deleted: a kill at any point leaves one complete save recorded."""
    previous = store.record("train")
    prefix = f"train/{trainer.step}"
    names = []
    for key, tensor in trainer.state().items():
        name = f"{prefix}/{key}"
        store.write_array(name, tensor)
        names.append(name)
    store.mark_done("train", {"step": trainer.step, "prefix": prefix}, names)
    if previous is not None and previous["info"]["prefix"] != prefix:
        store.delete(previous["info"]["prefix"])


def _resume(store: JobStore, trainer: Trainer, console: Console) -> None:
    record = store.record("train")
    if record is None:
        return
    info: dict[str, Any] = record["info"]
    prefix, step = info["prefix"], int(info["step"])
    tensors = {a[len(prefix) + 1:]: store.read_array(a) for a in record["arrays"]}
    trainer.load_state(tensors, step)
    console.print(f"resuming distillation {store.path} from step {step}", highlight=False,
                  soft_wrap=True)
