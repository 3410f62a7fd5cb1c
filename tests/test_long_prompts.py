"""Long prompts (#22): one pass under fast attention with the last query's row and output from the family's eager
attention in the same pass (or, for a family without that function, the prefix under fast attention and the last
token eagerly over the KV cache), per-position data kept at the last position only. The scores must equal the
short path's: the whole prompt in one eager pass, every position kept."""

from __future__ import annotations

import pytest
import torch

import neuron_attribution as na
from neuron_attribution.model import forward
from neuron_attribution.model import trace as trace_module
from neuron_attribution.model.forward import attention_path, has_fast_attention, traces_in_one_pass
from neuron_attribution.model.trace import PositionsNotKept, trace_token_ids, with_positions

from .conftest import TINY_VOCAB, tiny_family, tiny_gpt2, tiny_llama
from .test_trace import check_attention_neurons, check_ffn_neurons, check_readout, check_residual_sum
from .tiny_families import ALL_VARIANTS

LONG = 40  # traced alone (its record forced over the limit), past the tiny Gemma 3's sliding window of 4


def _models():
    yield "llama", tiny_llama()
    yield "gpt2", tiny_gpt2()
    for family in ("gemma3_text", "gemma2", "gptj", "phi3", "olmo2"):
        yield family, tiny_family(family)


MODELS = dict(_models())


@pytest.fixture
def long_ids() -> list[int]:
    return torch.randint(0, TINY_VOCAB, (LONG,), generator=torch.Generator().manual_seed(11)).tolist()


def short_path(monkeypatch, model, ids: list[int]):
    """The reference: one eager pass over the whole prompt, every position kept."""
    with monkeypatch.context() as patch:
        patch.setattr(trace_module, "FAST_ATTENTION_FROM_TOKENS", 10**9)
        patch.setattr(trace_module, "FULL_RECORD_BYTES", 2**62)
        return trace_token_ids(model, [ids])[0]


def long_path(monkeypatch, model, ids: list[int]):
    with monkeypatch.context() as patch:
        patch.setattr(trace_module, "FULL_RECORD_BYTES", 0)
        return trace_token_ids(model, [ids])[0]


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-5) -> bool:
    return float((a.double() - b.double()).abs().max()) <= tolerance * max(1.0, float(b.double().abs().max()))


def _two_passes(monkeypatch, model, ids: list[int]):
    """The fallback path: the prefix under SDPA with a KV cache, then the last token eagerly over it."""
    with monkeypatch.context() as patch:
        patch.setattr(trace_module, "traces_in_one_pass", lambda model: False)
        return long_path(monkeypatch, model, ids)


def assert_same_last_position(long, reference) -> None:
    """The long trace's record at the last position, attention row and value states equal the eager pass's."""
    assert _close(long.attention_weights, reference.attention_weights)
    assert _close(long.value_states, reference.value_states)
    for name in ("layer_inputs", "attention_outputs", "ffn_outputs", "ffn_coefficients", "final_residual"):
        assert _close(getattr(long, name)[..., -1:, :], getattr(reference, name)[..., -1:, :]), name
    assert _close(long.logits, reference.logits, 1e-4)


@pytest.mark.parametrize("family", list(MODELS) + ["llama, two passes", "gemma3_text, two passes"])
def test_long_trace_equals_one_eager_pass(monkeypatch, family, long_ids):
    model = MODELS[family.split(",")[0]]
    traced = _two_passes if family.endswith("two passes") else long_path
    reference, long = short_path(monkeypatch, model, long_ids), traced(monkeypatch, model, long_ids)
    assert reference.kept_positions is None
    assert long.kept_positions.tolist() == [LONG - 1]
    assert long.layer_inputs.shape[1] == 1 and long.ffn_coefficients.shape[1] == 1
    assert_same_last_position(long, reference)
    # The decomposition holds on the long trace itself, against float64 loops.
    check_residual_sum(long)
    if model.shape.post_norms:
        # Behind post-norms a neuron's vector in the residual is its coefficient times the norm's frozen scale
        # there times its residual direction (fc2 ⊙ γ): the FFN neurons rebuild the recorded output with those.
        check_ffn_neurons_behind_post_norms(model, long)
        check_attention_neurons_behind_post_norms(model, long)
        assert long.ffn_output_scales.shape[1] == 1 and _close(long.ffn_output_scales[:, -1:],
                                                                reference.ffn_output_scales[:, -1:])
        return
    check_ffn_neurons(model, long)
    check_attention_neurons(model, long)
    check_readout(model, long)


