"""The registry of tiny configs the family tests run over: a family is one adapter file in the package plus one
entry here. Each entry is a config small enough for float64 loops over every neuron, and the facts of its block
as its Hugging Face modules have them (which module normalises what, whether the block is parallel, gain
offsets, logit multipliers), read by tests/reference.py independently of the package's adapters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import transformers as tf

TINY_VOCAB = 257
COMMON = dict(hidden_size=32, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
              vocab_size=TINY_VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
GQA = dict(num_key_value_heads=2, head_dim=8)
NO_DROPOUT = dict(hidden_dropout=0.0, attention_dropout=0.0)


@dataclass(frozen=True)
class Block:
    """Where a family's norms sit (module names inside a decoder layer; None: the sublayer reads the raw
    residual), whether attention and FFN read the same residual (parallel), and how logits are formed."""

    layers: str = "model.layers"
    attention_norm: str | None = "input_layernorm"
    ffn_norm: str | None = "post_attention_layernorm"
    post_norms: tuple[str, str] | None = None  # (after the attention, after the FFN)
    parallel: Callable[[object], bool] = lambda config: False
    gain_offset: float = 0.0  # RMSNorm/LayerNorm multiplying by 1 + weight
    final_norm: str = "model.norm"
    logit_multiplier: Callable[[object], float] = lambda config: 1.0
    residual_multiplier: Callable[[object], float] = lambda config: 1.0  # on each sublayer's output
    gate_activation: str | None = None  # a gated FFN's activation, where config.hidden_act does not say
    # A mixture-of-experts FFN: the experts module with 3-D weights gate_up_proj (E, 2N_e, d) and down_proj
    # (E, d, N_e), the router whose output is (logits, weights of the chosen, their indices), and optionally a
    # shared expert (a gated MLP) and the gate whose sigmoid scales it.
    experts: str | None = None
    router: str | None = None
    shared_expert: str | None = None
    shared_gate: str | None = None


@dataclass(frozen=True)
class TinyFamily:
    config: Callable[[], object] | None  # None: built elsewhere (tests/conftest.py's GPT-2 and Llama makers)
    block: Block = Block()


SANDWICH = Block(ffn_norm="pre_feedforward_layernorm",
                 post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))
POST_ONLY = Block(attention_norm=None, ffn_norm=None,
                  post_norms=("post_attention_layernorm", "post_feedforward_layernorm"))

MOE = dict(intermediate_size=16, num_experts_per_tok=2)
MIXTURE = Block(experts="mlp.experts", router="mlp.gate")

FAMILIES: dict[str, TinyFamily] = {
    # built by conftest's own makers
    "gpt2": TinyFamily(None, Block(layers="transformer.h", attention_norm="ln_1", ffn_norm="ln_2",
                                   final_norm="transformer.ln_f")),
    "llama": TinyFamily(None), "mistral": TinyFamily(None), "qwen2": TinyFamily(None), "qwen3": TinyFamily(None),
    # the family tests' registry
    "gemma": TinyFamily(lambda: tf.GemmaConfig(**COMMON, **GQA), Block(gain_offset=1.0)),
    # A low cap, so that soft-capping changes the scores and the certified top-k is exercised.
    "gemma2": TinyFamily(lambda: tf.Gemma2Config(**COMMON, **GQA, final_logit_softcapping=3.0,
                                                 attn_logit_softcapping=5.0, query_pre_attn_scalar=8,
                                                 sliding_window=4),
                         Block(**{**SANDWICH.__dict__, "gain_offset": 1.0})),
    "gemma3_text": TinyFamily(lambda: tf.Gemma3TextConfig(**COMMON, **GQA, query_pre_attn_scalar=8, sliding_window=4),
                              Block(**{**SANDWICH.__dict__, "gain_offset": 1.0})),
    "olmo2": TinyFamily(lambda: tf.Olmo2Config(**COMMON, num_key_value_heads=2), POST_ONLY),
    "phi3": TinyFamily(lambda: tf.Phi3Config(**COMMON, num_key_value_heads=2, pad_token_id=0)),
    "phi": TinyFamily(lambda: tf.PhiConfig(**COMMON, num_key_value_heads=2, partial_rotary_factor=0.5,
                                           qk_layernorm=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                           attention_dropout=0.0),
                      Block(ffn_norm="input_layernorm", parallel=lambda c: True, final_norm="model.final_layernorm")),
    "gpt_neox": TinyFamily(lambda: tf.GPTNeoXConfig(**COMMON, use_parallel_residual=True, rotary_pct=0.5,
                                                    attention_bias=True, **NO_DROPOUT),
                           Block(layers="gpt_neox.layers", parallel=lambda c: c.use_parallel_residual,
                                 final_norm="gpt_neox.final_layer_norm")),
    "gpt_neox_sequential": TinyFamily(lambda: tf.GPTNeoXConfig(**COMMON, use_parallel_residual=False, rotary_pct=0.5,
                                                               attention_bias=True, **NO_DROPOUT),
                                      Block(layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm")),
    "gptj": TinyFamily(lambda: tf.GPTJConfig(n_embd=32, n_inner=40, n_layer=2, n_head=4, vocab_size=TINY_VOCAB,
                                             n_positions=64, rotary_dim=4, tie_word_embeddings=False, resid_pdrop=0.0,
                                             embd_pdrop=0.0, attn_pdrop=0.0),
                       Block(layers="transformer.h", attention_norm="ln_1", ffn_norm="ln_1", parallel=lambda c: True,
                             final_norm="transformer.ln_f")),
    "smollm3": TinyFamily(lambda: tf.SmolLM3Config(**COMMON, num_key_value_heads=2, pad_token_id=0)),
    "olmo3": TinyFamily(lambda: tf.Olmo3Config(**COMMON, num_key_value_heads=2, sliding_window=4), POST_ONLY),
    "exaone4": TinyFamily(lambda: tf.Exaone4Config(**COMMON, num_key_value_heads=2, sliding_window=4), POST_ONLY),
    "starcoder2": TinyFamily(lambda: tf.Starcoder2Config(**COMMON, num_key_value_heads=2, residual_dropout=0.0,
                                                         embedding_dropout=0.0, attention_dropout=0.0),
                             Block()),
    "stablelm": TinyFamily(lambda: tf.StableLmConfig(**COMMON, num_key_value_heads=2, **NO_DROPOUT)),
    "stablelm_parallel": TinyFamily(lambda: tf.StableLmConfig(**COMMON, num_key_value_heads=2,
                                                              use_parallel_residual=True, **NO_DROPOUT),
                                    Block(ffn_norm="input_layernorm", parallel=lambda c: c.use_parallel_residual)),
    "nemotron": TinyFamily(lambda: tf.NemotronConfig(**COMMON, num_key_value_heads=2, partial_rotary_factor=0.5),
                           Block(gain_offset=1.0)),
    "olmo": TinyFamily(lambda: tf.OlmoConfig(**COMMON, num_key_value_heads=2)),
    "glm4": TinyFamily(lambda: tf.Glm4Config(**COMMON, **GQA, pad_token_id=0),
                       Block(post_norms=("post_self_attn_layernorm", "post_mlp_layernorm"))),
    "cohere": TinyFamily(lambda: tf.CohereConfig(**COMMON, num_key_value_heads=2, logit_scale=0.5, pad_token_id=0),
                         Block(ffn_norm="input_layernorm", parallel=lambda c: True,
                               logit_multiplier=lambda c: c.logit_scale)),
    "cohere2": TinyFamily(lambda: tf.Cohere2Config(**COMMON, num_key_value_heads=2, logit_scale=0.5, sliding_window=4,
                                                   pad_token_id=0),
                          Block(ffn_norm="input_layernorm", parallel=lambda c: True,
                                logit_multiplier=lambda c: c.logit_scale)),
    "gpt_neo": TinyFamily(lambda: tf.GPTNeoConfig(hidden_size=32, intermediate_size=40, num_layers=2, num_heads=4,
                                                  vocab_size=TINY_VOCAB, max_position_embeddings=64, window_size=4,
                                                  attention_types=[[["global", "local"], 1]], resid_dropout=0.0,
                                                  embed_dropout=0.0, attention_dropout=0.0,
                                                  tie_word_embeddings=False),
                          Block(layers="transformer.h", attention_norm="ln_1", ffn_norm="ln_2",
                                final_norm="transformer.ln_f")),
    "gpt_bigcode": TinyFamily(lambda: tf.GPTBigCodeConfig(n_embd=32, n_inner=40, n_layer=2, n_head=4,
                                                          vocab_size=TINY_VOCAB, n_positions=64, resid_pdrop=0.0,
                                                          embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False),
                              Block(layers="transformer.h", attention_norm="ln_1", ffn_norm="ln_2",
                                    final_norm="transformer.ln_f")),
    "opt": TinyFamily(lambda: tf.OPTConfig(hidden_size=32, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4,
                                           vocab_size=TINY_VOCAB, max_position_embeddings=64, word_embed_proj_dim=32,
                                           dropout=0.0, attention_dropout=0.0, pad_token_id=0,
                                           tie_word_embeddings=False),
                      Block(layers="model.decoder.layers", attention_norm="self_attn_layer_norm",
                            ffn_norm="final_layer_norm", final_norm="model.decoder.final_layer_norm")),
    "falcon": TinyFamily(lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 ffn_hidden_size=40, vocab_size=TINY_VOCAB, bias=True,
                                                 hidden_dropout=0.0, attention_dropout=0.0, max_position_embeddings=64,
                                                 tie_word_embeddings=False),
                         Block(layers="transformer.h", ffn_norm="input_layernorm", parallel=lambda c: True,
                               final_norm="transformer.ln_f")),
    "falcon_grouped": TinyFamily(lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                         num_kv_heads=2, new_decoder_architecture=True,
                                                         ffn_hidden_size=40, vocab_size=TINY_VOCAB,
                                                         hidden_dropout=0.0, attention_dropout=0.0,
                                                         max_position_embeddings=64, tie_word_embeddings=False),
                                 Block(layers="transformer.h", attention_norm="ln_attn", ffn_norm="ln_mlp",
                                       parallel=lambda c: True, final_norm="transformer.ln_f")),
    "bloom": TinyFamily(lambda: tf.BloomConfig(hidden_size=32, n_layer=2, n_head=4, vocab_size=TINY_VOCAB,
                                               hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=False),
                        Block(layers="transformer.h", final_norm="transformer.ln_f")),
    "granite": TinyFamily(lambda: tf.GraniteConfig(**COMMON, num_key_value_heads=2, embedding_multiplier=3.0,
                                                   residual_multiplier=0.4, attention_multiplier=0.2,
                                                   logits_scaling=2.5),
                          Block(logit_multiplier=lambda c: 1 / c.logits_scaling,
                                residual_multiplier=lambda c: c.residual_multiplier)),
    # mixtures of experts: 4 experts of 16 neurons, 2 chosen per token
    "mixtral": TinyFamily(lambda: tf.MixtralConfig(**{**COMMON, **MOE}, num_key_value_heads=2, num_local_experts=4,
                                                   router_jitter_noise=0.0), MIXTURE),
    "qwen3_moe": TinyFamily(lambda: tf.Qwen3MoeConfig(**COMMON, **GQA, num_experts=4, num_experts_per_tok=2,
                                                      moe_intermediate_size=16, norm_topk_prob=True), MIXTURE),
    "olmoe": TinyFamily(lambda: tf.OlmoeConfig(**{**COMMON, **MOE}, num_key_value_heads=2, num_experts=4), MIXTURE),
    "qwen2_moe": TinyFamily(lambda: tf.Qwen2MoeConfig(**COMMON, num_key_value_heads=2, num_experts=4,
                                                      num_experts_per_tok=2, moe_intermediate_size=16,
                                                      shared_expert_intermediate_size=24),
                            Block(experts="mlp.experts", router="mlp.gate", shared_expert="mlp.shared_expert",
                                  shared_gate="mlp.shared_expert_gate")),
    "granitemoe": TinyFamily(lambda: tf.GraniteMoeConfig(**{**COMMON, **MOE}, num_key_value_heads=2,
                                                         num_local_experts=4, embedding_multiplier=3.0,
                                                         residual_multiplier=0.4, attention_multiplier=0.2,
                                                         logits_scaling=2.5),
                             Block(logit_multiplier=lambda c: 1 / c.logits_scaling,
                                   residual_multiplier=lambda c: c.residual_multiplier,
                                   experts="block_sparse_moe.experts", router="block_sparse_moe.router")),
    "phimoe": TinyFamily(lambda: tf.PhimoeConfig(**{**COMMON, **MOE}, num_key_value_heads=2, num_local_experts=4,
                                                 attention_bias=True, lm_head_bias=True),
                         Block(experts="mlp.experts", router="mlp.router")),
    "flex_olmo": TinyFamily(lambda: tf.FlexOlmoConfig(**{**COMMON, **MOE}, num_key_value_heads=2, num_experts=4,
                                                      pad_token_id=0, eos_token_id=1, bos_token_id=None),
                            Block(**{**POST_ONLY.__dict__, "experts": "mlp.experts", "router": "mlp.gate"})),
}

# Variants that share a model type with another entry: `block_of` picks theirs by the config.
VARIANTS_OF = {"gpt_neox": {"gpt_neox_sequential": lambda c: not c.use_parallel_residual},
               "stablelm": {"stablelm_parallel": lambda c: c.use_parallel_residual},
               "falcon": {"falcon_grouped": lambda c: c.new_decoder_architecture}}

# The families with their own tiny config (the others are made by conftest's makers), and the variants tested.
_VARIANT_NAMES = {name for variants in VARIANTS_OF.values() for name in variants}
OTHER_FAMILIES = [name for name, family in FAMILIES.items() if family.config is not None and name not in _VARIANT_NAMES]
ALL_VARIANTS = [name for name, family in FAMILIES.items() if family.config is not None]


def block_of(model_type: str, config) -> Block:
    """A model's block facts, by its model type and, for variants sharing one, its config."""
    for name, applies in VARIANTS_OF.get(model_type, {}).items():
        if applies(config):
            return FAMILIES[name].block
    return FAMILIES[model_type].block
