"""The two parts of a value neuron's score (docs/method.md §2, Imp = c·δ_w − ΔLSE), the target's rank among the
tokens a neuron pushes, the tokens it suppresses, and ranking by the direct part: against float64 loops over
the definitions (tests/reference.py), on a LayerNorm model, a SwiGLU one, a soft-capped one and a parallel one."""

from __future__ import annotations

import pytest
import torch

from neuron_attribution import UserError, attribute
from neuron_attribution.model.prompts import token_texts
from neuron_attribution.model.trace import trace_token_ids
from neuron_attribution.results.attribution import Attribution

from . import reference as ref
from .conftest import tiny_family, tiny_gpt2, tiny_llama

IDS = [5, 17, 3, 99, 42, 7, 250]
TARGET = 11
MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma2": lambda: tiny_family("gemma2"),
          "phi-parallel": lambda: tiny_family("phi")}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    return MODELS[request.param]()


def _reference_parts(model, trace, base, vector, target):
    """(direct, normaliser change, push rank, the 5 most suppressed ids) by the definitions, in float64. The
    rank and the suppressed tokens are read in the contribution c·δ itself, before any soft-capping."""
    before = ref.final_logits(model, trace, base.double())
    after = ref.final_logits(model, trace, base.double() + vector)
    direct = float(after[target] - before[target])
    normaliser = float(torch.logsumexp(after, -1) - torch.logsumexp(before, -1))
    changes = ref.final_logits(model, trace, vector, capped=False) - ref.final_logits(model, trace, 0 * vector,
                                                                                       capped=False)
    rank = 1 + sum(int(changes[v] > changes[target]) for v in range(len(changes)))
    near = sum(int(abs(changes[v] - changes[target]) < 1e-4) for v in range(len(changes)))  # rounding may swap these
    return direct, normaliser, rank, near, torch.argsort(changes)[:5].tolist()


def test_parts_rank_and_suppressed_tokens(model):
    result = attribute(model, IDS, TARGET, top_k=6, query_top=0)
    trace = trace_token_ids(model, [IDS])[0]
    last = trace.n_tokens - 1
    checked = [(n, ref.ffn_base(model, trace, n.layer), ref.ffn_vector(model, trace, n.layer, n.neuron, last))
               for n in result.ffn_neurons]
    checked += [(n, trace.layer_inputs[n.layer, -1],
                 ref.attention_neuron_vector(model, trace, n.layer, n.head, n.dim, n.position))
                for n in result.attention_neurons]
    for neuron, base, vector in checked:
        direct, normaliser, rank, near, suppressed = _reference_parts(model, trace, base, vector, TARGET)
        assert neuron.direct_score == pytest.approx(direct, abs=1e-5)
        assert neuron.normaliser_change == pytest.approx(normaliser, abs=1e-5)
        assert neuron.direct_score - neuron.normaliser_change == pytest.approx(neuron.score, abs=1e-6)
        assert abs(neuron.target_push_rank - rank) < near
        assert neuron.suppressed_tokens[:5] == token_texts(model, suppressed)
        vocabulary = model.adapter.unembedding[0].shape[0]
        assert result.vocab_size == vocabulary
        assert neuron.wins_by_suppressing(vocabulary) == (neuron.score > 0 and rank > vocabulary / 2)
    assert result.suppressing_neurons() == [n for n, _, _ in checked if n.score > 0 and
                                            n.target_push_rank > result.vocab_size / 2]


def test_ranking_by_the_direct_part_is_the_dense_ranking(model):
    s = model.shape
    result = attribute(model, IDS, TARGET, top_k=8, query_top=0, rank_by="direct")
    trace = trace_token_ids(model, [IDS])[0]
    last = trace.n_tokens - 1

    def direct(base, vector):
        return float(ref.final_logits(model, trace, base.double() + vector)[TARGET]
                     - ref.final_logits(model, trace, base.double())[TARGET])

    ffn = {(l, k): direct(ref.ffn_base(model, trace, l), ref.ffn_vector(model, trace, l, k, last))
           for l in range(s.n_layers) for k in range(s.d_ffn)}
    attention = {(l, j, n, p): direct(trace.layer_inputs[l, -1], ref.attention_neuron_vector(model, trace, l, j, n, p))
                 for l in range(s.n_layers) for j in range(s.n_heads) for n in range(s.head_dim)
                 for p in range(trace.n_tokens)}
    for found, dense, key in ((result.ffn_neurons, ffn, lambda n: (n.layer, n.neuron)),
                              (result.attention_neurons, attention, lambda n: (n.layer, n.head, n.dim, n.position))):
        best = sorted(dense.values(), reverse=True)[: len(found)]
        assert [n.direct_score for n in found] == pytest.approx(best, abs=1e-5)
        assert [dense[key(n)] for n in found] == pytest.approx(best, abs=1e-5)
    assert result.rank_by == "direct"
    by_score = attribute(model, IDS, TARGET, top_k=8, query_top=0)
    assert [n.score for n in by_score.ffn_neurons] == sorted(n.score for n in by_score.ffn_neurons)[::-1]


