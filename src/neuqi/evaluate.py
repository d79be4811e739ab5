"""Perplexity of a model or a quantized neuqi output, computed one decoder layer at a time.

The standard protocol: the whole evaluation text joined as is, tokenized once (no special
tokens), cut into non-overlapping windows of ``seqlen`` tokens (the incomplete tail dropped);
each window is scored on its own and the result is ``exp`` of the mean next-token NLL over all
predicted tokens (``seqlen - 1`` per window).

The whole model is never in memory: the hidden states of all windows stay on the host between
layers, and each decoder layer is built (from the checkpoint, or from the quantized output with
its linears as :class:`~neuqi.formats.loader.DequantLinear`), run over all windows in batches, and freed.
Computation is in float32.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import nn

from neuqi.data.calib import read_text_file, window_prefix, with_prefix
from neuqi.model.checkpoint import load_tokenizer
from neuqi.model.families import embedding_from_weight
from neuqi.model.layers import (
    LMHead,
    _family_class,
    arch_for,
    build_embedding,
    build_head,
    build_layer,
    build_rotary,
    layer_forward,
    new_layer,
    position_embeddings_for,
)
from neuqi.util.errors import UserError

__all__ = ["OutputModel", "eval_windows", "perplexity", "read_eval_text"]

DTYPE = torch.float32
# Tokens scored by one lm_head call: bounds the logits held at once (tokens x vocab floats).
_HEAD_CHUNK = 1024


# ---------------------------------------------------------------------------------- input text
def read_eval_text(path: Path) -> str:
    """The evaluation text of ``path``: UTF-8 (a BOM dropped), ``\\r\\n`` turned into ``\\n``."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"--data {path} does not exist: pass a text file")
    if not path.is_file():
        raise UserError(f"--data {path} is not a regular file: pass a text file")
    return read_text_file(path, "--data", "pass a plain-text file")


def eval_windows(
    tokenizer: Any, text: str, seqlen: int, max_windows: int | None = None
) -> torch.Tensor:
    """``text`` tokenized once (no special tokens), cut into int64 ``[n, seqlen]`` windows.

    Consecutive, non-overlapping, the incomplete tail dropped; ``max_windows`` keeps the first
    ones. Each window starts with the tokenizer's own prefix (``calib.window_prefix``: Gemma's
    ``<bos>``, nothing for SmolLM2) followed by the next ``seqlen`` minus that many text tokens.
    UserError if the text is shorter than one window.
    """
    _check_sizes(seqlen, max_windows, 1)
    prefix = window_prefix(tokenizer)
    if seqlen <= len(prefix) + 1:
        raise UserError(f"--seqlen {seqlen} is too small: give {len(prefix) + 2} or more")
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=False, verbose=False)
    ids = enc["input_ids"].reshape(-1).to(torch.int64)
    body = seqlen - len(prefix)
    n = ids.numel() // body
    if n == 0:
        raise UserError(
            f"--data: the text has {ids.numel()} tokens, fewer than one window of --seqlen "
            f"{seqlen}: give a longer text or a smaller --seqlen"
        )
    if max_windows is not None:
        n = min(n, max_windows)
    return with_prefix(prefix, ids[: n * body].reshape(n, body))


def _check_sizes(seqlen: int, max_windows: int | None, batch_size: int) -> None:
    if seqlen < 2:
        raise UserError(f"--seqlen {seqlen} is too small: give 2 or more")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows {max_windows} is too small: give 1 or more")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size} is too small: give 1 or more")


# ---------------------------------------------------------------------------------- model sources
class _CheckpointModel:
    """A full-precision checkpoint, as the blocks the streamed forward pass needs."""

    def __init__(self, model: str) -> None:
        from neuqi.model.checkpoint import Checkpoint, resolve_model

        self.ckpt = Checkpoint.open(resolve_model(model, "MODEL_OR_OUTPUT"))
        self.path = self.ckpt.path
        self.config = self.ckpt.config
        self.layer_count = self.ckpt.layer_count

    def embedding(self, device: torch.device) -> nn.Embedding:
        return build_embedding(self.ckpt, device, DTYPE)

    def layer(self, index: int, device: torch.device) -> nn.Module:
        return build_layer(self.ckpt, index, device, DTYPE)

    def head(self, device: torch.device) -> LMHead:
        return build_head(self.ckpt, device, DTYPE)


