"""Synthetic LLaMA-like checkpoints of any size: the benchmarks' and tests' stand-in for a real model.

:func:`build_checkpoint` writes ``config.json``, sharded safetensors with an index and a small
byte-level BPE tokenizer for a :class:`Shape` (any hidden / intermediate / head layout, family
``llama`` or ``qwen2``, whose q/k/v projections carry biases). The weights are seeded random
numbers, heavy-tailed (a Gaussian scaled by a log-normal factor) with a few outlier input channels
per linear, so a solver has real work to do; the same tensor name and seed give the same values
whatever the sharding.

The module imports torch only when it writes, so a measuring parent process can use
:class:`Shape` without loading it. Nothing is ever held whole: each shard's header is written first (the shapes are known), then each
tensor is generated and written a block of rows at a time, so a checkpoint of any size is written
with a few hundred MiB of memory. Shards are cut at ``max_shard_bytes`` (a tensor larger than that
gets a shard of its own), as published checkpoints are.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from neuqi.errors import UserError

if TYPE_CHECKING:
    import torch

FAMILIES = ("llama", "qwen2")
DTYPES = {"bfloat16": ("BF16", 2), "float32": ("F32", 4)}  # safetensors name, bytes
BLOCK_ELEMENTS = 2**24  # values generated at once (64 MiB in float32)
OUTLIER_FRACTION = 1 / 256  # input channels per linear scaled up
OUTLIER_GAIN = 8.0
TAIL_SIGMA = 0.5  # log-normal scale mixture: kurtosis of about 3 * exp(4 * 0.5**2) = 8
TOKENIZER_VOCAB = 1024  # capped by the shape's vocabulary
TOKENIZER_TEXT_CHARS = 200_000
SPECIALS = ["<|endoftext|>", "<|pad|>"]
SHARD_BYTES = 5 * 10**9  # what the hub's large checkpoints use


@dataclass(frozen=True)
class Shape:
    """A decoder-only model's layer shapes (the vocabulary may be cut, the layers are exact)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    family: str = "llama"
    head_dim: int | None = None  # default hidden // heads

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise UserError(f"family {self.family!r}: choose one of {', '.join(FAMILIES)}")
        if self.heads % self.kv_heads or (self.head_dim is None and self.hidden % self.heads):
            raise UserError("the hidden size must divide by the heads, the heads by the kv heads")

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def biases(self) -> bool:
        return self.family == "qwen2"

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        """Name and shape of every tensor of decoder layer ``i``, in the checkpoint's order."""
        h, m = self.hidden, self.intermediate
        q, kv = self.heads * self.dim, self.kv_heads * self.dim
        p = f"model.layers.{i}."
        out = [(p + "input_layernorm.weight", (h,))]
        for name, rows in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            out.append((f"{p}self_attn.{name}.weight", (rows, h)))
            if self.biases:
                out.append((f"{p}self_attn.{name}.bias", (rows,)))
        out += [
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (m, h)),
            (p + "mlp.up_proj.weight", (m, h)),
            (p + "mlp.down_proj.weight", (h, m)),
        ]
        return out

    def tensors(self, layers: int) -> list[tuple[str, tuple[int, ...]]]:
        out = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(layers):
            out += self.layer_tensors(i)
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    def layer_params(self) -> int:
        return sum(math.prod(s) for _, s in self.layer_tensors(0))

    def largest_linear_params(self) -> int:
        return max(math.prod(s) for n, s in self.layer_tensors(0) if n.endswith("proj.weight"))


#: Layer shapes of published models (vocabulary cut to 4096; `--vocab` changes it).
SHAPES = {
    "llama-3.1-70b": Shape(8192, 28672, 64, 8, 4096, "llama"),
    "qwen2.5-72b": Shape(8192, 29568, 64, 8, 4096, "qwen2"),
    "llama-3.1-405b": Shape(16384, 53248, 128, 8, 4096, "llama"),
    "small": Shape(1024, 4096, 8, 2, 1024, "llama"),  # quick checks of the pipeline's scaling
}
#: Their real depth and vocabulary, for projections to the full model.
FULL_MODELS = {"llama-3.1-70b": (80, 128256), "qwen2.5-72b": (80, 152064),
               "llama-3.1-405b": (126, 128256)}