def test_contrast_has_no_normaliser_and_the_parts_survive_json(tmp_path):
    model = tiny_llama()
    result = attribute(model, IDS, TARGET, contrast=40, top_k=5, query_top=0)
    for n in [*result.ffn_neurons, *result.attention_neurons]:
        assert n.direct_score == pytest.approx(n.score) and n.normaliser_change == 0 and n.target_push_rank is None
        assert n.suppressed_tokens
    plain = attribute(model, IDS, TARGET, top_k=5, query_top=0, rank_by="direct")
    plain.save(tmp_path / "a.json")
    back = Attribution.load(tmp_path / "a.json")
    assert back.ffn_neurons == plain.ffn_neurons and back.attention_neurons == plain.attention_neurons
    assert back.rank_by == "direct"
    old = plain.to_dict()
    for n in old["ffn_neurons"] + old["attention_neurons"]:
        for key in ("direct_score", "normaliser_change", "target_push_rank", "suppressed_tokens"):
            n.pop(key)
        n.pop("promoted_tokens", None) if "head" in n else None
    older = Attribution.from_dict(old)  # written before the parts existed
    assert older.ffn_neurons[0].direct_score is None and older.ffn_neurons[0].wins_by_suppressing(1000) is None
    assert older.ffn_neurons[0].suppressed_tokens == plain.ffn_neurons[0].suppressed_tokens


def test_multi_token_parts_are_sums_of_the_single_token_parts():
    model = tiny_llama()
    prompt, answer = IDS[:5], [11, 40, 7]
    s = model.shape
    everything = s.n_layers * s.d_ffn
    result = attribute(model, prompt, answer, top_k=6, answer_tokens="all", query_top=0)
    singles = [attribute(model, prompt + answer[:i], token, top_k=everything, query_top=0)
               for i, token in enumerate(answer)]
    for n in result.ffn_neurons:
        parts = [next(m for m in single.ffn_neurons if m.index == n.index) for single in singles]
        assert n.direct_score == pytest.approx(sum(p.direct_score for p in parts), abs=1e-5)
        assert n.target_push_rank == parts[0].target_push_rank
        assert n.suppressed_tokens == parts[0].suppressed_tokens
    for n in result.attention_neurons:
        assert n.direct_score is not None and n.target_push_rank >= 1 and len(n.suppressed_tokens) == 10
    with pytest.raises(UserError, match="rank_by='direct' applies to the first answer token"):
        attribute(model, prompt, answer, answer_tokens="all", rank_by="direct")
    with pytest.raises(UserError, match="rank_by must be one of score, direct"):
        attribute(model, prompt, answer[0], rank_by="logit")


def test_the_graph_holds_the_chosen_circuit(tmp_path):
    model = tiny_llama()
    result = attribute(model, IDS, TARGET, top_k=10, query_via="both")
    graph = result.graph(top=6)
    nodes = {n["id"]: n for n in graph["nodes"]}
    values = sorted([*result.ffn_neurons, *result.attention_neurons], key=lambda n: -abs(n.score))[:6]
    value_ids = {f"ffn:{n.layer}_{n.neuron}" if hasattr(n, "neuron") else
                 f"attention:{n.layer}_{n.head}_{n.dim}@{n.position}" for n in values}
    assert {i for i, n in nodes.items() if n["kind"] in ("ffn", "attention")} == value_ids
    assert sum(n["kind"] == "token" for n in nodes.values()) == len(IDS) and nodes["answer"]["token_id"] == TARGET
    for link in graph["links"]:
        assert link["source"] in nodes and link["target"] in nodes
        if link["kind"] == "value":
            assert link["target"] == "answer" and link["weight"] == nodes[link["source"]]["score"]
        elif link["kind"] == "source":
            assert nodes[link["target"]]["position"] == nodes[link["source"]]["position"]
        else:  # a query neuron's share, as the attribution's links hold it
            query, value = nodes[link["source"]]["name"], nodes[link["target"]]["name"]
            assert link["weight"] == next(l.share for l in result.query_links if (l.query, l.value) == (query, value))
    assert any(link["kind"] == "query" for link in graph["links"])
    by_share = result.graph(share=0.5)
    chosen = [n for n in by_share["nodes"] if n["kind"] in ("ffn", "attention")]
    total = sum(abs(n.score) for n in [*result.ffn_neurons, *result.attention_neurons])
    assert sum(abs(n["score"]) for n in chosen) >= 0.5 * total > sum(abs(n["score"]) for n in chosen[:-1])
    with pytest.raises(UserError, match="share must be in"):
        result.graph(share=1.5)