class OutputModel:
    """A quantized neuqi output folder, built block by block like a checkpoint.

    Quantized linears become :class:`~neuqi.formats.loader.DequantLinear` modules (their biases, norms,
    embeddings and unquantized weights come from the output's stored tensors, as float32).
    """

    def __init__(self, path: str | Path) -> None:
        from neuqi.formats.loader import NeuqiOutput, _load_config

        self.out = NeuqiOutput.open(path)
        self.path = self.out.path
        self.config = _load_config(self.path)
        self.arch = arch_for(self.config, [*self.out.weight_map, *self.out.quantized])
        self.config._attn_implementation = self.arch.attn_implementation(self.config)
        self.layer_count = int(self.config.num_hidden_layers)

    def _read(self, name: str, device: torch.device) -> torch.Tensor:
        t = self.out.read(name)
        return (t.to(DTYPE) if t.is_floating_point() else t).to(device)

    def _linear(self, name: str, bias: str | None, device: torch.device) -> nn.Module:
        """Quantized ``name`` (``...weight``) as a DequantLinear, else a plain frozen nn.Linear."""
        b = self._read(bias, device) if bias is not None else None
        if name in self.out.quantized:
            return self.out.linear(name, bias=b, device=device)
        weight = self._read(name, device)
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=b is not None, device="meta")
        state = {"weight": weight} if b is None else {"weight": weight, "bias": b}
        linear.load_state_dict(state, strict=True, assign=True)
        return linear

    def embedding(self, device: torch.device) -> nn.Embedding:
        weight = self._read(self.arch.embed, device)
        return embedding_from_weight(weight, self.config, self.arch)

    def layer(self, index: int, device: torch.device) -> nn.Module:
        """Decoder layer ``index`` as transformers' own class, its linears from the output."""
        if not 0 <= index < self.layer_count:
            raise IndexError(f"layer {index} out of range (model has {self.layer_count})")
        prefix = self.arch.layer_prefix(index)
        layer = new_layer(self.config, index, self.arch)
        stored = set(self.out.weight_map) | set(self.out.quantized)
        used: set[str] = set()
        for linear in self.arch.linears_of(index):
            old = layer.get_submodule(linear)
            name = f"{prefix}{linear}.weight"
            bias = f"{prefix}{linear}.bias" if old.bias is not None else None
            for needed in (name, bias):
                if needed is not None and needed not in stored:
                    raise UserError(
                        f"{self.path}: tensor {needed} is missing from the output; it is "
                        f"incomplete or does not match its config.json"
                    )
            new = self._linear(name, bias, device)
            shape = (new.out_features, new.in_features)
            if shape != (old.out_features, old.in_features):
                raise UserError(
                    f"{self.path}: {name} has shape {shape}, but the model of config.json has "
                    f"{(old.out_features, old.in_features)}; the output does not match its config"
                )
            parent, _, child = linear.rpartition(".")
            setattr(layer.get_submodule(parent), child, new)
            used.update(n for n in (name, bias) if n is not None)
        # everything else of the layer (norms, q/k norms...) from the stored tensors
        rest = [k for k, t in layer.state_dict(keep_vars=True).items() if t.is_meta]
        missing = [prefix + k for k in rest if prefix + k not in self.out.weight_map]
        if missing:
            raise UserError(
                f"{self.path}: tensor {missing[0]} is missing from the output ({len(missing)} "
                f"missing); it is incomplete or does not match its config.json"
            )
        state = {k: self._read(prefix + k, device) for k in rest}
        layer.load_state_dict(state, strict=False, assign=True)
        used.update(prefix + k for k in rest)
        quant_parts = {
            info[k] for info in self.out.quantized.values() for k in ("qweight", "scales", "zeros")
        }
        extra = sorted(
            n for n in stored - quant_parts - used
            if n.startswith(prefix) and not n.endswith("rotary_emb.inv_freq")
        )
        if extra:
            raise UserError(
                f"{self.path}: tensor {extra[0]} is not used by {type(layer).__name__} "
                f"({len(extra)} unexpected); the output does not match its config.json"
            )
        left = [n for n, t in [*layer.named_parameters(), *layer.named_buffers()] if t.is_meta]
        if left:
            raise RuntimeError(f"{type(layer).__name__}: {left[0]} was not materialised")
        layer.requires_grad_(False)
        return layer.eval()

    def head(self, device: torch.device) -> LMHead:
        """Final norm + lm_head (quantized, stored, or tied to the embedding)."""
        config, arch = self.config, self.arch
        with torch.device("meta"):
            norm = _family_class(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
        norm.load_state_dict(
            {"weight": self._read(arch.final_norm, device)}, strict=True, assign=True
        )
        if arch.lm_head in self.out.quantized or arch.lm_head in self.out.weight_map:
            lm_head = self._linear(arch.lm_head, None, device)
        elif getattr(config, "tie_word_embeddings", False):
            lm_head = self._linear(arch.embed, None, device)
        else:
            raise UserError(
                f"{self.path}: tensor {arch.lm_head} is missing from the output; it is "
                f"incomplete or does not match its config.json"
            )
        head = LMHead(norm, lm_head, arch.final_softcap(config))
        head.requires_grad_(False)
        return head.eval()


def _open(model_or_output: str) -> _CheckpointModel | OutputModel:
    from neuqi.formats.output import is_neuqi_output

    if is_neuqi_output(Path(model_or_output).expanduser()):
        return OutputModel(model_or_output)
    return _CheckpointModel(model_or_output)


# ---------------------------------------------------------------------------------- the pass
def _nll_sum(head: LMHead, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Summed next-token NLL of windows ``ids`` [b, s] from their last hidden states [b, s, h]."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    targets = ids[:, 1:].reshape(-1)
    total = 0.0
    for start in range(0, targets.numel(), _HEAD_CHUNK):
        logits = head(h[start : start + _HEAD_CHUNK]).float()
        loss = F.cross_entropy(logits, targets[start : start + _HEAD_CHUNK], reduction="sum")
        total += float(loss.double())
    return total


def _kl_and_agreement(head: LMHead, hidden: torch.Tensor, ref_head: LMHead,
                      ref_hidden: torch.Tensor) -> tuple[float, int]:
    """Summed KL(P_ref || P) of the next-token distributions and the count of positions whose
    top token agrees, over the predicting positions of hidden states ``[b, s, h]``."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    r = ref_hidden[:, :-1].reshape(-1, ref_hidden.shape[-1])
    kl, agree = 0.0, 0
    for start in range(0, h.shape[0], _HEAD_CHUNK):
        logp = F.log_softmax(head(h[start : start + _HEAD_CHUNK]).float(), dim=-1)
        ref = F.log_softmax(ref_head(r[start : start + _HEAD_CHUNK]).float(), dim=-1)
        kl += float(F.kl_div(logp, ref, log_target=True, reduction="sum").double())
        agree += int((logp.argmax(-1) == ref.argmax(-1)).sum())
    return kl, agree


def _last_hidden(model: Any, windows: torch.Tensor, batch_size: int, dev: torch.device,
                 console: Console, label: str = "") -> torch.Tensor:
    """The hidden states after the last decoder layer ``[n, seqlen, hidden]`` (on the host),
    computed one layer at a time over all windows."""
    n, seqlen = windows.shape
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    embed = model.embedding(dev)
    hidden = torch.empty((n, seqlen, embed.embedding_dim), dtype=DTYPE)
    for a, b in batches:
        hidden[a:b] = embed(windows[a:b].to(dev)).to(DTYPE).cpu()
    del embed
    rotary = build_rotary(model.config, dev)
    for i in range(model.layer_count):
        t0 = time.perf_counter()
        layer = model.layer(i, dev)
        for a, b in batches:
            h = hidden[a:b].to(dev)
            out = layer_forward(layer, h, position_embeddings_for(rotary, h))
            hidden[a:b] = out.to(DTYPE).cpu()
        del layer
        console.print(
            f"{label}layer {i + 1}/{model.layer_count} ({time.perf_counter() - t0:.1f} s)",
            highlight=False,
            soft_wrap=True,
        )
    return hidden


def perplexity(
    model_or_output: str,
    data: Path,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 4,
    device: str | torch.device = "auto",
    console: Console | None = None,
    reference: str | None = None,
) -> dict[str, Any]:
    """Perplexity of a checkpoint (folder, hub id, built-in name) or of a neuqi output folder.

    Streamed one decoder layer at a time (see the module doc). Returns ``{"perplexity", "nll"
    (mean NLL per predicted token, nats), "windows", "tokens" (predicted tokens: windows *
    (seqlen - 1)), "seqlen"}``. With ``reference`` (a model, e.g. the full-precision one the
    output was quantized from) the reference is streamed over the same windows too and the
    result adds ``"kld"`` (mean KL divergence of the next-token distributions, reference to
    model, nats per token), ``"top1_agreement"`` (fraction of positions whose most likely next
    token is the reference's) and ``"reference"``: what llama.cpp's ``perplexity
    --kl-divergence`` reports. Progress goes to ``console`` (default: stderr). UserError for a
    missing or non-text data file, a text shorter than one window, bad sizes, or a reference
    with another vocabulary.
    """
    from neuqi.util.devices import resolve_device

    console = console or Console(stderr=True)
    _check_sizes(seqlen, max_windows, batch_size)
    dev = resolve_device(str(device))
    text = read_eval_text(data)
    model = _open(model_or_output)
    ref_model = _open(reference) if reference is not None else None
    windows = eval_windows(load_tokenizer(model.path), text, seqlen, max_windows)
    vocab = int(model.config.vocab_size)
    if int(windows.max()) >= vocab:
        raise UserError(f"{model.path}: the tokenizer gives ids beyond the model's vocabulary")
    if ref_model is not None and int(ref_model.config.vocab_size) != vocab:
        raise UserError(f"--reference {reference}: vocabulary of {ref_model.config.vocab_size} "
                        f"tokens, not the {vocab} of {model.path}; give the model it was "
                        f"quantized from")
    n = windows.shape[0]
    console.print(
        f"eval {model.path}: {n} windows of {seqlen} tokens, {model.layer_count} layers, "
        f"device {dev}" + (f"; reference {ref_model.path}" if ref_model is not None else ""),
        highlight=False,
        soft_wrap=True,
    )
    started = time.perf_counter()
    batches = [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    with torch.no_grad():
        hidden = _last_hidden(model, windows, batch_size, dev, console)
        head = model.head(dev)
        nll_sum = 0.0
        for a, b in batches:
            nll_sum += _nll_sum(head, hidden[a:b].to(dev), windows[a:b].to(dev))
        kl_sum, agree = 0.0, 0
        if ref_model is not None:
            del head
            ref_hidden = _last_hidden(ref_model, windows, batch_size, dev, console,
                                      label="reference ")
            head, ref_head = model.head(dev), ref_model.head(dev)
            for a, b in batches:
                kl, same = _kl_and_agreement(head, hidden[a:b].to(dev), ref_head,
                                             ref_hidden[a:b].to(dev))
                kl_sum, agree = kl_sum + kl, agree + same
            del ref_head, ref_hidden
        del head
    tokens = n * (seqlen - 1)
    nll = nll_sum / tokens
    result: dict[str, Any] = {
        "perplexity": math.exp(nll),
        "nll": nll,
        "windows": n,
        "tokens": tokens,
        "seqlen": seqlen,
    }
    if ref_model is not None:
        result.update(kld=kl_sum / tokens, top1_agreement=agree / tokens,
                      reference=str(ref_model.path))
    console.print(
        f"perplexity {result['perplexity']:.4f} (nll {nll:.5f}, {tokens} tokens, "
        f"{time.perf_counter() - started:.1f} s)"
        + (f"; KL divergence to the reference {result['kld']:.6f}, top token agrees at "
           f"{100 * result['top1_agreement']:.2f} %" if ref_model is not None else ""),
        highlight=False,
        soft_wrap=True,
    )
    return result