def _blocks(name: str, shape: tuple[int, ...], seed: int) -> Iterator[torch.Tensor]:
    """The tensor's float32 values, a block of rows at a time; seeded per name and block."""
    import torch

    rows = shape[0]
    cols = math.prod(shape[1:]) if len(shape) > 1 else 1
    step = max(1, BLOCK_ELEMENTS // cols)
    base = seed * 1_000_003 + zlib.crc32(name.encode())
    outliers = None
    if name.endswith("proj.weight"):
        g = torch.Generator().manual_seed(base)
        k = max(1, round(cols * OUTLIER_FRACTION))
        outliers = torch.randperm(cols, generator=g)[:k]
    for b, lo in enumerate(range(0, rows, step)):
        n = min(step, rows - lo)
        g = torch.Generator().manual_seed(base + 7919 * (b + 1))
        if name.endswith("norm.weight"):
            yield 1.0 + 0.1 * torch.randn(n, generator=g)
        elif name.endswith(".bias"):
            yield 0.02 * torch.randn(n, generator=g)
        elif "embed_tokens" in name or name == "lm_head.weight":
            yield torch.randn(n, cols, generator=g) * 0.02
        else:
            t = torch.randn(n, cols, generator=g)
            t.mul_(torch.randn(n, cols, generator=g).mul_(TAIL_SIGMA).exp_())
            t.mul_(1.0 / (cols**0.5 * math.exp(TAIL_SIGMA**2)))
            if outliers is not None:
                t[:, outliers] *= OUTLIER_GAIN
            yield t


def _write_shard(path: Path, items: list[tuple[str, tuple[int, ...]]], seed: int,
                 dtype: str, sparse: bool = False) -> None:
    """One safetensors file: the header, then every tensor streamed block by block (``sparse``:
    a hole of the right size instead, for planning only)."""
    import torch

    st_dtype, itemsize = DTYPES[dtype]
    torch_dtype = getattr(torch, dtype)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in items:
        n = math.prod(shape) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        if sparse:
            f.truncate(8 + len(raw) + offset)
            return
        for name, shape in items:
            f.writelines(block.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes() for block in _blocks(name, shape, seed))


def write_config(folder: Path, shape: Shape, layers: int, seqlen: int = 2048,
                 dtype: str = "bfloat16") -> None:
    from transformers import LlamaConfig, Qwen2Config

    cls, extra = ((Qwen2Config, {"use_sliding_window": False}) if shape.family == "qwen2"
                  else (LlamaConfig, {"head_dim": shape.dim}))
    config = cls(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=shape.intermediate,
        num_hidden_layers=layers, num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads, max_position_embeddings=max(seqlen, 2048),
        rms_norm_eps=1e-5, bos_token_id=0, eos_token_id=0, pad_token_id=1,
        tie_word_embeddings=False, torch_dtype=dtype, **extra,
    )
    config.save_pretrained(str(folder))


def write_tokenizer(folder: Path, vocab: int, seqlen: int = 2048) -> None:
    """A byte-level BPE trained on the start of the shipped calibration text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from neuqi.calib import load_calibration_text

    text = load_calibration_text(None)[:TOKENIZER_TEXT_CHARS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(TOKENIZER_VOCAB, vocab), special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    if tok.get_vocab_size() > vocab:
        raise UserError(f"tokenizer vocabulary {tok.get_vocab_size()} > the model's {vocab}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIALS[0], eos_token=SPECIALS[0], pad_token=SPECIALS[1],
        model_max_length=max(seqlen, 2048),
    )
    fast.save_pretrained(str(folder))


def build_checkpoint(folder: Path, shape: Shape, layers: int, *, seqlen: int = 2048,
                     seed: int = 0, max_shard_bytes: int = SHARD_BYTES,
                     dtype: str = "bfloat16", sparse: bool = False) -> int:
    """Write the checkpoint into ``folder``; returns the bytes of tensor data written.

    ``sparse``: the shards are holes of the right size (zeros, no disk used) behind real headers:
    a full-depth model for ``neuqi plan``, which reads only the headers."""
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype}: choose one of {', '.join(DTYPES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    itemsize = DTYPES[dtype][1]
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    total = 0
    for name, dims in shape.tensors(layers):
        nbytes = math.prod(dims) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
        total += nbytes
    weight_map: dict[str, str] = {}
    for k, items in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tmp = folder / (file + ".tmp")
        _write_shard(tmp, items, seed, dtype, sparse)
        tmp.rename(folder / file)
        weight_map.update({name: file for name, _ in items})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_config(folder, shape, layers, seqlen, dtype)
    write_tokenizer(folder, shape.vocab, seqlen)
    return total
