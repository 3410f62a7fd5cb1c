"""Quantized models, on tiny Llama, Gemma 2 (soft-capped, post-norms) and Qwen2-MoE (routed experts beside a
quantized shared expert) configs quantized here with each method: bitsandbytes NF4 and FP4, with and without
double quantisation, and LLM.int8; torchao int8 and int4 weight-only.

Independent of the package's readers, every quantized layer is dequantised whole by its library (bitsandbytes'
`dequantize_4bit` and `int8_vectorwise_dequant`, torchao's `dequantize`) into a float "twin" of the model. Then:
the layer's own forward pass is that matrix's linear map (or, for LLM.int8, is not, by the rounding of its
activations); every neuron's score of the quantized model equals the float64 loop of tests/reference.py over the
twin's weights and the quantized model's own activations; the decomposition adds up (with the quantisation
residual where the layer rounds activations, whose reported size is checked against the loop's); and switching a
neuron off changes exactly that neuron."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf

from neuron_attribution import UserError, attribute
from neuron_attribution.model import weights
from neuron_attribution.model.loaded import LoadedModel
from neuron_attribution.model.quantization import DequantisedMatrix, quantized_layers
from neuron_attribution.model.quantization import methods as quantization_methods
from neuron_attribution.model.trace import trace_token_ids

from . import reference as ref
from .conftest import _randomise, save_with_tokenizer, tiny_family, tiny_llama
from .test_families import check_every_neuron_and_head, check_ffn_neuron_ablation
from .test_query import _check_against_reference
from .tiny_families import ALL_VARIANTS, TINY_VOCAB

bnb = pytest.importorskip("bitsandbytes")
torchao = pytest.importorskip("torchao")

IDS = [5, 17, 3, 99, 42, 7, 250]
TARGET = 11
ATOL = 1e-5
# Rows and columns a multiple of bitsandbytes' 64-value blocks: 4-bit matrices are read by slices of whole blocks.
SIZES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=256, tie_word_embeddings=False)
CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**SIZES, head_dim=16),
    "gemma2": lambda: tf.Gemma2Config(**SIZES, head_dim=16, final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
                                      query_pre_attn_scalar=16, sliding_window=4),
    "qwen2_moe": lambda: tf.Qwen2MoeConfig(**SIZES, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                           shared_expert_intermediate_size=128),
}


def _bnb_4bit(quant_type: str, double: bool):
    return lambda: {"quantization_config": tf.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.float32), "device_map": {"": "cpu"}}


def _named(method: str):
    return lambda: quantization_methods.loading_arguments(method, torch.float32, "cpu")


# method -> from_pretrained's arguments; the names load_model takes, and the 4-bit variants they leave out
METHODS = {"bnb-4bit": _named("bnb-4bit"), "bnb-4bit-fp4": _named("bnb-4bit-fp4"),
           "bnb-nf4-single": _bnb_4bit("nf4", False), "bnb-fp4-single": _bnb_4bit("fp4", False),
           "bnb-8bit": _named("bnb-8bit"), "torchao-int8": _named("torchao-int8"),
           "torchao-int4": _named("torchao-int4")}
ROUNDS_ACTIVATIONS = {"bnb-8bit"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (the float model, the directory it was saved to)."""
    made = {}

    def get(family: str):
        if family not in made:
            torch.manual_seed(0)
            model = tf.AutoModelForCausalLM.from_config(CONFIGS[family]())
            _randomise(model, 6)
            model.eval()
            directory = tmp_path_factory.mktemp(family)
            model.save_pretrained(directory)
            made[family] = (model, directory)
        return made[family]
    return get


def quantized(saved, family: str, method: str) -> tuple[LoadedModel, LoadedModel]:
    """(the model quantized with `method`, its float twin holding the library's own dequantised matrices)."""
    base, directory = saved(family)
    hf = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager",
                                                 **METHODS[method]())
    model = LoadedModel.from_hf(hf, name=f"{family}-{method}")
    twin = copy.deepcopy(base)
    found = 0
    for name, module in hf.named_modules():
        matrix = library_dequantised(module)
        if matrix is not None:
            target = twin.get_submodule(name)
            assert matrix.shape == target.weight.shape, name
            target.weight.data = matrix
            found += 1
    assert found >= 7 * SIZES["num_hidden_layers"] or (family == "qwen2_moe" and found >= 4 * 2), found
    return model, LoadedModel.from_hf(twin, name=f"{family}-{method}-twin")