def test_heads_and_layers_have_the_two_parts_and_every_neurons_direct_part_is_public(model):
    """#35 item 13: heads and layers carry direct and −ΔLSE like value neurons (a head: its output vector added to
    its layer's base; a layer: its sublayer output added to its base), against the float64 definitions; and
    `direct_parts` gives every neuron's direct part, equal to the definition and to attribute's."""
    from neuron_attribution import direct_parts

    trace = trace_token_ids(model, [IDS])[0]
    result = attribute(model, IDS, TARGET, top_k=6, query_top=0)
    s = model.shape
    for head in result.heads[:4]:
        vector = sum(ref.attention_neuron_vector(model, trace, head.layer, head.head, n, p)
                     for n in range(s.head_dim) for p in range(len(IDS)))
        direct, normaliser, *_ = _reference_parts(model, trace, trace.layer_inputs[head.layer, -1], vector, TARGET)
        assert head.direct_score == pytest.approx(direct, abs=1e-5)
        assert head.normaliser_change == pytest.approx(normaliser, abs=1e-5)
        assert head.direct_score - head.normaliser_change == pytest.approx(head.score, abs=1e-5)
    for layer in (0, s.n_layers - 1):
        attention_base = trace.layer_inputs[layer, -1]
        direct, _, *_ = _reference_parts(model, trace, attention_base, trace.attention_outputs[layer, -1].double(),
                                         TARGET)
        assert result.layers.attention_direct[layer] == pytest.approx(direct, abs=1e-5)
        ffn_base = attention_base if ref.is_parallel(model) else ref.ffn_base(model, trace, layer)
        direct, _, *_ = _reference_parts(model, trace, ffn_base, trace.ffn_outputs[layer, -1].double(), TARGET)
        assert result.layers.ffn_direct[layer] == pytest.approx(direct, abs=1e-5)
    parts = direct_parts(model, IDS, TARGET)
    assert parts.ffn.shape == (s.n_layers, s.d_ffn) and parts.attention.shape == (s.n_layers, s.n_heads, s.head_dim,
                                                                                 len(IDS))
    for n in result.ffn_neurons:
        assert parts.ffn[n.layer, n.neuron] == pytest.approx(n.direct_score, abs=1e-5)
    for n in result.attention_neurons:
        assert parts.attention[n.layer, n.head, n.dim, n.position] == pytest.approx(n.direct_score, abs=1e-5)
    layer, k = s.n_layers - 1, 3
    direct, *_ = _reference_parts(model, trace, ref.ffn_base(model, trace, layer) if not ref.is_parallel(model)
                                  else trace.layer_inputs[layer, -1], ref.ffn_vector(model, trace, layer, k, -1), TARGET)
    assert parts.ffn[layer, k] == pytest.approx(direct, abs=1e-5)


def test_every_attention_neuron_at_every_position_has_its_own_rank_and_projection(model):
    """#37 item 2: scored all at once, an attention neuron's projection and push rank are read once per vector and
    shared by its source positions (the counts above and below the target give either sign's rank): every one,
    at every position, equals the definition read on its own row."""
    result = attribute(model, IDS, TARGET, top_k=10**8, query_top=0)
    trace = trace_token_ids(model, [IDS])[0]
    vocabulary = model.adapter.unembedding[0].shape[0]
    id_of = {text: i for i, text in enumerate(token_texts(model, list(range(vocabulary))))}
    signs = {+1: 0, -1: 0}
    # every fourth of them, in the order they are returned: vectors and positions of all kinds, most positions
    # of a vector reusing what another position's row read
    for neuron in result.attention_neurons[::4]:
        if neuron.coefficient == 0:
            continue
        signs[1 if neuron.coefficient > 0 else -1] += 1
        vector = ref.attention_neuron_vector(model, trace, neuron.layer, neuron.head, neuron.dim, neuron.position)
        _, _, rank, near, _ = _reference_parts(model, trace, trace.layer_inputs[neuron.layer, -1], vector, TARGET)
        assert abs(neuron.target_push_rank - rank) < near, neuron
        # the most suppressed tokens: the five smallest changes c·δ, up to tokens whose changes are nearer than
        # float32 can tell apart (a coefficient of 1e-4 makes many of them so)
        changes = ref.final_logits(model, trace, vector, capped=False) - ref.final_logits(model, trace, 0 * vector,
                                                                                           capped=False)
        ours = changes[[id_of[t] for t in neuron.suppressed_tokens[:5]]]
        assert torch.allclose(ours, changes.sort().values[:5], atol=1e-5, rtol=0), neuron
    assert min(signs.values()) > 10  # both signs, so both counts are used


