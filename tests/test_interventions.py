"""Interventions change exactly the targeted neurons and leave the model as it was."""

from __future__ import annotations

import pytest
import torch

from neuron_attribution import UserError
from neuron_attribution.model.interventions import Ablation, ablated
from neuron_attribution.model.trace import trace_token_ids

from .conftest import tiny_llama


def _state(model):
    return {k: v.clone() for k, v in model.hf_model.state_dict().items()}


def test_zeroing_an_ffn_neuron_removes_exactly_its_vector(tiny_model, token_batches):
    ids = token_batches[1]
    before = trace_token_ids(tiny_model, [ids])[0]
    with ablated(tiny_model, Ablation(ffn=[(1, 7)])):
        after = trace_token_ids(tiny_model, [ids])[0]
    values = tiny_model.adapter.layer_weights(1).ffn_values
    expected = before.ffn_outputs[1] - before.ffn_coefficients[1, :, 7:8] * values[7]
    assert torch.allclose(after.ffn_outputs[1], expected, atol=1e-5)
    assert torch.equal(after.layer_inputs[1], before.layer_inputs[1])  # nothing below layer 1 moved
    assert float(after.ffn_coefficients[1, :, 7].abs().max()) == 0.0


def test_zeroing_an_attention_neuron_and_a_head(tiny_model, token_batches):
    ids = token_batches[0]
    s = tiny_model.shape
    before = trace_token_ids(tiny_model, [ids])[0]
    w = tiny_model.adapter.layer_weights(2)
    values = before.value_states[2].repeat_interleave(s.heads_per_kv_head, dim=1)  # (T, H, d_h)
    alpha = before.attention_weights[2]  # (H, T) last row
    with ablated(tiny_model, Ablation(attention=[(2, 1, 3)])):
        after = trace_token_ids(tiny_model, [ids])[0]
    removed = (alpha[1] * values[:, 1, 3]).sum() * w.output_weight[1, 3]
    assert torch.allclose(after.attention_outputs[2, -1], before.attention_outputs[2, -1] - removed, atol=1e-5)
    with ablated(tiny_model, Ablation(heads=[(2, 0)])):
        after = trace_token_ids(tiny_model, [ids])[0]
    head_output = torch.einsum("t,tn,nd->d", alpha[0], values[:, 0], w.output_weight[0])
    assert torch.allclose(after.attention_outputs[2, -1], before.attention_outputs[2, -1] - head_output, atol=1e-5)


def test_position_specific_attention_neuron_under_gqa(token_batches):
    """Head 1 shares KV head 0 with head 0: only head 1's contribution from position 2 may disappear."""
    model = tiny_llama()
    ids = token_batches[1]
    before = trace_token_ids(model, [ids])[0]
    with ablated(model, Ablation(attention_at=[(1, 1, 4, 2)])):
        after = trace_token_ids(model, [ids])[0]
    w = model.adapter.layer_weights(1)
    removed = before.attention_weights[1, 1, 2] * before.value_states[1, 2, 0, 4] * w.output_weight[1, 4]
    assert torch.allclose(after.attention_outputs[1, -1], before.attention_outputs[1, -1] - removed, atol=1e-5)
    assert torch.equal(after.value_states[1], before.value_states[1])


def test_model_is_unchanged_afterwards_even_after_an_exception(tiny_model, token_batches):
    ids = token_batches[3]
    state = _state(tiny_model)
    with torch.no_grad():
        reference = tiny_model.hf_model(torch.tensor([ids])).logits
    with pytest.raises(ZeroDivisionError):
        with ablated(tiny_model, Ablation(ffn=[(0, 1)], attention=[(1, 0, 0)], heads=[(2, 1)],
                                         attention_at=[(0, 1, 1, 0)])):
            1 / 0
    for key, value in _state(tiny_model).items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        assert torch.equal(tiny_model.hf_model(torch.tensor([ids])).logits, reference)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in tiny_model.hf_model.modules())


def test_bad_neurons_are_refused(tiny_model):
    with pytest.raises(UserError, match="not a neuron"):
        with ablated(tiny_model, Ablation(ffn=[(99, 0)])):
            pass


def test_last_logits_under_ablation_equal_single_runs(tiny_model, token_batches):
    from neuron_attribution.model.interventions import last_logits

    ablation = Ablation(ffn=[(2, 3)], heads=[(1, 2)])
    together = last_logits(tiny_model, token_batches, ablation, batch_size=3)
    plain = last_logits(tiny_model, token_batches)
    for row, ids in enumerate(token_batches):
        with ablated(tiny_model, ablation), torch.no_grad():
            alone = tiny_model.hf_model(torch.tensor([ids])).logits[0, -1]
        assert torch.allclose(together[row], alone, atol=1e-5)
    assert not torch.allclose(together, plain, atol=1e-4)


def test_ablation_logits_take_text_from_the_package(real_model):
    """#26 item 9: the README's ablation logits need no internal import and take text as well as token ids."""
    import neuron_attribution as na

    prompt = "The capital of France is"
    ids = real_model.tokenizer(prompt)["input_ids"]
    ablation = na.Ablation(ffn=[(27, 846)])
    by_text = na.last_logits(real_model, [prompt], ablation)
    assert torch.equal(by_text, na.last_logits(real_model, [ids], ablation))
    assert not torch.equal(by_text, na.last_logits(real_model, [prompt]))  # the neuron is switched off
    each = na.last_logits_each(real_model, [prompt, ids], [ablation, na.Ablation()])
    assert torch.allclose(each[0], by_text[0], atol=1e-4)


def test_neurons_are_named_by_their_text_anywhere_the_library_takes_one(tiny_model, token_batches):
    """#35 item 2: `Ablation.of(["1_7", "2_1_3@4"])` is the ablation of those indices (the researcher's call raised
    TypeError), switches exactly that FFN neuron off, and `project` takes the text too."""
    from neuron_attribution import project
    from neuron_attribution.neurons import AttentionIndex, FfnIndex, HeadIndex

    by_text = Ablation.of(["1_7", "2_1_3@4", "2.0"])
    assert by_text == Ablation.of([FfnIndex(1, 7), AttentionIndex(2, 1, 3, 4), HeadIndex(2, 0)])
    assert by_text.ffn == [FfnIndex(1, 7)] and by_text.attention_at == [AttentionIndex(2, 1, 3, 4)]
    assert Ablation.of("1_7") == Ablation.of([FfnIndex(1, 7)])  # one name, not its characters
    ids = token_batches[1]
    before = trace_token_ids(tiny_model, [ids])[0]
    with ablated(tiny_model, Ablation.of(["1_7"])):
        after = trace_token_ids(tiny_model, [ids])[0]
    assert float(after.ffn_coefficients[1, :, 7].abs().max()) == 0.0
    assert torch.equal(after.ffn_coefficients[1, :, 8], before.ffn_coefficients[1, :, 8])
    assert project(tiny_model, "1_7").top_tokens == project(tiny_model, FfnIndex(1, 7)).top_tokens
    with pytest.raises(UserError, match="not a neuron"):
        Ablation.of(["1-7"])
