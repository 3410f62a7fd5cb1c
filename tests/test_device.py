"""Every tensor of the scoring path is made on, or moved to, the device it is meant for (the model's scoring
device): nothing relies on the process's default device. No GPU is needed to show it: every step runs once as
usual and once while the process's default device is `meta`, where a tensor made without a device is a shapeless
placeholder that cannot meet the model's real tensors. Every number must come out the same. The CUDA runs of the
same steps are in tests/test_gpu.py (`pytest -m gpu`)."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import pytest
import torch

from neuron_attribution import (Ablation, attribute, interpret_query_neuron, project, score_neurons,
                                trace_token_ids)
from neuron_attribution.datasets import Fact
from neuron_attribution.model.interventions import last_logits_each
from neuron_attribution.model.prompts import Sentence
from neuron_attribution.pipelines.evaluate import evaluate_sentences
from neuron_attribution.scoring.context import value_context

from .conftest import OTHER_FAMILIES, tiny_family, tiny_gpt2, tiny_llama, tiny_llama_like

PROMPT = [5, 17, 3, 99, 42]


def _tensors(obj):
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            yield value


@contextmanager
def default_device(device: str):
    before = torch.empty(()).device
    torch.set_default_device(device)
    try:
        yield
    finally:
        torch.set_default_device(before)


def _sentences(model) -> list[Sentence]:
    result = []
    for ids, kind in ((PROMPT, "a"), ([9, 8, 7, 6, 5, 4], "b"), ([1, 2, 30], "a")):
        target = int(trace_token_ids(model, [ids])[0].logits.argmax())
        result.append(Sentence(Fact("", "", kind, "test", 0), ids, target))
    return result


def everything(model) -> dict:
    """Each scoring step's numbers, as plain data: attribute (top-k with query neurons over both paths,
    contrast, every answer token, dense), score_neurons, projections, interventions and every evaluate
    protocol with every method (integrated gradients and the random control included)."""
    s = model.shape
    target = int(trace_token_ids(model, [PROMPT])[0].logits.argmax())
    dense = attribute(model, PROMPT, target, top_k=7, dense=True, query_via="both", query_top=4)
    sentences = _sentences(model)
    carried = s.ffn_index(0, 3)
    # integrated gradients need the FFN coefficients at one projection, which a mixture of experts has not
    methods = "all" if s.n_experts else "all,integrated_gradients"
    out = {
        "top_k": attribute(model, PROMPT, target, top_k=9, query_top=5).to_dict(),
        "dense": dense.to_dict(), "dense_ffn": dense.dense.ffn.tolist(),
        "dense_attention": dense.dense.attention.tolist(),
        "contrast": attribute(model, PROMPT, target, top_k=6, contrast=(target + 1) % s.vocab_size).to_dict(),
        "answer": attribute(model, PROMPT, [target, 11, 40], top_k=6, answer_tokens="all", query_top=3).to_dict(),
        "chosen": vars(score_neurons(model, [PROMPT, PROMPT[:3]], None, [s.ffn_index(0, 1), "1_2_3@1",
                                                                         ("head", 1, 0)])),
        "project": vars(project(model, s.ffn_index(1, 2), k=5)),
        "carried": vars(interpret_query_neuron(model, 0, carried.neuron, 1, 1, k=5, expert=carried.expert)),
        "ablated": last_logits_each(model, [PROMPT, PROMPT[:4]], [Ablation.of([s.ffn_index(0, 1)]),
                                                                  Ablation(heads=[(1, 0)])], batch_size=2).tolist(),
        "compare": evaluate_sentences(model, sentences, top=3, methods=methods, ig_steps=3),
    }
    for protocol in ("value", "query", "heads"):
        out[protocol] = evaluate_sentences(model, sentences, protocol=protocol, top=3, seed=5)
    for key in ("compare", "value", "query", "heads"):
        result = out[key].to_dict()
        result.pop("seconds", None)
        out[key] = result
    return out


FAMILIES = {"gpt2": tiny_gpt2, "llama": tiny_llama, "qwen3": lambda: tiny_llama_like("qwen3"),
            **{family: (lambda family=family: tiny_family(family)) for family in OTHER_FAMILIES},
            "gpt_neox-sequential": lambda: tiny_family("gpt_neox", parallel=False)}


# Families whose own transformers code makes tensors on the default device in every forward pass: the model cannot
# run under a `meta` default device at all, whatever this package does.
OWN_DEFAULT_DEVICE = {"phimoe": "transformers' PhiMoE rotary embedding recomputes its frequencies on the default "
                                "device in every forward pass"}


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.skip(reason=OWN_DEFAULT_DEVICE[f]))
                                    if f in OWN_DEFAULT_DEVICE else f for f in FAMILIES])
def test_no_tensor_of_the_scoring_path_lands_on_an_implicit_device(family):
    model = FAMILIES[family]()
    expected = everything(model)
    with default_device("meta"):
        seen = everything(model)
    assert seen == expected


def test_random_draws_do_not_depend_on_the_default_device():
    """The random control and the random neurons of the protocols come from a CPU generator seeded per sentence,
    then move to the scoring device: the same seed picks the same neurons wherever the scores are computed."""
    model = tiny_llama()
    sentences = _sentences(model)
    with default_device("meta"):
        first = evaluate_sentences(model, sentences, protocol="value", top=3, seed=11).to_dict()
    again = evaluate_sentences(model, sentences, protocol="value", top=3, seed=11).to_dict()
    other = evaluate_sentences(model, sentences, protocol="value", top=3, seed=12).to_dict()
    for result in (first, again, other):
        result.pop("seconds", None)
    assert first == again and first["methods"]["random"] != other["methods"]["random"]


def test_trace_and_weights_live_on_the_scoring_device():
    for model in (tiny_llama(), tiny_family("gemma3_text")):
        device = model.adapter.device
        assert device == model.hf_model.lm_head.weight.device
        trace = trace_token_ids(model, [[3, 4, 5, 6]])[0]
        assert {t.device for t in _tensors(trace) if t is not trace.token_ids} == {device}
        weights = model.adapter.layer_weights(1)
        assert {t.device for t in _tensors(weights)} == {device}
        assert model.adapter.ffn_value_stack.device == device and model.adapter.unembedding[0].device == device
        assert {m.weight.device for m in model.adapter.ffn_value_stack.layers} == {device}
        ctx = value_context(model, trace, 7)
        assert ctx.base_log_probs.device == device and ctx.normalised_states.device == device


def test_the_default_device_is_left_as_it_was():
    model = tiny_llama()
    with default_device("meta"):
        attribute(model, PROMPT, 7, top_k=3)
        assert torch.empty(()).device.type == "meta"
    assert torch.empty(()).device.type == "cpu"
    assert isinstance(np.asarray(attribute(model, PROMPT, 7, top_k=3, dense=True).dense.ffn), np.ndarray)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without CUDA")
@pytest.mark.parametrize("args, message", [
    (("attribute", "The capital of France is", "--device", "cuda"), "--device cuda: no CUDA GPU is available here"),
    (("attribute", "The capital of France is", "--device", "cuda:3"), "--device cuda:3: no CUDA GPU is available"),
    (("attribute", "x", "--device", "tpu"), "--device 'tpu' is not a device"),
    (("run", "--dataset", "sample", "--device", "cuda"), "--device cuda: no CUDA GPU is available here"),
    (("evaluate", "--dataset", "sample", "--gpus-per-worker", "1"), "--gpus-per-worker is for --backend ray"),
    (("run", "--dataset", "sample", "--backend", "ray", "--gpus-per-worker", "0.5"),
     "--gpus-per-worker needs a CUDA device"),
    (("run", "--dataset", "sample", "--backend", "ray", "--device", "cuda", "--gpus-per-worker", "0"),
     "--gpus-per-worker must be more than 0"),
])
def test_device_mistakes_are_one_line_errors_before_any_work(args, message, cli, no_model_loads):
    result = cli(*args)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"error: {message}") and len(result.stderr.strip().splitlines()) == 1, \
        result.stderr
    assert "Traceback" not in result.stderr and "Loading" not in result.stdout


def test_device_checks_on_a_machine_that_has_gpus(monkeypatch):
    """What a one-GPU machine without bfloat16 (say a T4) answers, with torch's CUDA queries standing in for it."""
    from neuron_attribution import UserError
    from neuron_attribution.model.devices import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    check_device("cuda", torch.float32)
    check_device("cuda:0", torch.float16)
    with pytest.raises(UserError, match=r"^--device cuda:3: this machine has 1 CUDA GPU \(cuda:0\)$"):
        check_device("cuda:3")
    with pytest.raises(UserError, match="--dtype bfloat16: the GPU Tesla T4 has no bfloat16 support"):
        check_device("cuda", torch.bfloat16)
    with pytest.raises(UserError, match="no bfloat16 support"):
        check_device("auto", torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(UserError, match=r"has 2 CUDA GPUs \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")