def library_dequantised(module) -> torch.Tensor | None:
    """The library's own whole-matrix dequantisation of a quantized linear layer (None for any other module)."""
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Linear4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if type(module).__name__ == "Linear8bitLt":
        scales = weight.SCB if getattr(weight, "SCB", None) is not None else module.state.SCB
        return bnb.functional.int8_vectorwise_dequant(weight.data, scales).float()
    if weight is not None and type(weight).__module__.startswith("torchao."):
        return weight.dequantize().float()
    return None


def frozen_scales_from_the_forward_pass(monkeypatch, model: LoadedModel, twin: LoadedModel) -> None:
    """The reference derives a post-norm's frozen scale from the sublayer output it rebuilds from the neurons;
    LLM.int8's output, which the model normalised, is that plus its rounding. At the last position (where every
    score and residual is read) the reference is given the post-norm's actual input, recorded here by a hook."""
    if not ref.has_post_norms(twin):
        return
    actual, handles = {}, []
    for layer in range(model.shape.n_layers):
        for kind, name in zip(("attention", "ffn"), ref.block(twin).post_norms):
            module = ref._module(model, layer, name)
            record = (lambda key: lambda _module, args: actual.__setitem__(key, args[0][0, -1].detach()))(
                (layer, kind))
            handles.append(module.register_forward_pre_hook(record))
    with torch.no_grad():
        model.hf_model(torch.tensor([IDS]))
    for handle in handles:
        handle.remove()
    reference_factor = ref.post_norm_factor
    monkeypatch.setattr(ref, "post_norm_factor", lambda model, layer, kind, raw_output: reference_factor(
        model, layer, kind, actual[(layer, kind)]))


@pytest.fixture(params=list(CONFIGS))
def family(request) -> str:
    return request.param


@pytest.mark.parametrize("method", list(METHODS))
def test_every_layer_is_read_as_its_forward_pass_uses_it(saved, family, method, monkeypatch):
    """The reader's rows, columns, transposed and reshaped views equal the library's whole dequantised matrix; the
    layer's forward pass is that matrix's linear map (to float32 rounding), but for LLM.int8, which rounds its
    activations (by more than float32 rounding: what the quantisation residual carries)."""
    model, twin = quantized(saved, family, method)
    monkeypatch.setattr(weights, "CHUNK_BYTES", 3 * 4 * SIZES["hidden_size"])  # 3 rows a chunk
    readers = quantized_layers(model.hf_model)
    assert readers
    generator = torch.Generator().manual_seed(1)
    for name, reader in readers.items():
        expected = twin.hf_model.get_submodule(name).weight.detach()
        matrix = DequantisedMatrix(reader)
        assert torch.equal(matrix[:], expected), name
        assert torch.equal(matrix.T[:], expected.T), name
        rows = torch.randint(0, expected.shape[0], (9,), generator=generator)
        columns = torch.randint(0, expected.shape[1], (9,), generator=generator)
        assert torch.equal(matrix[rows], expected[rows]) and torch.equal(matrix.T[columns], expected.T[columns])
        assert torch.equal(matrix.T[3:70], expected.T[3:70])
        heads = matrix.T.reshape(-1, 16, expected.shape[0])
        assert torch.equal(heads[1, 5], expected.T[21]) and torch.equal(heads[2], expected.T[32:48])
        as_matrix = weights.Matrix.of(matrix.T, torch.device("cpu"))
        assert torch.equal(torch.cat([block for _, block in as_matrix.chunks()]), expected.T)
        module = model.hf_model.get_submodule(name)
        x = torch.randn(5, expected.shape[1], generator=generator)
        with torch.no_grad():
            output = module(x)
        bias = 0.0 if module.bias is None else module.bias.detach().float()
        error = float((output - (x @ expected.T + bias)).abs().max()) / float(output.abs().max())
        if method in ROUNDS_ACTIVATIONS:
            assert error > 1e-4, name  # int8 activations: no matrix reproduces the layer
        else:
            assert error < 1e-6, (name, error)


