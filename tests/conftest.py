"""Shared fixtures: tiny random checkpoints (LLaMA, Qwen2, Qwen3, Mistral) and the SmolLM2 demo model.

The model folders are session-scoped and shared: treat them as read-only and copy one
(``shutil.copytree``) before editing it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# No GPU here: the triton kernel's tests run it in triton's interpreter. This must be set before
# torch is imported: torch imports triton at start, and triton makes each of its own functions
# (tl.sum, ...) interpreted or compiled when it defines them; set later, a worker that had run
# other tests first failed every kernel test ("Cannot call @triton.jit'd outside of the scope of
# a kernel"). The slow test that compiles the kernel for a GPU sets it to 0 in its own process.
os.environ.setdefault("TRITON_INTERPRET", "1")

import torch

TINY_VOCAB = 512
TINY_SEQ = 256

# Small, fixed, varied text: enough for a byte-level BPE with a few hundred merges.
_TOKENIZER_TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good fortune,
must be in want of a wife. However little known the feelings or views of such a man may be on
his first entering a neighbourhood, this truth is so well fixed in the minds of the surrounding
families, that he is considered the rightful property of some one or other of their daughters.
The quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( ) [ ] { } < > " ' ; : ! ?
Quantization maps each weight to one of a few levels: w = s * (q - z), with scale s and zero z.
def forward(self, x):\n    return self.linear(x) + 1\n
"""

_SPECIALS = ["<|endoftext|>", "<|pad|>"]


def _build_tokenizer(folder: Path) -> None:
    """A byte-level BPE (vocab TINY_VOCAB) saved as a Hugging Face fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        model_max_length=TINY_SEQ,
    )
    fast.save_pretrained(str(folder))


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder holding the tiny byte-level BPE tokenizer (vocab <= TINY_VOCAB)."""
    folder = tmp_path_factory.mktemp("tiny-tokenizer")
    _build_tokenizer(folder)
    return folder


def _tiny_config(family: str, **overrides: Any) -> Any:
    from transformers import AutoConfig

    base: dict[str, Any] = {
        "vocab_size": TINY_VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": TINY_SEQ,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 1,
        "tie_word_embeddings": False,
    }
    if family == "qwen2":
        base["tie_word_embeddings"] = True
    if family == "mistral":
        base["sliding_window"] = 8  # shorter than the test inputs: the sliding mask matters
    base.update(overrides)
    return AutoConfig.for_model(family, **base)


def make_tiny_model(
    family: str,
    folder: Path,
    tokenizer_dir: Path,
    *,
    seed: int = 0,
    max_shard_size: str | int | None = None,
    **overrides: Any,
) -> Path:
    """Save a seeded random ``family`` model (float32 safetensors) plus the tiny tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuqi.model.synthetic import randomize

    config = _tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(str(folder), **kwargs)
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_model_factory(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path
) -> Callable[..., Path]:
    """``factory(family, seed=0, max_shard_size=None, **config) -> folder``, cached per arguments."""
    made: dict[str, Path] = {}

    def factory(family: str, **kwargs: Any) -> Path:
        key = json.dumps([family, kwargs], sort_keys=True, default=str)
        if key not in made:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            made[key] = make_tiny_model(family, folder, tiny_tokenizer_dir, **kwargs)
        return made[key]

    return factory


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_factory: Callable[..., Path]) -> Path:
    """Tiny random LLaMA (3 layers, hidden 64, GQA 4/2, untied head), one model.safetensors."""
    return tiny_model_factory("llama")


@pytest.fixture(scope="session")
def tiny_llama_sharded(tiny_model_factory: Callable[..., Path]) -> Path:
    """The same weights as ``tiny_llama``, saved as several shards with model.safetensors.index.json."""
    folder = tiny_model_factory("llama", max_shard_size="200KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert len(list(folder.glob("model-*.safetensors"))) >= 2
    return folder


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_factory: Callable[..., Path]) -> Path:
    """Tiny random Qwen2 (q/k/v biases, tied embeddings)."""
    return tiny_model_factory("qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tiny_model_factory: Callable[..., Path]) -> Path:
    """Tiny random Qwen3 (q/k RMSNorm)."""
    return tiny_model_factory("qwen3")


@pytest.fixture(scope="session")
def tiny_mistral(tiny_model_factory: Callable[..., Path]) -> Path:
    """Tiny random Mistral with sliding_window=8."""
    return tiny_model_factory("mistral")


@pytest.fixture(scope="session")
def smollm2_dir(request: pytest.FixtureRequest) -> Path:
    """The SmolLM2-135M-Instruct demo checkpoint, converted once into the pytest cache."""
    from neuqi.model.demo import FOLDER_NAME, ensure_smollm2

    root = Path(request.config.cache.mkdir("neuqi-smollm2"))
    return ensure_smollm2(root / FOLDER_NAME)


@pytest.fixture(scope="session")
def gemma3_dir(request: pytest.FixtureRequest) -> Path:
    """Gemma 3 270M, the second built-in real model, converted once into the pytest cache."""
    from neuqi.model.demo import BUILTIN, ensure_builtin

    root = Path(request.config.cache.mkdir("neuqi-gemma3-270m"))
    return ensure_builtin("gemma3-270m", root / BUILTIN["gemma3-270m"].folder)
