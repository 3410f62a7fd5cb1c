"""Interventions on long prompts run in memory linear in the length (#33 item 4): with the model's fast attention,
or, for position-specific attention neurons (which read the attention weights), eagerly a block of queries at a
time through the KV cache. Both give what one eager pass over the whole prompt gives."""

from __future__ import annotations

import pytest
import torch

from neuron_attribution import Ablation, AttentionIndex
from neuron_attribution.model import forward
from neuron_attribution.model.forward import PaddedBatch
from neuron_attribution.model.interventions import ablated_rows, last_logits, last_logits_each

from .conftest import tiny_family, tiny_gpt2, tiny_llama

MAKERS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "gemma2": lambda: tiny_family("gemma2"),
          "mixtral": lambda: tiny_family("mixtral")}


def _prompts(n_tokens: list[int], vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in n_tokens]


def _eager_whole(model, batch, ablations) -> torch.Tensor:
    """The reference: one eager pass over each whole padded batch (the quadratic way)."""
    padded = PaddedBatch.of(batch)
    with torch.inference_mode(), ablated_rows(model, ablations):
        return padded.last_logits(padded.run(model))


@pytest.mark.parametrize("family", list(MAKERS))
def test_long_prompt_interventions_equal_one_eager_pass(family, monkeypatch):
    """Prompts of 30–60 tokens, past a fast-attention threshold lowered to 16 (the tiny models hold 64), in one
    padded batch, with blocks of 8 queries: an FFN neuron and a head switched off (fast attention),
    position-specific attention neurons at an early, a block-boundary and a late source position amplified
    (blocks through the cache), and one ablation per prompt."""
    model = MAKERS[family]()
    monkeypatch.setattr(forward, "QUERY_BLOCK", 8)
    monkeypatch.setattr(forward, "FAST_ATTENTION_FROM_TOKENS", 16)
    batch = _prompts([60, 30, 47], model.shape.vocab_size)
    last = model.shape.n_layers - 1
    ffn = Ablation(ffn=[tuple(model.shape.ffn_index(0, 3))], heads=[(last, 1)])
    positioned = Ablation.of([AttentionIndex(last, 1, 2, 5), AttentionIndex(last, 0, 1, 16),
                              AttentionIndex(0, 2, 0, 40)], scale=3.0)
    for ablations in ([ffn], [positioned], [ffn, positioned, Ablation()]):
        expected = _eager_whole(model, batch, ablations)
        if len(ablations) == 1:
            got = last_logits(model, batch, ablations[0])
        else:
            got = last_logits_each(model, batch, ablations)
        assert torch.allclose(got, expected, atol=2e-5, rtol=1e-5), (family, (got - expected).abs().max())
    # the interventions bite: the amplified neurons move the logits of the prompts long enough to hold them
    assert not torch.allclose(last_logits(model, batch, positioned), last_logits(model, batch), atol=1e-4)


def test_long_interventions_never_build_a_token_by_token_attention_matrix(monkeypatch):
    """What the quadratic path did: eager attention over the whole prompt, H·T·T weights per layer. Every call
    the model's attention makes on a long prompt sees at most QUERY_BLOCK queries (eager) or runs fast attention."""
    model = tiny_llama()
    monkeypatch.setattr(forward, "QUERY_BLOCK", 8)
    monkeypatch.setattr(forward, "FAST_ATTENTION_FROM_TOKENS", 16)
    seen: list[tuple[int, ...]] = []

    def watch(module, args, output):
        if output[1] is not None:
            seen.append(tuple(output[1].shape))

    handles = [model.adapter.attention(layer).register_forward_hook(watch) for layer in range(model.shape.n_layers)]
    try:
        batch = _prompts([60], model.shape.vocab_size)
        last_logits(model, batch, Ablation.of([model.shape.ffn_index(1, 2)]))
        assert seen == []  # fast attention: no weights at all
        last_logits(model, batch, Ablation.of([AttentionIndex(1, 1, 1, 7)]))
        assert seen and all(shape[-2] <= 8 and shape[-1] <= 60 for shape in seen)
        assert len(seen) == model.shape.n_layers * 8  # ceil(60 / 8) blocks
    finally:
        for handle in handles:
            handle.remove()