# The 4-bit variants differ only in what the reader dequantises, which the first test compares bit for bit.
SCORED = ["bnb-4bit", "bnb-8bit", "torchao-int8", "torchao-int4"]


@pytest.mark.parametrize("method", SCORED)
def test_every_score_equals_a_float64_loop_over_the_dequantised_weights(saved, family, method, monkeypatch):
    """Every FFN and attention neuron's dense score and every head's score of the quantized model, against the
    float64 loops over the twin's weights and the quantized model's own activations."""
    model, twin = quantized(saved, family, method)
    frozen_scales_from_the_forward_pass(monkeypatch, model, twin)
    trace, _ = check_every_neuron_and_head(model, IDS, TARGET, ATOL, weights_from=twin)
    with torch.no_grad():
        logits = model.hf_model(torch.tensor([IDS])).logits[0, -1].double()
    assert float((ref.final_logits(twin, trace, trace.final_residual[-1]) - logits).abs().max()) < 1e-4


@pytest.mark.parametrize("method", ["bnb-4bit", "bnb-4bit-fp4", "torchao-int8", "torchao-int4"])
def test_query_shares_equal_a_float64_loop_over_the_dequantised_weights(saved, family, method):
    """Every FFN neuron's query score through both paths (value rows, gate and up subkeys, all read quantized),
    and the query layers, against the float64 loops over the twin's weights."""
    model, twin = quantized(saved, family, method)
    _check_against_reference(model, IDS, TARGET, k=6, atol=ATOL, via="both", weights_from=twin)


@pytest.mark.parametrize("method", SCORED)
def test_the_decomposition_adds_up_with_the_quantisation_residual(saved, family, method, monkeypatch):
    """Each sublayer's output at the last position is its neurons' vectors and bias (the float64 loop over the
    twin's weights) plus the reported residual: float32 rounding for a linear layer, the activations' rounding
    for LLM.int8, where it is reported with its size and a score."""
    model, twin = quantized(saved, family, method)
    trace = trace_token_ids(model, [IDS])[0]
    result = attribute(model, IDS, TARGET, top_k=5)
    frozen_scales_from_the_forward_pass(monkeypatch, model, twin)
    residuals = {(r.layer, r.component): r for r in result.quantization_residuals}
    assert len(residuals) == 2 * model.shape.n_layers
    for layer in range(model.shape.n_layers):
        raw = ref.raw_ffn_output(twin, trace, layer, -1)
        factor = ref.post_norm_factor(twin, layer, "ffn", raw)
        ffn = trace.ffn_outputs[layer, -1].double() - (raw if factor is None else raw * factor)
        raw = ref.raw_attention_output(twin, trace, layer)
        factor = ref.post_norm_factor(twin, layer, "attention", raw)
        attention = trace.attention_outputs[layer, -1].double() - (raw if factor is None else raw * factor)
        for component, expected in (("ffn", ffn), ("attention", attention)):
            reported = residuals[(layer, component)]
            size = float(expected.norm())
            output = float((trace.ffn_outputs if component == "ffn" else trace.attention_outputs)[layer, -1].norm())
            assert reported.norm == pytest.approx(size, abs=2e-6 * output), (layer, component)
            assert reported.relative == pytest.approx(reported.norm / output, rel=1e-6)
            if method in ROUNDS_ACTIVATIONS:
                assert reported.relative > 1e-4 and reported.score != 0.0
            else:
                assert reported.relative < 2e-6


@pytest.mark.parametrize("method", ["bnb-4bit", "bnb-8bit", "torchao-int4"])
def test_interventions_change_exactly_the_targeted_neurons(saved, family, method):
    model, twin = quantized(saved, family, method)
    # LLM.int8's activation scale moves with the zeroed coefficient: its output is not linear in them
    check_ffn_neuron_ablation(model, weights_from=twin, linear_output=method not in ROUNDS_ACTIVATIONS)


