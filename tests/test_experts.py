"""Mixture-of-experts FFNs (docs/method.md §1): the chosen experts' coefficients against the definition, expert
neurons and whole experts through interventions, the index types' text and tables, and the refusals."""

from __future__ import annotations

import json

import pytest
import torch

from neuron_attribution import UserError, attribute
from neuron_attribution.model.interventions import Ablation, ablated, last_logits
from neuron_attribution.model.trace import trace_token_ids
from neuron_attribution.neurons import ExpertIndex, FfnIndex, as_index, parse_neuron
from neuron_attribution.pipelines.projection import neuron_vector

from . import reference as ref
from .conftest import tiny_family
from .tiny_families import FAMILIES

MIXTURES = [name for name, family in FAMILIES.items() if family.block.experts is not None]
IDS = [5, 17, 3, 99, 42, 7, 250]


@pytest.fixture(scope="module", params=MIXTURES)
def mixture(request):
    return tiny_family(request.param)


def test_five_mixtures_are_registered():
    assert set(MIXTURES) >= {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe"}


def test_coefficients_follow_the_routers_choice(mixture):
    """At every position: g_e·SiLU(gate·x̂)·(up·x̂) for the experts the model's router chose, zero for the others
    (no value neuron there), the shared expert's times its sigmoid gate; from the Hugging Face parameters."""
    trace = trace_token_ids(mixture, [IDS])[0]
    s = mixture.shape
    for layer in range(s.n_layers):
        for position in range(trace.n_tokens):
            expected = ref.expert_coefficients(mixture, trace, layer, position)
            got = trace.ffn_coefficients[layer, position].double()
            assert torch.allclose(got, expected, atol=1e-5, rtol=1e-4), (layer, position)
            chosen = (got[: s.expert_rows].reshape(s.n_experts, -1) != 0).any(-1)
            assert int(chosen.sum()) == s.experts_per_token


def test_the_shape_declares_the_mixture(mixture):
    s = mixture.shape
    assert (s.n_experts, s.experts_per_token, s.expert_ffn) == (4, 2, 16)
    assert s.shared_ffn == (24 if s.family == "qwen2_moe" else 0)
    assert s.d_ffn == 64 + s.shared_ffn


def test_info_names_the_mixture():
    from neuron_attribution.model.describe import describe_model

    assert describe_model(tiny_family("qwen2_moe"))["block"] == \
        "sequential, mixture-of-experts FFN: 4 experts of 16 neurons, 2 active per token and a shared expert of 24"
    assert describe_model(tiny_family("granitemoe"))["block"] == "sequential, mixture-of-experts FFN: 4 experts of " \
        "16 neurons, 2 active per token, sublayer outputs × 0.4, logits × 0.4"


def test_switching_off_a_whole_expert(mixture):
    """Its every neuron's contribution goes, wherever the router chose it; the router itself is untouched."""
    s = mixture.shape
    before = trace_token_ids(mixture, [IDS])[0]
    expert = int(before.ffn_coefficients[1, -1, : s.expert_rows].reshape(s.n_experts, -1).abs().sum(-1).argmax())
    rows = list(s.expert_row_range(expert))
    with ablated(mixture, Ablation.of([ExpertIndex(1, expert)])):
        after = trace_token_ids(mixture, [IDS])[0]
    assert float(after.ffn_coefficients[1][:, rows].abs().max()) == 0.0
    others = [k for k in range(s.d_ffn) if k not in rows]
    assert torch.allclose(after.ffn_coefficients[1][:, others], before.ffn_coefficients[1][:, others], atol=1e-6)
    removed = before.ffn_coefficients[1, -1, rows].double() @ ref.ffn_values(mixture, 1)[rows]
    assert torch.allclose(ref.raw_ffn_output(mixture, after, 1, -1),
                          ref.raw_ffn_output(mixture, before, 1, -1) - removed, atol=1e-5)


def test_amplifying_an_expert_neuron_moves_the_logits_by_its_contribution():
    """×3 on one expert neuron in the last layer adds twice its vector at the last position: the logits move
    by exactly that vector's logits (the final norm's scale recomputed from the new residual)."""
    model = tiny_family("qwen2_moe")
    s = model.shape
    trace = trace_token_ids(model, [IDS])[0]
    last = s.n_layers - 1
    row = int(trace.ffn_coefficients[last, -1, : s.expert_rows].abs().argmax())
    neuron = s.ffn_index(last, row)
    assert neuron.expert is not None
    with torch.no_grad():
        logits = last_logits(model, [IDS], Ablation.of([neuron], scale=3.0))[0].double()
    added = 2 * ref.ffn_vector(model, trace, last, row, trace.n_tokens - 1)
    residual = trace.final_residual[-1].double() + added
    final = model.hf_model.model.norm
    normed = residual / (residual.pow(2).mean() + ref._eps(final)).sqrt() * final.weight.detach().double()
    expected = model.hf_model.lm_head.weight.detach().double() @ normed
    assert float((expected - trace.logits.double()).abs().max()) > 1e-2  # the change is real
    assert torch.allclose(logits, expected, atol=1e-4)


def test_scoring_reads_only_the_experts_the_router_chose(mixture):
    """Like the forward pass, the top-k's bounds (the products of every neuron's vector) read the value vectors of
    the experts chosen at the last position only: with every other expert's weights poisoned (NaN) after the
    trace, the bounds and the direct parts are unchanged."""
    from neuron_attribution.scoring import value
    from neuron_attribution.scoring.context import value_context

    s = mixture.shape
    trace = trace_token_ids(mixture, [IDS])[0]
    before = value_context(mixture, trace, 11)
    expected = value.ffn_bounds(before), value.ffn_direct_parts(before)
    saved = {}
    with torch.no_grad():
        for layer in range(s.n_layers):
            module = mixture.adapter.experts(layer)
            chosen = trace.ffn_coefficients[layer, -1, : s.expert_rows].reshape(s.n_experts, -1).ne(0).any(-1)
            saved[layer] = module.down_proj.detach().clone()
            module.down_proj[~chosen] = float("nan")
    mixture.adapter.forget_weights()
    try:
        ctx = value_context(mixture, trace, 11)
        assert torch.equal(value.ffn_bounds(ctx), expected[0])
        assert torch.equal(value.ffn_direct_parts(ctx), expected[1])
    finally:
        with torch.no_grad():
            for layer, weights in saved.items():
                mixture.adapter.experts(layer).down_proj.copy_(weights)
        mixture.adapter.forget_weights()


def test_a_module_that_computes_something_else_is_refused():
    """Where Σ coefficient · fc2 does not give back the experts module's output (here a hook changes it), the
    trace stops with a one-line error instead of reading wrong coefficients."""
    model = tiny_family("mixtral")
    handle = model.adapter.experts(1).register_forward_hook(lambda module, args, output: output * 1.5)
    try:
        with pytest.raises(UserError, match=r"^layer 1's experts module \(MixtralExperts\) computes something other "
                                            r"than .*cannot be read exactly$"):
            trace_token_ids(model, [IDS])
    finally:
        handle.remove()


def test_expert_neurons_in_text_json_and_tables(tmp_path):
    assert str(FfnIndex(12, 45, 3)) == "12_e3_45" and parse_neuron("12_e3_45") == FfnIndex(12, 45, 3)
    assert str(ExpertIndex(12, 3)) == "12_e3" and parse_neuron("12_e3") == ExpertIndex(12, 3)
    assert parse_neuron("12_45") == FfnIndex(12, 45) and FfnIndex(12, 45).expert is None
    assert as_index(("expert", 2, 1)) == ExpertIndex(2, 1) and as_index(("ffn", 2, 5, 1)) == FfnIndex(2, 5, 1)
    model = tiny_family("qwen2_moe")
    result = attribute(model, IDS, 11, top_k=30, query_top=5)
    experts = {n.expert for n in result.ffn_neurons}
    assert None in experts and experts - {None}  # routed experts' and the shared expert's neurons both rank
    for n in result.ffn_neurons:
        s = model.shape
        assert 0 <= n.neuron < (s.expert_ffn if n.expert is not None else s.shared_ffn)
        assert torch.equal(neuron_vector(model, n), neuron_vector(model, parse_neuron(str(n.index))))
    data = json.loads(json.dumps(result.to_dict()))
    assert [(n["layer"], n["neuron"], n.get("expert")) for n in data["ffn_neurons"]] == \
        [tuple(n.index) for n in result.ffn_neurons]
    assert [(q["layer"], q["neuron"], q.get("expert")) for q in data["query_neurons"]] == \
        [tuple(q.index) for q in result.query_neurons]
    for q in result.query_neurons:
        model.shape.check(q.index)


def test_neurons_out_of_the_mixture_are_refused():
    model = tiny_family("mixtral")
    for neuron, words in ((FfnIndex(0, 3), "4 experts of 16 neurons, no shared expert"),
                          (FfnIndex(0, 16, 1), "4 experts of 16 neurons"), (ExpertIndex(0, 4), "4 experts")):
        with pytest.raises(UserError, match=f"not a neuron of this model: .*{words}"):
            with ablated(model, Ablation.of([neuron])):
                pass


def test_expert_column_in_the_run_tables_and_none_in_dense_json():
    from types import SimpleNamespace

    from neuron_attribution.results.tables import tables_of

    model = tiny_family("mixtral")
    result = attribute(model, IDS, 11, top_k=6, query_top=4)
    fact = SimpleNamespace(answer="x", type_name="t", source="test", line=1)
    tables = tables_of([(0, fact, result)])
    assert tables["ffn_neurons"].column("expert").to_pylist() == [n.expert for n in result.ffn_neurons]
    assert tables["query_neurons"].column("expert").to_pylist() == [q.expert for q in result.query_neurons]
    assert all(e is not None for e in tables["ffn_neurons"].column("expert").to_pylist())  # no shared expert
    dense = attribute(tiny_family("gemma"), IDS, 11, top_k=3).to_dict()
    assert all("expert" not in n for n in dense["ffn_neurons"])


def test_gpt_oss_is_refused_with_its_reason():
    from transformers import GptOssConfig, GptOssForCausalLM

    from neuron_attribution.model.loaded import LoadedModel

    config = GptOssConfig(hidden_size=32, intermediate_size=16, num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, vocab_size=64, num_local_experts=4,
                          num_experts_per_tok=2)
    with pytest.raises(UserError, match=r"^unsupported architecture 'gpt_oss' \(a mixture-of-experts FFN whose "
                                        r"experts add router-weighted biases .*\); supported: "):
        LoadedModel.from_hf(GptOssForCausalLM(config), name="gpt-oss")


def test_a_whole_experts_score_is_its_summed_contribution(mixture):
    """score_neurons of `l_eE`: the log-probability increase from adding every neuron of the expert at the last
    position (zero for an expert the router did not choose there); its neurons one by one do not add up to it
    (the score is not linear), so the float64 loop adds the vectors first."""
    from neuron_attribution import score_neurons

    s = mixture.shape
    trace = trace_token_ids(mixture, [IDS])[0]
    layer = 1
    last = trace.n_tokens - 1
    active = trace.ffn_coefficients[layer, -1, : s.expert_rows].reshape(s.n_experts, -1).ne(0).any(-1).tolist()
    names = [f"{layer}_e{e}" for e in range(s.n_experts)]
    scored = score_neurons(mixture, IDS, 11, names)
    for expert, chosen in enumerate(active):
        vector = sum(ref.ffn_vector(mixture, trace, layer, row, last) for row in s.expert_row_range(expert))
        expected = ref.increase(mixture, trace, ref.ffn_base(mixture, trace, layer), vector, 11)
        assert scored.scores[0][expert] == pytest.approx(expected, abs=1e-5)
        if not chosen:
            assert scored.scores[0][expert] == pytest.approx(0.0, abs=1e-6)
    assert scored.to_dict()["neurons"] == names
    with pytest.raises(UserError, match="a whole expert has no single vector: 1_e0"):
        neuron_vector(mixture, ExpertIndex(1, 0))


def test_batches_and_long_records_read_the_same_coefficients(monkeypatch):
    """Prompts traced together (padded) and a prompt whose record is kept at its last position only (the
    experts' coefficients computed for the kept rows alone) give the coefficients of a prompt traced alone."""
    import neuron_attribution.model.trace as trace_module

    model = tiny_family("qwen2_moe")
    alone = [trace_token_ids(model, [ids])[0] for ids in (IDS, IDS[:4])]
    together = trace_token_ids(model, [IDS, IDS[:4]])
    for one, other in zip(alone, together):
        assert torch.allclose(one.ffn_coefficients, other.ffn_coefficients, atol=1e-6)
    monkeypatch.setattr(trace_module, "FULL_RECORD_BYTES", 1)
    kept = trace_token_ids(model, [IDS], positions=[2])[0]
    assert kept.kept_positions.tolist() == [2, len(IDS) - 1]
    assert torch.allclose(kept.ffn_coefficients, alone[0].ffn_coefficients[:, [2, -1]], atol=1e-6)


def test_one_batch_carries_a_different_expert_intervention_per_prompt():
    from neuron_attribution.model.interventions import last_logits_each

    model = tiny_family("mixtral")
    ablations = [Ablation.of([ExpertIndex(1, 0), FfnIndex(0, 3, 2)]), Ablation.of([ExpertIndex(0, 1)], scale=2.5)]
    prompts = [IDS, IDS[:5]]
    together = last_logits_each(model, prompts, ablations)
    for prompt, ablation, row in zip(prompts, ablations, together):
        assert torch.allclose(row, last_logits(model, [prompt], ablation)[0], atol=1e-5)
    assert not torch.allclose(together[0], last_logits(model, [IDS])[0], atol=1e-3)  # the interventions bite


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "olmoe"])
def test_bfloat16_mixture_is_exact(family, monkeypatch):
    """In bfloat16 the experts module rounds its own output; the check allows for that and still reads the
    experts, and every neuron's and head's score equals the float64 loop over the bfloat16 weights and
    activations (tests/test_families.py's full check, as for the dense bfloat16 families). Expert matrices are
    read in float32 a chunk of 3 rows at a time here, so that every chunked path (bounds included) is taken."""
    from neuron_attribution.model import weights

    from .test_bfloat16 import ATOL, in_bfloat16
    from .test_families import check_every_neuron_and_head

    model = in_bfloat16(tiny_family(family))
    monkeypatch.setattr(weights, "CHUNK_BYTES", 3 * 4 * model.shape.d_model)
    assert next(model.hf_model.parameters()).dtype == torch.bfloat16
    _, result = check_every_neuron_and_head(model, IDS, 11, ATOL)
    assert len(result.ffn_neurons) > 5