def check_attention_neurons_behind_post_norms(model, trace) -> None:
    """Every attention neuron (head j, dim n, source p) at the last position: α·v times the post-norm's scale,
    along W_O[j, n] ⊙ γ_post, a loop over heads and source positions in float64."""
    shape = model.shape
    scales = trace.attention_output_scales[:, -1].double()
    for layer, directions in enumerate(model.adapter.output_weight_stack.layers):
        rows = torch.cat([block for _, block in directions.chunks()]).double()  # (H·d_h, d)
        coefficients = torch.zeros(shape.n_heads * shape.head_dim, dtype=torch.float64)
        for head in range(shape.n_heads):
            for position in range(trace.n_tokens):
                alpha = trace.attention_weights[layer, head, position].double()
                value = trace.value_states[layer, position, shape.kv_head_of(head)].double()
                coefficients[head * shape.head_dim:(head + 1) * shape.head_dim] += alpha * value
        rebuilt = scales[layer] * (coefficients @ rows)
        recorded = trace.attention_outputs[layer, -1].double()
        assert float((rebuilt - recorded).norm() / recorded.norm()) < 1e-5, layer


def check_ffn_neurons_behind_post_norms(model, trace) -> None:
    coefficients = trace.ffn_residual_coefficients(trace.n_tokens - 1).double()  # (L, N): m · post-norm scale
    for layer, directions in enumerate(model.adapter.ffn_value_stack.layers):
        rows = torch.cat([block for _, block in directions.chunks()]).double()  # (N, d): fc2 ⊙ γ_post
        rebuilt = coefficients[layer] @ rows
        recorded = trace.ffn_outputs[layer, -1].double()
        assert float((rebuilt - recorded).norm() / recorded.norm()) < 1e-5, layer


@pytest.mark.parametrize("family", [f for f in ALL_VARIANTS if f not in MODELS])
def test_one_pass_trace_equals_one_eager_pass_in_every_family(monkeypatch, family, long_ids):
    """Every family that can switch to SDPA is traced in one pass under `LAST_ROW_ATTENTION` (its modelling file
    has the eager function it calls); the last position's record, the attention row and the value states equal
    one eager pass over the whole prompt, and the residual still decomposes."""
    model = tiny_family(family)
    if not has_fast_attention(model):
        assert not traces_in_one_pass(model)
        return
    assert traces_in_one_pass(model), family
    switched = []
    with monkeypatch.context() as patch:
        patch.setattr(trace_module, "attention_implementation",
                      lambda model, name: switched.append(name) or forward.attention_implementation(model, name))
        long = long_path(monkeypatch, model, long_ids)
    assert switched == [forward.LAST_ROW_ATTENTION]
    reference = short_path(monkeypatch, model, long_ids)
    assert_same_last_position(long, reference)
    check_residual_sum(long)


def test_sliding_window_rows_cover_only_the_window(monkeypatch, long_ids):
    """Gemma 3's local layers cache only the window; the row before it is zero, as in the eager pass."""
    model = MODELS["gemma3_text"]
    long = long_path(monkeypatch, model, long_ids)
    window = model.hf_model.config.sliding_window
    assert float(long.attention_weights[0, :, : LONG - window].abs().max()) == 0.0
    assert float(long.attention_weights[0, :, LONG - window:].sum(-1).sub(1).abs().max()) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2"])
def test_long_prompt_scores_equal_short_path_scores(monkeypatch, family, long_ids):
    """Value neurons, heads, layers and query neurons (through both paths, so the query step traces its
    source positions again) agree with the short path's."""
    model = MODELS[family]
    options = dict(top_k=15, query_top=8, query_via="both")
    with monkeypatch.context() as patch:
        patch.setattr(trace_module, "FAST_ATTENTION_FROM_TOKENS", 10**9)
        patch.setattr(trace_module, "FULL_RECORD_BYTES", 2**62)
        reference = na.attribute(model, long_ids, **options)
    with monkeypatch.context() as patch:
        patch.setattr(trace_module, "FULL_RECORD_BYTES", 0)
        long = na.attribute(model, long_ids, **options)
    assert any(n.position != LONG - 1 for n in long.attention_neurons[:8])  # the query step needed a retrace
    for kind in ("ffn_neurons", "attention_neurons", "query_neurons"):
        got, want = getattr(long, kind), getattr(reference, kind)
        assert [n.score for n in got] == pytest.approx([n.score for n in want], rel=1e-4, abs=1e-6), kind
    assert [(n.layer, n.neuron) for n in long.ffn_neurons] == [(n.layer, n.neuron) for n in reference.ffn_neurons]
    assert ([(n.layer, n.head, n.dim, n.position) for n in long.attention_neurons]
            == [(n.layer, n.head, n.dim, n.position) for n in reference.attention_neurons])
    assert long.layers.ffn == pytest.approx(reference.layers.ffn, rel=1e-4, abs=1e-6)
    assert [h.score for h in long.heads] == pytest.approx([h.score for h in reference.heads], rel=1e-4, abs=1e-6)