def test_matrices_whose_rows_are_not_whole_blocks_are_read_whole():
    """A 4-bit matrix whose row length is not a multiple of bitsandbytes' block (hidden size 32) is dequantised
    whole for each read, and reads the same."""
    base = tiny_llama()
    config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    from neuron_attribution.model.quantization.bitsandbytes import FourBitReader

    hf = copy.deepcopy(base.hf_model)
    import tempfile

    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        quantized_hf = tf.AutoModelForCausalLM.from_pretrained(directory, quantization_config=config,
                                                               device_map={"": "cpu"}, dtype=torch.float32)
    model = LoadedModel.from_hf(quantized_hf)
    module = quantized_hf.model.layers[0].mlp.down_proj
    reader = FourBitReader(module, "down_proj")
    assert not reader.by_slices
    whole = library_dequantised(module)
    assert torch.equal(reader.rows(3, 17), whole[3:17]) and torch.equal(reader.columns(5, 9), whole[:, 5:9])
    result = attribute(model, IDS, TARGET, top_k=3)
    assert len(result.ffn_neurons) == 3


def test_a_layer_repacked_for_the_fused_cpu_kernel_is_refused_with_the_way_out(saved):
    """bitsandbytes repacks a 4-bit layer at its first forward pass on a CPU with AVX512-BF16 (a kernel rounding
    activations to bfloat16); such a layer is refused by name, never misread."""
    _, directory = saved("llama")
    hf = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **METHODS["bnb-4bit"]())
    state = hf.model.layers[0].mlp.down_proj.weight.quant_state
    state.packing_format_for_cpu = True  # what the repacking leaves (whether or not this CPU has the kernel)
    with pytest.raises(UserError, match=r"repacked by bitsandbytes .*quantization='bnb-4bit'"):
        attribute(LoadedModel.from_hf(hf), IDS, TARGET, top_k=3)


def test_loading_arguments_refuse_unknown_methods_and_name_a_missing_extra(monkeypatch):
    with pytest.raises(UserError, match=r"unknown quantization 'gptq'; use one of bnb-4bit, "):
        quantization_methods.loading_arguments("gptq", torch.float32, "cpu")
    monkeypatch.setattr(quantization_methods, "installed", lambda package: package != "torchao")
    with pytest.raises(UserError, match=r"torchao-int8 needs the package torchao: pip install "
                                        r"'neuron-attribution\[torchao\]'"):
        quantization_methods.loading_arguments("torchao-int8", torch.float32, "cpu")