def test_nested_interventions_multiply_as_for_a_dense_ffn():
    """×2 inside ×3 on the same expert is ×6, switching off twice is switching off once, and the trace under
    them records the coefficients the experts effectively used."""
    model = tiny_family("mixtral")
    expert = ExpertIndex(1, 2)
    with ablated(model, Ablation.of([expert], scale=2.0)), ablated(model, Ablation.of([expert], scale=3.0)):
        nested = last_logits(model, [IDS])[0]
        traced = trace_token_ids(model, [IDS])[0]
    assert torch.allclose(nested, last_logits(model, [IDS], Ablation.of([expert], scale=6.0))[0], atol=1e-5)
    before = trace_token_ids(model, [IDS])[0]
    rows = list(model.shape.expert_row_range(2))
    assert float(before.ffn_coefficients[1][:, rows].abs().sum()) > 0  # the router chose it somewhere
    assert torch.allclose(traced.ffn_coefficients[1][:, rows], 6 * before.ffn_coefficients[1][:, rows], atol=1e-5)
    with ablated(model, Ablation.of([expert])), ablated(model, Ablation.of([expert])):
        twice = last_logits(model, [IDS])[0]
    assert torch.allclose(twice, last_logits(model, [IDS], Ablation.of([expert]))[0], atol=1e-6)
    assert model.adapter.experts(1)._forward_hooks == {}  # every hook removed on the way out