def test_positions_not_kept_are_refused_then_traced_again(monkeypatch, long_ids):
    model = MODELS["llama"]
    long = long_path(monkeypatch, model, long_ids)
    with pytest.raises(PositionsNotKept):
        long.layer_input(0, 3)
    lengths = []
    counter = model.hf_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    retraced = []
    try:
        with monkeypatch.context() as patch:
            patch.setattr(trace_module, "FULL_RECORD_BYTES", 0)
            patch.setattr(trace_module, "trace_token_ids",
                          lambda *args, **kwargs: retraced.extend(trace_token_ids(*args, **kwargs)) or retraced)
            again = with_positions(model, long, [3, 30])
    finally:
        counter.remove()
    assert sum(lengths) == 31  # the prompt up to position 30 only, not the whole prompt again
    assert retraced[0].value_states.numel() == 0  # the prompt's own cover them: the prefix's are not recorded
    assert again.kept_positions.tolist() == [3, 30, LONG - 1]
    reference = short_path(monkeypatch, model, long_ids)
    for name in ("layer_inputs", "attention_outputs", "ffn_outputs", "ffn_coefficients"):
        assert _close(getattr(again, name), getattr(reference, name)[:, [3, 30, LONG - 1]]), name
    assert _close(again.final_residual, reference.final_residual[[3, 30, LONG - 1]])
    assert _close(again.layer_input(2, 30), reference.layer_inputs[2, 30])
    assert _close(again.ffn_residual_coefficients(torch.tensor([3, 30])), reference.ffn_coefficients[:, [3, 30]])
    assert again.value_states is long.value_states and again.logits is long.logits  # the prompt's own record
    assert with_positions(model, again, [30]) is again


def test_families_without_switchable_fast_attention_are_named():
    assert has_fast_attention(MODELS["llama"]) and has_fast_attention(MODELS["gemma3_text"])
    assert not has_fast_attention(MODELS["gemma2"])  # SDPA cannot soft-cap attention
    assert not has_fast_attention(MODELS["gptj"])
    assert "eager attention over the whole prompt" in attention_path(MODELS["gemma2"])


def test_short_prompts_keep_every_position(long_ids):
    model = MODELS["llama"]
    traces = trace_token_ids(model, [long_ids[:5], long_ids[:9]])
    assert [t.kept_positions for t in traces] == [None, None]
    assert traces[1].layer_inputs.shape[1] == 9


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_attention_search_by_position_blocks_equals_the_whole_bounds(monkeypatch, family, long_ids):
    """A long prompt's attention neurons searched by blocks of source positions (#37 item 5) find the same top-k,
    scores and order as the search over every neuron's bound; Gemma 2's soft-capped bounds take the other
    branch (absolute coefficients)."""
    from neuron_attribution.scoring import value

    model = MODELS[family]
    options = dict(top_k=40, query_top=0)
    whole = na.attribute(model, long_ids, **options)
    with monkeypatch.context() as patch:
        patch.setattr(value, "DENSE_ATTENTION_BOUNDS_BYTES", 0)
        patch.setattr(value, "POSITION_BLOCK", 16)  # 40 positions: two blocks and a shorter third
        searched = []
        original = value.attention_bound_search
        patch.setattr(value, "attention_bound_search",
                      lambda ctx, k: searched.append(original(ctx, k)) or searched[-1])
        blocked = na.attribute(model, long_ids, **options)
    assert isinstance(searched[0], value.BlockBounds)
    assert ([(n.layer, n.head, n.dim, n.position) for n in blocked.attention_neurons]
            == [(n.layer, n.head, n.dim, n.position) for n in whole.attention_neurons])
    assert [n.score for n in blocked.attention_neurons] == [n.score for n in whole.attention_neurons]
    assert blocked.evaluated == whole.evaluated


