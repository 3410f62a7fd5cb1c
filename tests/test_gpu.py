"""The GPU path (`pytest -m gpu`; skipped where CUDA is absent): every step computed on a CUDA device equals the
same step on the CPU — scores within 1e-4 relative, the same rankings except exact ties, random controls
identical — in float32 and in bfloat16, through the Ray backend with a GPU worker, and within the memory budget.

CI has no GPU: tests/test_device.py shows on the CPU that no tensor of the scoring path relies on the default
device; these tests are what `scripts/gpu_check.sh` runs on the first machine with one. Their own logic can be
tried without a GPU: NEURON_ATTRIBUTION_TEST_DEVICE=cpu runs them with a second CPU copy standing in for it."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from neuron_attribution import LoadedModel, attribute, load_model, score_neurons, trace_token_ids
from neuron_attribution.datasets import Fact
from neuron_attribution.model.prompts import Sentence
from neuron_attribution.pipelines.evaluate import evaluate_sentences
from neuron_attribution.results.tables import TABLES

from . import reference
from .conftest import tiny_family, tiny_gpt2, tiny_llama

DEVICE = os.environ.get("NEURON_ATTRIBUTION_TEST_DEVICE", "cuda")
ON_CUDA = DEVICE.startswith("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(ON_CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU (pytest -m gpu)")]

RELATIVE = 1e-4
ABSOLUTE = 1e-5
PROMPT = [5, 17, 3, 99, 42, 8]
FACTS = [
    {"prompt": "The capital of France is", "answer": "Paris", "type": "capital"},
    {"prompt": "The capital of Italy is", "answer": "Rome", "type": "capital"},
    {"prompt": "The official language of Spain is", "answer": "Spanish", "type": "language"},
    {"prompt": "Berlin is a city in the country of", "answer": "Germany", "type": "country"},
]


def on_gpu(model: LoadedModel, dtype: torch.dtype | None = None) -> LoadedModel:
    """The same weights on the GPU (a deep copy, so the CPU model stays as it is)."""
    hf = copy.deepcopy(model.hf_model).to(DEVICE)
    if dtype is not None:
        hf = hf.to(dtype)
    return LoadedModel.from_hf(hf, model.tokenizer, name=model.name)


def close(a: float, b: float) -> bool:
    return abs(a - b) <= ABSOLUTE + RELATIVE * abs(b)


def assert_same_ranking(gpu_items, cpu_items, key):
    """Scores equal within tolerance position by position, and the same neurons except where scores tie."""
    assert len(gpu_items) == len(cpu_items)
    for g, c in zip(gpu_items, cpu_items):
        assert close(g.score, c.score), (key(g), g.score, key(c), c.score)
        if key(g) != key(c):  # only a tie may swap two neurons
            partner = next(x for x in cpu_items if key(x) == key(g))
            assert close(partner.score, c.score), (key(g), key(c))


def assert_attributions_equal(gpu, cpu):
    assert gpu.target.id == cpu.target.id and close(gpu.target.prob, cpu.target.prob)
    for a, b in zip(gpu.layers.attention + gpu.layers.ffn, cpu.layers.attention + cpu.layers.ffn):
        assert close(a, b)
    assert_same_ranking(gpu.heads, cpu.heads, lambda h: h.index)
    assert_same_ranking(gpu.ffn_neurons, cpu.ffn_neurons, lambda n: n.index)
    assert_same_ranking(gpu.attention_neurons, cpu.attention_neurons, lambda n: n.index)
    assert_same_ranking(gpu.query_neurons, cpu.query_neurons, lambda q: (q.layer, q.neuron))


@pytest.fixture(scope="module", params=["gpt2", "llama", "gemma2", "phi", "qwen2_moe"])
def pair(request):
    make = {"gpt2": tiny_gpt2, "llama": tiny_llama, "gemma2": lambda: tiny_family("gemma2"),
            "phi": lambda: tiny_family("phi"), "qwen2_moe": lambda: tiny_family("qwen2_moe")}[request.param]
    cpu = make()
    return cpu, on_gpu(cpu)


def test_attribute_on_the_gpu_equals_the_cpu(pair):
    cpu, gpu = pair
    assert gpu.adapter.device.type == torch.device(DEVICE).type
    target = int(trace_token_ids(cpu, [PROMPT])[0].logits.argmax())
    for kwargs in ({"top_k": 12, "query_via": "both"}, {"top_k": 5, "contrast": (target + 3) % 200},
                   {"top_k": 6, "answer_tokens": "all"}):
        answer = [target, 11, 40] if kwargs.get("answer_tokens") else target
        assert_attributions_equal(attribute(gpu, PROMPT, answer, **kwargs), attribute(cpu, PROMPT, answer, **kwargs))
    dense_gpu, dense_cpu = (attribute(m, PROMPT, target, top_k=3, dense=True) for m in (gpu, cpu))
    np.testing.assert_allclose(dense_gpu.dense.ffn, dense_cpu.dense.ffn, rtol=RELATIVE, atol=ABSOLUTE)
    np.testing.assert_allclose(dense_gpu.dense.attention, dense_cpu.dense.attention, rtol=RELATIVE, atol=ABSOLUTE)


def test_score_neurons_on_the_gpu_equals_the_cpu(pair):
    cpu, gpu = pair
    neurons = ["0_1", "1_3", "1_2_3@1", "0_1_0", ("head", 1, 2)]
    neurons += ["1_e2_5", "0_e1"] if cpu.shape.n_experts else []  # an expert's neuron, a whole expert
    g, c = (score_neurons(m, [PROMPT, PROMPT[:4]], None, neurons) for m in (gpu, cpu))
    np.testing.assert_allclose(np.array(g.scores), np.array(c.scores), rtol=RELATIVE, atol=ABSOLUTE)


def _sentences(model):
    result = []
    for ids, kind in ((PROMPT, "a"), ([9, 8, 7, 6, 5, 4], "b"), ([1, 2, 30, 31], "a")):
        result.append(Sentence(Fact("", "", kind, "t", 0), ids, int(trace_token_ids(model, [ids])[0].logits.argmax())))
    return result


def test_every_method_and_protocol_on_the_gpu_equals_the_cpu(pair):
    cpu, gpu = pair
    sentences = _sentences(cpu)
    # integrated gradients need the FFN coefficients at one projection, which a mixture of experts has not
    methods = "all" if cpu.shape.n_experts else "all,integrated_gradients"
    for protocol, kwargs in (("compare", {"methods": methods, "ig_steps": 4}),
                             ("value", {}), ("query", {}), ("heads", {})):
        g, c = (evaluate_sentences(m, sentences, protocol=protocol, top=3, seed=7, **kwargs).to_dict()
                for m in (gpu, cpu))
        assert g["methods"].keys() == c["methods"].keys()
        for method, metrics in c["methods"].items():
            for name, value in metrics.items():
                assert close(g["methods"][method][name], value), (protocol, method, name)
        if protocol == "heads":
            assert g["heads"]["random"] == c["heads"]["random"]  # the same seed picks the same heads


def test_bfloat16_on_the_gpu_equals_a_float64_loop_over_its_own_weights_and_activations():
    """In bfloat16 the GPU's activations are its own; the scores must equal the definitions computed in float64
    from those very activations and weights."""
    cpu = tiny_llama()
    gpu = on_gpu(cpu, torch.bfloat16)
    target = int(trace_token_ids(gpu, [PROMPT])[0].logits.argmax())
    result = attribute(gpu, PROMPT, target, top_k=8, dense=True)
    trace = trace_token_ids(gpu, [PROMPT])[0]
    host = dataclasses.replace(trace, **{f.name: getattr(trace, f.name).cpu() for f in dataclasses.fields(trace)
                                        if isinstance(getattr(trace, f.name), torch.Tensor)})
    weights = LoadedModel.from_hf(copy.deepcopy(gpu.hf_model).to("cpu"), name="bf16-on-cpu")
    for n in result.ffn_neurons:
        assert close(n.score, reference.ffn_neuron_score(weights, host, n.layer, n.neuron, target)), n.index
    assert result.dense.ffn.flatten().argmax() == np.argmax(result.dense.ffn)


@pytest.mark.parametrize("method", ["bnb-4bit", "bnb-8bit"])
def test_a_model_quantized_by_bitsandbytes_on_the_gpu_equals_a_float64_loop_over_its_dequantised_weights(
        method, tmp_path):
    """bitsandbytes' CUDA kernels: a tiny Llama (rows of whole 64-value blocks) loaded quantized onto the GPU. Its
    FFN value neurons' scores equal the float64 loop over the library's own dequantised matrices and the GPU's
    activations; a 4-bit layer (float32 compute) is its matrix's linear map, so its quantisation residual is
    float32 rounding, while LLM.int8's rounded activations leave a residual of its own."""
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import LlamaConfig, LlamaForCausalLM

    from .conftest import _randomise, save_with_tokenizer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=257, max_position_embeddings=64, tie_word_embeddings=False)
    float_model = LlamaForCausalLM(config)
    _randomise(float_model, 6)
    save_with_tokenizer(float_model, tmp_path / "tiny")
    gpu = load_model(tmp_path / "tiny", quantization=method, device=DEVICE)
    twin = copy.deepcopy(float_model)
    for name, module in gpu.hf_model.named_modules():
        if type(module).__name__ == "Linear4bit":
            matrix = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif type(module).__name__ == "Linear8bitLt":
            scales = module.weight.SCB if getattr(module.weight, "SCB", None) is not None else module.state.SCB
            matrix = bnb.functional.int8_vectorwise_dequant(module.weight.data, scales)
        else:
            continue
        twin.get_submodule(name).weight.data = matrix.float().cpu()
    weights = LoadedModel.from_hf(twin, name="dequantised-on-cpu")
    target = int(trace_token_ids(gpu, [PROMPT])[0].logits.argmax())
    result = attribute(gpu, PROMPT, target, top_k=8)
    trace = trace_token_ids(gpu, [PROMPT])[0]
    host = dataclasses.replace(trace, **{f.name: getattr(trace, f.name).cpu() for f in dataclasses.fields(trace)
                                        if isinstance(getattr(trace, f.name), torch.Tensor)})
    for n in result.ffn_neurons:
        assert close(n.score, reference.ffn_neuron_score(weights, host, n.layer, n.neuron, target)), n.index
    largest = max(r.relative for r in result.quantization_residuals)
    assert largest < 1e-4 if method == "bnb-4bit" else largest > 1e-4


