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
          **{family: (lambda f=family: tiny_family(f))
             for family in ("mixtral", "qwen2_moe", "gemma3_text", "phi", "gpt_neox", "falcon", "bloom", "gpt_bigcode",
                            "opt", "olmo2", "cohere", "granite", "gptj")}}


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
    """What the quadratic path did: eager attention over the whole prompt, H·T·T weights per layer. On a long
    prompt every intervention runs with fast attention (no weights at all); a position-specific attention neuron
    costs one more run of its own layer's attention (its value projection is called twice, every other once)."""
    model = tiny_llama()
    monkeypatch.setattr(forward, "FAST_ATTENTION_FROM_TOKENS", 16)
    seen: list[tuple[int, ...]] = []
    calls = [0] * model.shape.n_layers

    def watch(module, args, output):
        if output[1] is not None:
            seen.append(tuple(output[1].shape))

    def count(layer):
        def hook(module, args, output):
            calls[layer] += 1
        return hook

    handles = [model.adapter.attention(layer).register_forward_hook(watch) for layer in range(model.shape.n_layers)]
    handles += [model.adapter.value_source(layer).register_forward_hook(count(layer))
                for layer in range(model.shape.n_layers)]
    try:
        batch = _prompts([60], model.shape.vocab_size)
        last_logits(model, batch, Ablation.of([model.shape.ffn_index(1, 2)]))
        assert seen == [] and calls == [1] * model.shape.n_layers
        calls[:] = [0] * model.shape.n_layers
        last_logits(model, batch, Ablation.of([AttentionIndex(1, 1, 1, 7), AttentionIndex(1, 2, 0, 7)]))
        expected = [1] * model.shape.n_layers
        expected[1] = 2  # one more run of layer 1's attention, for source position 7
        assert seen == [] and calls == expected
    finally:
        for handle in handles:
            handle.remove()


def test_families_without_fast_attention_run_long_interventions_in_blocks(monkeypatch):
    """Gemma 2 cannot switch to fast attention (SDPA cannot soft-cap): its long prompts run eagerly a block of
    queries at a time through the KV cache, each block's weights QUERY_BLOCK × keys; equal to one eager pass."""
    model = tiny_family("gemma2")
    monkeypatch.setattr(forward, "QUERY_BLOCK", 8)
    monkeypatch.setattr(forward, "FAST_ATTENTION_FROM_TOKENS", 16)
    assert not forward.has_fast_attention(model)
    seen: list[tuple[int, ...]] = []
    handle = model.adapter.attention(0).register_forward_hook(lambda m, a, o: seen.append(tuple(o[1].shape)))
    try:
        batch = _prompts([60], model.shape.vocab_size)
        ablation = Ablation.of([AttentionIndex(1, 1, 1, 7)], scale=2.0)
        got = last_logits(model, batch, ablation)
    finally:
        handle.remove()
    assert len(seen) == 8 and all(shape[-2] <= 8 for shape in seen)  # ceil(60 / 8) blocks
    assert torch.allclose(got, _eager_whole(model, batch, [ablation]), atol=2e-5, rtol=1e-5)


def test_a_position_specific_intervention_in_bfloat16(monkeypatch):
    """The probe's change is read in the model's dtype. In bfloat16 the fast and the eager path already differ by
    their own rounding, so what is compared is what the intervention does on each: the change of the logits
    when 64 neurons are reversed and amplified (×−20), on the fast path (probe) against one eager pass."""
    model = tiny_llama()
    model.hf_model.to(torch.bfloat16)
    model.adapter.forget_weights()
    monkeypatch.setattr(forward, "FAST_ATTENTION_FROM_TOKENS", 16)
    batch = _prompts([60, 41], model.shape.vocab_size)
    ablation = Ablation.of([AttentionIndex(2, h, d, p) for h in range(4) for d in range(8) for p in (7, 30)], scale=-20.0)
    fast = last_logits(model, batch, ablation) - last_logits(model, batch)
    eager = _eager_whole(model, batch, [ablation]) - _eager_whole(model, batch, [Ablation()])
    assert (fast - eager).abs().max() < 0.1 * eager.abs().max(), ((fast - eager).abs().max(), eager.abs().max())