def test_a_long_pass_gives_freed_memory_back_after_each_sublayer(monkeypatch, long_ids):
    """From TRIMMED_FROM_TOKENS tokens the trace and an intervention's pass return the heap's free pages after every
    attention sublayer and every block (glibc fragments otherwise: 2.1–2.7 GB above the model at 8,192 tokens
    against 0.4 GB trimmed), and the trace is unchanged by it; shorter passes are left alone."""
    from neuron_attribution.model import heap
    from neuron_attribution.model.interventions import last_logits

    model = MODELS["llama"]
    calls = []
    monkeypatch.setattr(heap, "_malloc_trim", lambda: (lambda pad: calls.append(pad)))
    untrimmed = long_path(monkeypatch, model, long_ids)
    assert calls == []
    monkeypatch.setattr(heap, "TRIMMED_FROM_TOKENS", LONG)
    trimmed = long_path(monkeypatch, model, long_ids)
    assert calls == [0] * (2 * model.shape.n_layers)
    assert torch.equal(trimmed.attention_weights, untrimmed.attention_weights)
    assert torch.equal(trimmed.final_residual, untrimmed.final_residual)
    calls.clear()
    monkeypatch.setattr(forward, "FAST_ATTENTION_FROM_TOKENS", 8)  # interventions take their long-prompt path
    last_logits(model, [long_ids])
    assert len(calls) == 2 * model.shape.n_layers
    calls.clear()
    last_logits(model, [long_ids[: LONG - 1]])
    assert calls == []
    monkeypatch.undo()
    heap.give_back_freed_memory()  # the real one: glibc's here, nothing where there is none


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "gemma2"])
def test_value_states_kept_in_a_file_give_the_same_scores(monkeypatch, family, long_ids):
    """Past VALUES_IN_MEMORY_BYTES a CPU trace writes its value states to a file as the pass makes them (#37 item
    5): read back, every layer equals the in-memory record, gathers read the same numbers, and value, head and
    query scores (with the query step's retrace) equal the in-memory path's exactly."""
    from neuron_attribution.model import value_store

    model = MODELS[family]
    options = dict(top_k=15, query_top=8, query_via="both")
    in_memory = long_path(monkeypatch, model, long_ids)
    with monkeypatch.context() as patch:
        patch.setattr(trace_module, "FULL_RECORD_BYTES", 0)
        reference = na.attribute(model, long_ids, **options)
        patch.setattr(value_store, "VALUES_IN_MEMORY_BYTES", 0)
        in_file = long_path(monkeypatch, model, long_ids)
        from_file = na.attribute(model, long_ids, **options)
    stored = in_file.value_states
    assert isinstance(stored, value_store.ValuesInFile) and stored.shape == in_memory.value_states.shape
    for layer in range(model.shape.n_layers):
        assert torch.equal(stored[layer], in_memory.value_states[layer])
    layers, positions = torch.tensor([1, 0, 1, 1]), torch.tensor([39, 0, 5, 17])
    kv, dims = torch.tensor([1, 0, 0, 1]), torch.tensor([7, 3, 0, 2])
    assert torch.equal(stored[layers, positions, kv, dims], in_memory.value_states[layers, positions, kv, dims])
    assert torch.equal(stored[1, :, 1, 4], in_memory.value_states[1, :, 1, 4])
    for kind in ("ffn_neurons", "attention_neurons", "query_neurons", "heads"):
        assert [n.score for n in getattr(from_file, kind)] == [n.score for n in getattr(reference, kind)], kind
    assert [(n.layer, n.head, n.dim, n.position) for n in from_file.attention_neurons] == \
        [(n.layer, n.head, n.dim, n.position) for n in reference.attention_neurons]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "phi3"])
def test_one_pass_equals_two_passes_in_bfloat16(monkeypatch, family, long_ids):
    """In bfloat16 the one-pass trace records what the two passes recorded (SDPA for the prompt, eager for the last
    query over the same keys and values): bitwise in the first layer, whose keys and values both read the same
    embeddings. Past it, SDPA's rounding of the prefix's rows can depend on how many queries it runs (bitwise equal
    on a CPU with AVX-512, a few bfloat16 steps apart on an AVX2 one), so there the two traces must be closer to
    each other than the two passes are to one eager pass: within the rounding the path already had."""
    from .test_bfloat16 import in_bfloat16

    model = in_bfloat16(tiny_llama() if family == "llama" else tiny_family(family))
    one, two = long_path(monkeypatch, model, long_ids), _two_passes(monkeypatch, model, long_ids)
    eager = short_path(monkeypatch, model, long_ids)
    assert one.value_states.dtype == torch.float32 and next(model.hf_model.parameters()).dtype == torch.bfloat16
    for name in ("attention_weights", "value_states", "attention_outputs"):
        assert torch.equal(getattr(one, name)[0], getattr(two, name)[0]), name
    for name in ("attention_weights", "value_states", "final_residual", "logits", "attention_outputs"):
        ones, twos, eagers = (getattr(trace, name).double() for trace in (one, two, eager))
        if name in ("final_residual", "attention_outputs"):
            eagers = eagers[..., -1:, :]  # the eager pass keeps every position, the long traces the last
        rounding = float((twos - eagers).abs().max())
        assert rounding > 0, name  # the bfloat16 rounding is there to compare with
        assert float((ones - twos).abs().max()) <= rounding, name