@pytest.fixture(scope="module")
def real_pair():
    cpu = load_model()
    return cpu, load_model(device=DEVICE)


def test_the_default_model_on_the_gpu_equals_the_cpu_within_the_budget(real_pair):
    cpu, gpu = real_pair
    prompt = "The capital of France is"
    budget = 64 * 1024**2
    assert_attributions_equal(attribute(gpu, prompt, " Paris", top_k=50), attribute(cpu, prompt, " Paris", top_k=50))
    attribute(gpu, prompt, " Paris", top_k=100, memory_budget=budget)  # weights' float32 views made once
    if not ON_CUDA:
        return
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    attribute(gpu, prompt, " Paris", top_k=100, memory_budget=budget)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - before
    trace_bytes = 64 * 1024**2  # a short prompt's trace and bases, generously
    assert growth <= budget + trace_bytes, f"peak {growth / 2**20:.0f} MB above the model"


def test_run_and_analyze_on_the_gpu_and_on_a_ray_gpu_worker_equal_the_cpu(real_pair, tmp_path):
    from neuron_attribution.pipelines.analyze import analyze_run
    from neuron_attribution.pipelines.run import RunArguments, run_dataset, run_settings

    cpu, gpu = real_pair
    facts = tmp_path / "facts.jsonl"
    facts.write_text("".join(json.dumps(f) + "\n" for f in FACTS))
    arguments = RunArguments(str(facts))
    run_dataset(cpu, tmp_path / "cpu", arguments, settings=run_settings(cpu, 20), batch_size=2)
    run_dataset(gpu, tmp_path / "gpu", arguments, settings=run_settings(gpu, 20), batch_size=2)
    ray = pytest.importorskip("ray")
    from neuron_attribution.execution.ray_backend import RayBackend

    try:
        with RayBackend(run_settings(gpu, 20), workers=1, gpus_per_worker=1 if ON_CUDA else None) as backend:
            run_dataset(gpu, tmp_path / "ray", arguments, batch_size=2, backend=backend)
    finally:
        ray.shutdown()
    assert json.loads((tmp_path / "ray" / "run.json").read_text())["settings"]["model"]["device"] == DEVICE
    expected = {name: pq.read_table(tmp_path / "cpu" / f"{name}.parquet").to_pydict() for name in TABLES}
    for directory in ("gpu", "ray"):
        got = {name: pq.read_table(tmp_path / directory / f"{name}.parquet").to_pydict() for name in TABLES}
        assert got["sentences"]["target_id"] == expected["sentences"]["target_id"]
        for g, c in zip(got["layers"]["ffn"], expected["layers"]["ffn"]):
            assert close(g, c)
        top_cpu = [s for s, r in zip(expected["ffn_neurons"]["score"], expected["ffn_neurons"]["rank"]) if r == 1]
        top_gpu = [s for s, r in zip(got["ffn_neurons"]["score"], got["ffn_neurons"]["rank"]) if r == 1]
        assert all(close(g, c) for g, c in zip(top_gpu, top_cpu))
    analysis = analyze_run(tmp_path / "gpu", per_type=2, load=lambda spec: gpu)
    assert analysis.counts == {"capital": 2, "language": 1, "country": 1}


@pytest.mark.skipif(not ON_CUDA or torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_auto_placement_over_two_gpus_equals_the_cpu(tmp_path):
    from transformers import AutoModelForCausalLM

    cpu = tiny_llama()
    cpu.hf_model.save_pretrained(tmp_path / "tiny")
    spread = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", device_map="balanced")
    devices = {p.device for p in spread.parameters()}
    assert len(devices) >= 2, devices
    gpu = LoadedModel.from_hf(spread, name="tiny-spread")
    target = int(trace_token_ids(cpu, [PROMPT])[0].logits.argmax())
    assert_attributions_equal(attribute(gpu, PROMPT, target, top_k=10), attribute(cpu, PROMPT, target, top_k=10))