def test_checkpoints_quantized_already(tmp_path, saved, monkeypatch):
    """A checkpoint whose config records a method this tool reads is loaded as it is; any other method is refused
    before loading, by name; asking to quantize it again is an error."""
    _, directory = saved("llama")
    hf = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **METHODS["bnb-8bit"]())
    hf.save_pretrained(tmp_path / "int8")
    quantization_methods.check_checkpoint(tmp_path / "int8", quantizing=False)  # readable: no error
    with pytest.raises(UserError, match="quantized already \\(bitsandbytes\\); load it without --quantization"):
        quantization_methods.check_checkpoint(tmp_path / "int8", quantizing=True)
    config = json.loads((tmp_path / "int8" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "int8" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantized with 'gptq', which this tool cannot read; supported: "
                                        "bitsandbytes, torchao"):
        quantization_methods.check_checkpoint(tmp_path / "int8", quantizing=False)


@pytest.mark.parametrize("family", ["gpt2", "granite", "gemma2", "qwen2_moe"])
def test_the_residual_of_a_model_that_is_not_quantized_is_float32_rounding(family):
    """The residual subtracts each sublayer's bias as the neurons reach the residual stream (through a post-norm's
    gain and frozen scale, and a residual multiplier): on models with biases (GPT-2), biases and a multiplier
    (Granite with biases), post-norms (Gemma 2) and a gated shared expert (Qwen2-MoE), nothing is left but float32
    rounding."""
    from neuron_attribution.scoring import quantization
    from neuron_attribution.scoring.context import value_context

    from .conftest import tiny_family, tiny_gpt2
    from .tiny_families import FAMILIES

    if family == "granite":
        torch.manual_seed(0)
        config = FAMILIES["granite"].config()
        config.attention_bias = config.mlp_bias = True
        hf = tf.AutoModelForCausalLM.from_config(config)
        _randomise(hf, 6)
        model = LoadedModel.from_hf(hf, name="granite-with-biases")
    else:
        model = tiny_gpt2() if family == "gpt2" else tiny_family(family)
    trace = trace_token_ids(model, [IDS])[0]
    ctx = value_context(model, trace, TARGET)
    biases = [quantization.SublayerBiases(w.output_bias, w.ffn_bias)
              for w in (model.adapter.layer_weights(layer) for layer in range(model.shape.n_layers))]
    assert family not in ("gpt2", "granite") or all(b.attention is not None and b.ffn is not None for b in biases)
    vectors = quantization.residual_vectors(ctx, biases)
    for residual, output in ((vectors.attention, vectors.attention_outputs), (vectors.ffn, vectors.ffn_outputs)):
        assert float((residual.norm(dim=-1) / output.norm(dim=-1)).max()) < 2e-6


@pytest.fixture(scope="module")
def model_directory(saved, tmp_path_factory):
    """The tiny Llama saved with a word-level tokenizer: a model directory `--model` loads."""
    model, _ = saved("llama")
    directory = tmp_path_factory.mktemp("llama-directory")
    save_with_tokenizer(model, directory)
    return directory


def test_the_cli_quantizes_reports_the_residual_and_records_the_method(cli, model_directory, tmp_path):
    out = tmp_path / "a.json"
    result = cli("attribute", "The capital of France is", "--target", "Paris", "--model", str(model_directory),
                 "--quantization", "bnb-8bit", "--top", "3", "--json", str(out))
    assert result.returncode == 0, result.stderr
    assert "Quantisation residual" in result.stdout
    data = json.loads(out.read_text())
    assert len(data["quantization_residuals"]) == 4
    assert all(r["relative"] > 1e-4 for r in data["quantization_residuals"])
    from neuron_attribution.results.attribution import Attribution

    assert Attribution.load(out).quantization_residuals[0].norm == data["quantization_residuals"][0]["norm"]

    info = tmp_path / "info.json"
    result = cli("info", "--model", str(model_directory), "--quantization", "bnb-4bit", "--json", str(info))
    assert result.returncode == 0, result.stderr
    described = json.loads(info.read_text())
    assert described["quantization"] == "bnb-4bit (nf4, double quantisation): 14 linear layers"
    plain = tmp_path / "plain.json"
    assert cli("info", "--model", str(model_directory), "--json", str(plain)).returncode == 0
    unquantized = json.loads(plain.read_text())
    assert unquantized["quantization"] == "none"
    # the 14 matrices' 73,728 float32 values held in 4 bits each (and a scale a block of 64) instead of 32
    assert unquantized["memory_bytes"] - described["memory_bytes"] > 0.8 * 4 * 73_728


def test_a_wrong_quantization_is_one_line_before_any_loading(cli, no_model_loads):
    result = cli("attribute", "The capital of France is", "--quantization", "gptq")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown quantization 'gptq'; use one of bnb-4bit, bnb-4bit-fp4, bnb-8bit, torchao-int8, torchao-int4"]


def test_the_quantization_is_part_of_a_runs_identity():
    from neuron_attribution.settings import ModelSpec, ScoringOptions, Settings

    plain = Settings(ModelSpec("m"), ScoringOptions()).flat()
    quantized_settings = Settings(ModelSpec("m", quantization="bnb-4bit"), ScoringOptions())
    assert plain["model.quantization"] is None and quantized_settings.flat()["model.quantization"] == "bnb-4bit"
    assert Settings.from_dict(quantized_settings.to_dict()) == quantized_settings


COMPRESSED_FORMATS = {"pack-quantized": (4, "group"), "int-quantized": (8, "channel")}


def compressed_checkpoint(model, directory, form: str) -> dict[str, torch.Tensor]:
    """The model written as LLM Compressor writes a weight-only checkpoint in `form` (symmetric int4 in groups of
    32, or int8 per row, scales from each group's absmax), and, by name, each layer's dequantised weight computed
    here from those scales."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)

    bits, strategy = COMPRESSED_FORMATS[form]
    model = copy.deepcopy(model)
    arguments = QuantizationArgs(num_bits=bits, type="int", strategy=strategy, symmetric=True,
                                 group_size=32 if strategy == "group" else None)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"weights": QuantizationScheme(targets=["Linear"], weights=arguments)},
        ignore=["lm_head", "re:.*mlp.gate$", "re:.*shared_expert_gate$"], format=form))
    top = 2 ** (bits - 1) - 1
    expected = {}
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        weight = module.weight.data
        grouped = weight.reshape(weight.shape[0], -1, 32 if strategy == "group" else weight.shape[1])
        scale = grouped.abs().amax(-1, keepdim=True) / top
        module.weight_scale.data = scale.reshape(module.weight_scale.shape).to(module.weight_scale.dtype)
        expected[name] = ((grouped / scale).round().clamp(-top - 1, top) * scale).reshape(weight.shape)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format=form)
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    return expected


@pytest.mark.parametrize("form", list(COMPRESSED_FORMATS))
@pytest.mark.parametrize("dense_family", ["llama", "gemma2"])
def test_compressed_tensors_checkpoints_load_as_they_are_and_score_exactly(saved, dense_family, form, tmp_path):
    """A compressed-tensors checkpoint (int4 packed in groups, int8 per row) loads without --quantization, is
    decompressed when wrapped (as transformers would at its first forward pass), holds exactly the dequantised
    weights computed from its scales, and scores every neuron as the float64 loop over them does. (A mixture is
    left out: transformers 5.23 cannot load back the fused experts of a compressed checkpoint written this way.)"""
    family = dense_family
    pytest.importorskip("compressed_tensors")
    base, _ = saved(family)
    expected = compressed_checkpoint(base, tmp_path, form)
    quantization_methods.check_checkpoint(tmp_path, quantizing=False)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager")
    model = LoadedModel.from_hf(hf, name=f"{family}-{form}")
    twin = copy.deepcopy(base)
    for name, weight in expected.items():
        loaded = model.hf_model.get_submodule(name).weight
        assert torch.equal(loaded, weight), name
        twin.get_submodule(name).weight.data = weight
    assert len(expected) >= 10
    from neuron_attribution.model.describe import describe_model

    assert describe_model(model)["quantization"] == (f"compressed-tensors ({form}), run decompressed as "
                                                     "transformers runs it")
    check_every_neuron_and_head(model, IDS, TARGET, ATOL, weights_from=LoadedModel.from_hf(twin, name="twin"))
    result = attribute(model, IDS, TARGET, top_k=3)
    assert result.quantization_residuals and max(r.relative for r in result.quantization_residuals) < 2e-6


@pytest.fixture(scope="module", params=ALL_VARIANTS)
def any_family(request):
    return request.param


def test_every_family_quantized_in_4bit_adds_up_and_scores_its_top_neurons_exactly(any_family, tmp_path):
    """Every family (tests/tiny_families.py: rows of 32 or 40, not whole 64-value blocks, so every 4-bit matrix is
    dequantised whole for each read), quantized in 4-bit while loading: the decomposition adds up to float32
    rounding at every sublayer, the logits are the model's own, and the top FFN and attention value neurons'
    scores equal the float64 loop over the library's dequantised matrices (GPT-2's Conv1D layers become linear
    layers in bitsandbytes; a family whose linear layers bitsandbytes leaves alone still loads and scores)."""
    base = tiny_family(any_family)
    base.hf_model.save_pretrained(tmp_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation="eager",
                                                 **METHODS["bnb-4bit"]())
    model = LoadedModel.from_hf(hf, name=f"{any_family}-4bit")
    twin = copy.deepcopy(base.hf_model)
    for name, module in hf.named_modules():
        matrix = library_dequantised(module)
        if matrix is not None:
            target = twin.get_submodule(name)
            target.weight.data = matrix if type(target).__name__ != "Conv1D" else matrix.T.contiguous()
    twin = LoadedModel.from_hf(twin, name="twin")
    trace = trace_token_ids(model, [IDS])[0]
    result = attribute(model, IDS, TARGET, top_k=5)
    assert max((r.relative for r in result.quantization_residuals), default=0.0) < 2e-6
    with torch.no_grad():
        logits = hf(torch.tensor([IDS])).logits[0, -1]
    assert float((trace.logits - logits).abs().max()) < 1e-4
    for n in result.ffn_neurons:
        row = model.shape.ffn_row(n.index)  # in a mixture `neuron` is the place in its expert
        assert n.score == pytest.approx(ref.ffn_neuron_score(twin, trace, n.layer, row, TARGET), abs=ATOL)
    for n in result.attention_neurons:
        expected = ref.attention_neuron_score(twin, trace, n.layer, n.head, n.dim, n.position, TARGET)
        assert n.score == pytest.approx(expected, abs=ATOL)


def test_a_checkpoint_quantized_already_loads_onto_the_device_asked_for(saved, tmp_path, monkeypatch):
    """An 8-bit checkpoint cannot be moved once loaded (bitsandbytes refuses `.to` to another device): it is
    placed while loading (a device map), and `load_model` takes it as it is, quantized, on the device asked for."""
    from neuron_attribution import load_model
    from neuron_attribution.model import hf_loading

    _, directory = saved("llama")
    hf = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **METHODS["bnb-8bit"]())
    save_with_tokenizer(hf, tmp_path)
    placements, load_directory = [], hf_loading.load_directory
    monkeypatch.setattr(hf_loading, "load_directory", lambda *args: placements.append(args[-1]) or
                        load_directory(*args))
    model = load_model(tmp_path, device="cpu")
    assert placements == [{"device_map": {"": "cpu"}}]
    assert type(model.hf_model.model.layers[0].mlp.down_proj).__name__ == "Linear8bitLt"
    assert model.spec.quantization is None  # nothing asked: the checkpoint's own quantisation
    result = attribute(model, "The capital of France is", "Paris", top_k=3)
    assert max(r.relative for r in result.quantization_residuals) > 1e-4


@pytest.mark.parametrize("method", ["bnb-4bit", "torchao-int8"])
def test_a_bfloat16_model_quantized_scores_as_a_float64_loop_over_its_own_bfloat16_matrices(saved, method):
    """In bfloat16 a 4-bit layer dequantises into bfloat16 (its compute dtype) and multiplies there: the scores
    equal the float64 loop over those bfloat16 matrices and the model's own bfloat16 activations (the tolerance of
    tests/test_bfloat16.py)."""
    base, directory = saved("llama")
    hf = tf.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="eager",
                                                 **quantization_methods.loading_arguments(method, torch.bfloat16,
                                                                                          "cpu"))
    model = LoadedModel.from_hf(hf, name=f"llama-{method}-bf16")
    twin = copy.deepcopy(base).to(torch.bfloat16)
    for name, module in hf.named_modules():
        matrix = library_dequantised(module)
        if matrix is not None:
            assert module.weight.dtype != torch.bfloat16 or method != "bnb-4bit"
            twin.get_submodule(name).weight.data = matrix.to(torch.bfloat16)
            assert torch.equal(twin.get_submodule(name).weight.float(), matrix), name  # bfloat16 values already
    check_every_neuron_and_head(model, IDS, TARGET, 2e-5, weights_from=LoadedModel.from_hf(twin, name="twin"))


def test_a_long_prompt_on_a_quantized_model(saved):
    """Past FAST_ATTENTION_FROM_TOKENS the prefix runs with fast attention and the last token alone eagerly: on a
    4-bit model too, the top value neurons of a 100-token prompt equal the float64 loop over the dequantised
    matrices, and the decomposition still adds up."""
    from neuron_attribution.model.forward import FAST_ATTENTION_FROM_TOKENS

    model, twin = quantized(saved, "llama", "bnb-4bit")
    ids = torch.randint(0, TINY_VOCAB, (100,), generator=torch.Generator().manual_seed(5)).tolist()
    assert len(ids) >= FAST_ATTENTION_FROM_TOKENS
    trace = trace_token_ids(model, [ids])[0]
    result = attribute(model, ids, TARGET, top_k=5)
    assert max(r.relative for r in result.quantization_residuals) < 2e-6
    for n in result.ffn_neurons:
        assert n.score == pytest.approx(ref.ffn_neuron_score(twin, trace, n.layer, n.neuron, TARGET), abs=ATOL)
    for n in result.attention_neurons:
        expected = ref.attention_neuron_score(twin, trace, n.layer, n.head, n.dim, n.position, TARGET)
        assert n.score == pytest.approx(expected, abs=ATOL)