@pytest.mark.parametrize("width", [49_152, 1_000, 130])
def test_the_two_step_top_k_equals_topk(width):
    """`largest_and_smallest` (the blocks' extremes, then 2k blocks) gives topk's ids, in its order, on rows whose
    largest entries crowd into one block, spread out, or sit in the tail past the last whole block."""
    from neuron_attribution.scoring.projections import largest_and_smallest

    generator = torch.Generator().manual_seed(width)
    rows = torch.randn(6, width, generator=generator)
    rows[1, 64:74] += 50  # ten largest in one block
    rows[2, -3:] += 50  # in the tail (width not a multiple of the block)
    rows[3, 128:138] -= 50  # ten smallest in one block
    for k in (1, 10):
        top, bottom = largest_and_smallest(rows, k)
        assert torch.equal(top, rows.topk(k, dim=-1).indices)
        assert torch.equal(bottom, rows.topk(k, dim=-1, largest=False).indices)


def test_the_json_form_holds_what_dataclasses_asdict_holds():
    """`to_dict` and the run tables turn results into plain data in one pass (results/plain.py): on results with
    every kind of part (query neurons through both paths and their links, contrast, every answer token, an
    expert index, a quantisation residual), the plain data equals `dataclasses.asdict`'s and shares no list or
    dict with the result."""
    import dataclasses

    from neuron_attribution.results.plain import plain_fields
    from neuron_attribution.results.quantization import QuantizationResidual

    mixture = tiny_family("qwen2_moe")
    results = [attribute(tiny_llama(), IDS, TARGET, top_k=40, query_top=6, query_via="both"),
               attribute(tiny_llama(), IDS, TARGET, top_k=5, contrast=40),
               attribute(tiny_gpt2(), IDS, [TARGET, 40], top_k=5, answer_tokens="all", query_top=3),
               attribute(mixture, IDS, TARGET, top_k=8, query_top=3, dense=True)]
    results[0].quantization_residuals = [QuantizationResidual(0, "ffn", 0.5, 1e-3, 4e-3)]
    for result in results:
        expected = {k: v for k, v in dataclasses.asdict(result).items() if k != "dense"}
        plain = plain_fields(result, leave_out=("dense",))
        assert plain == expected and list(plain) == list(expected)
        assert plain["ffn_neurons"][0] is not result.ffn_neurons[0]
        before = len(result.ffn_neurons[0].suppressed_tokens)
        plain["ffn_neurons"][0]["suppressed_tokens"].append("added")
        plain["target"]["id"] = -1
        assert len(result.ffn_neurons[0].suppressed_tokens) == before and result.target.id != -1
    assert any(n.expert is not None for n in results[3].ffn_neurons)
    assert results[0].query_links and results[1].target.contrast and results[2].target.tokens


def test_a_neuron_switched_off_scores_zero_and_shows_its_own_projection():
    """A ReLU FFN (OPT) switches many neurons off exactly (coefficient 0): each scores exactly 0 with a direct part
    of 0, and its promoted and suppressed tokens are still those of its own value vector, the top and bottom of
    U(γ ⊙ centre(fc2)) by the float64 definition (read off δ(u), not off the rounding of an unchanged row)."""
    model = tiny_family("opt")
    result = attribute(model, IDS, TARGET, top_k=10**8, query_top=0)
    trace = trace_token_ids(model, [IDS])[0]
    vocabulary = model.adapter.unembedding[0].shape[0]
    id_of = {text: i for i, text in enumerate(token_texts(model, list(range(vocabulary))))}
    off = [n for n in result.ffn_neurons if n.coefficient == 0]
    assert len(off) > 20 and any(n.coefficient != 0 for n in result.ffn_neurons)
    for neuron in off:
        assert neuron.score == 0.0 and neuron.direct_score == 0.0, neuron
        vector = ref.ffn_value(model, neuron.layer, neuron.neuron).double()
        changes = ref.final_logits(model, trace, vector, capped=False) - ref.final_logits(model, trace, 0 * vector,
                                                                                           capped=False)
        ordered = changes.sort().values
        top = changes[[id_of[t] for t in neuron.promoted_tokens[:5]]]
        bottom = changes[[id_of[t] for t in neuron.suppressed_tokens[:5]]]
        assert torch.allclose(top, ordered.flip(0)[:5], atol=1e-6, rtol=0), neuron
        assert torch.allclose(bottom, ordered[:5], atol=1e-6, rtol=0), neuron
