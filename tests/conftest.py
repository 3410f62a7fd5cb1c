"""Models for the tests: tiny random GPT-2 and Llama-with-GQA built from configs, and the real default model."""

from __future__ import annotations

import pytest
import torch
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from neuron_attribution import LoadedModel, load_model

TINY_VOCAB = 257


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random biases and norm gains too, so that every bias and gain in the decomposition is exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "ln" in name or "norm" in name:
                parameter.copy_(1.0 + 0.3 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                parameter.copy_(0.3 * noise if parameter.dim() > 1 else 0.1 * noise)


def tiny_gpt2() -> LoadedModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_head=4, n_embd=32, n_inner=48, vocab_size=TINY_VOCAB, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False)
    model = GPT2LMHeadModel(config)
    _randomise(model, 1)
    return LoadedModel.from_hf(model, name="tiny-gpt2")


_SWIGLU_FAMILIES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
                    "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny_llama_like(family: str, n_layers: int = 2, seed: int = 4) -> LoadedModel:
    """Llama with grouped-query attention (2 KV heads for 4 query heads), and Mistral and Qwen2 (q/k/v
    biases), which the Llama adapter covers."""
    config_class, model_class = _SWIGLU_FAMILIES[family]
    torch.manual_seed(0)
    config = config_class(hidden_size=32, intermediate_size=40, num_hidden_layers=n_layers, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=64,
                          tie_word_embeddings=False, head_dim=8)
    model = model_class(config)
    _randomise(model, seed)
    return LoadedModel.from_hf(model, name=f"tiny-{family}")


def _tiny_config(family: str, parallel: bool = True):
    """Configs of the other families, small enough for loops over every neuron, with grouped-query attention
    where the family has it."""
    import transformers as tf
    common = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                  vocab_size=TINY_VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    gqa = dict(num_key_value_heads=2, head_dim=8)
    if family == "gemma":
        return tf.GemmaConfig(**common, **gqa)
    if family == "gemma2":
        # A low cap, so that soft-capping changes the scores and the certified top-k is exercised.
        return tf.Gemma2Config(**common, **gqa, final_logit_softcapping=3.0, attn_logit_softcapping=5.0,
                               query_pre_attn_scalar=8, sliding_window=4)
    if family == "gemma3_text":
        return tf.Gemma3TextConfig(**common, **gqa, query_pre_attn_scalar=8, sliding_window=4)
    if family == "olmo2":
        return tf.Olmo2Config(**common, num_key_value_heads=2)
    if family == "phi3":
        return tf.Phi3Config(**common, num_key_value_heads=2, pad_token_id=0)
    if family == "phi":
        return tf.PhiConfig(**common, num_key_value_heads=2, partial_rotary_factor=0.5, qk_layernorm=True,
                            resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**common, use_parallel_residual=parallel, rotary_pct=0.5, attention_bias=True,
                                hidden_dropout=0.0, attention_dropout=0.0)
    if family == "gptj":
        return tf.GPTJConfig(n_embd=32, n_inner=40, n_layer=2, n_head=4, vocab_size=TINY_VOCAB, n_positions=64,
                             rotary_dim=4, tie_word_embeddings=False, resid_pdrop=0.0, embd_pdrop=0.0,
                             attn_pdrop=0.0)
    raise ValueError(family)


OTHER_FAMILIES = ["gemma", "gemma2", "gemma3_text", "olmo2", "phi3", "phi", "gpt_neox", "gptj"]


def tiny_family(family: str, parallel: bool = True, seed: int = 6) -> LoadedModel:
    """A tiny random model of one of OTHER_FAMILIES (gpt_neox with `parallel=False`: its sequential block)."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny_config(family, parallel))
    _randomise(model, seed)
    model.eval()
    return LoadedModel.from_hf(model, name=f"tiny-{family}")


def tiny_llama() -> LoadedModel:
    return tiny_llama_like("llama", n_layers=3, seed=2)


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model(request) -> LoadedModel:
    return tiny_gpt2() if request.param == "gpt2" else tiny_llama()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """A test that loads the real model is slow whether it says so or not: the quick loop (-m "not slow") runs
    without it. Runs before pytest's own marker selection."""
    for item in items:
        if "real_model" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def real_model() -> LoadedModel:
    return load_model()


PROMPTS = ["The capital of France is", "Tim Duncan plays the sport of", "In 1999, the colour of the sky was",
           "One, two, three,"]


@pytest.fixture(scope="session")
def token_batches() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, TINY_VOCAB, (n,), generator=generator).tolist() for n in (5, 9, 1, 7)]
