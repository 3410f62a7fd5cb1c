"""The bases every value score is measured from, for one prompt and target (docs/method.md §2).

Built once per (trace, target) from the model's weights and the trace; everything in `scoring/` is then float32
math on it. Nothing here runs the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from ..model.loaded import LoadedModel
from ..model.readout import LinearReadout
from ..model.weights import LayerStack
from ..model.trace import Trace
from ..model.value_store import ValuesInFile
from ..neurons import ModelShape
from ..settings import DEFAULT_MEMORY_BUDGET
from .buffers import ModelCaches, caches_for, check_budget

@dataclass
class ValueContext:
    """The bases of every layer for one prompt and target: state 2l is h_T^{l-1} (attention's base), state 2l+1
    is the FFN's base, h_T^{l-1}+A_T^l (h_T^{l-1} again in a parallel block), state 2L is h_T^L, and state 2L+1
    is the zero vector (a neuron read alone, no context)."""

    trace: Trace
    ffn_values: LayerStack  # (L, N, d), read where the weights live
    output_weights: LayerStack  # (L, H·d_h, d)
    shape: ModelShape
    readout: LinearReadout
    target: int
    normalised_states: Tensor  # (2L+2, d): the readout's linear part applied to each state
    # The states whose vocabulary-sized quantities (log-probabilities, log-sum-exp) are wanted, None with a
    # contrast (which needs none). They are computed on first use, or by exact scoring's first product, which
    # reads them beside its own rows: on their own they would be a product of a few dozen rows, run at a
    # fraction of the speed of one of a few hundred.
    read_states: Tensor | None
    memory_budget: int  # bytes the vocabulary-sized buffers of exact scoring may take
    # A contrastive target (docs/method.md §2): every score is then Imp_target − Imp_contrast, the change of
    # log p(target) − log p(contrast), which needs the two tokens' logits only.
    contrast: int | None = None
    budget_fixed: bool = False  # use memory_budget as it is, without capping it at a GPU's free memory
    _log_probs: Tensor | None = field(default=None, repr=False)
    _log_sum_exp: Tensor | None = field(default=None, repr=False)

    @classmethod
    def build(cls, trace: Trace, ffn_values: LayerStack, output_weights: LayerStack, shape: ModelShape,
              readout: LinearReadout, target: int, memory_budget: int = DEFAULT_MEMORY_BUDGET,
              only_states: list[int] | None = None, contrast: int | None = None,
              budget_fixed: bool = False) -> ValueContext:
        """`only_states`: compute the vocabulary-sized base quantities for these states only (the others are
        NaN), for callers that score a few chosen neurons."""
        check_budget(memory_budget, readout.unembedding.shape[0])
        before = trace.layer_inputs[:, -1]  # (L, d)
        middle = trace.ffn_inputs(-1, shape.parallel)
        states = torch.stack([before, middle], dim=1).reshape(-1, before.shape[-1])
        states = torch.cat([states, trace.final_residual[-1:], states.new_zeros(1, states.shape[-1])], dim=0)
        normalised = readout.normalise(states)
        if contrast is not None:
            # Only the two tokens' logits matter: no vocabulary-sized product.
            context = cls(trace, ffn_values, output_weights, shape, readout, target, normalised, None,
                          memory_budget, contrast, budget_fixed)
            context.target_log_probs = context.pair_logit_difference(normalised)
            return context
        wanted = torch.arange(len(states), device=states.device) if only_states is None else \
            torch.tensor(sorted(set(only_states)), dtype=torch.long, device=states.device)
        return cls(trace, ffn_values, output_weights, shape, readout, target, normalised, wanted, memory_budget,
                   contrast, budget_fixed)

    def states_to_read(self) -> Tensor | None:
        """(n, d) normalised states whose base quantities are still to be computed, or None when there are none
        (already read, or a contrast): exact scoring passes their logits to `take_base_logits`."""
        if self.read_states is None or self._log_probs is not None:
            return None
        return self.normalised_states[self.read_states]

    def take_base_logits(self, logits: Tensor) -> None:
        """The base quantities from the logits of `states_to_read()`, in its order (`logits` is left as it is)."""
        log_sum_exp = torch.logsumexp(logits, dim=-1)
        log_probs = logits - log_sum_exp.unsqueeze(-1)
        n_states, wanted = len(self.normalised_states), self.read_states
        if len(wanted) < n_states:
            # states nobody asked for stay NaN, so that a score read from one could not pass for a number
            log_probs = log_probs.new_full((n_states, log_probs.shape[1]), float("nan")).index_copy_(0, wanted,
                                                                                                     log_probs)
            log_sum_exp = log_sum_exp.new_full((n_states,), float("nan")).index_copy_(0, wanted, log_sum_exp)
        self._log_probs, self._log_sum_exp = log_probs, log_sum_exp

    def read_bases(self) -> None:
        """Compute the base quantities in a product of their own, if nothing has yet. Not in a scratch buffer:
        this may run while exact scoring holds its logits in one."""
        states = self.states_to_read()
        if states is not None:
            self.take_base_logits(self.readout.logits_of_normalised(states))

    @property
    def base_log_probs(self) -> Tensor | None:
        """(2L+2, V): log softmax of each state's logits (None with a contrast)."""
        self.read_bases()
        return self._log_probs

    @property
    def base_log_sum_exp(self) -> Tensor | None:
        """(2L+2,): log-sum-exp of each state's logits (None with a contrast)."""
        self.read_bases()
        return self._log_sum_exp

    @cached_property
    def _directions(self) -> Tensor:
        """(2L+2, d): for each state x, k_x with c·(u·k_x) the tangent bound of Imp(c·u | x) (docs/method.md
        §2). Made on first use: scoring chosen neurons needs no bound."""
        unembedding = self.readout.unembedding
        if self.contrast is not None:
            # z_target − z_contrast is linear in the added vector: its slope is the same from every base, and
            # it is the exact score, not only a bound.
            difference = unembedding.row(self.target) - unembedding.row(self.contrast)
            return self.readout.pullback(difference).expand(len(self.normalised_states), -1)
        probs = torch.exp(self.base_log_probs,
                          out=self.caches.scratch.buffer("bases", *self.base_log_probs.shape, self.device))
        expected_row = unembedding.transposed_times(probs)  # p(x)·U per state
        return self.readout.pullback(unembedding.row(self.target) - expected_row)

    @property
    def caches(self) -> ModelCaches:
        """What scoring keeps between calls for this model (buffers, projections, ranks)."""
        return caches_for(self.ffn_values)

    @property
    def device(self) -> torch.device:
        """Where the trace, the weights and every product of this context live (the output head's device)."""
        return self.normalised_states.device

    @property
    def bound_directions(self) -> Tensor:
        """(2L, d): k for each layer base."""
        return self._directions[: 2 * self.shape.n_layers]

    @property
    def alone_direction(self) -> Tensor:
        """(d,): k for the zero state."""
        return self._directions[self.zero_state]

    @property
    def final_state(self) -> int:
        return 2 * self.shape.n_layers

    @property
    def zero_state(self) -> int:
        return 2 * self.shape.n_layers + 1

    @cached_property
    def target_log_probs(self) -> Tensor:
        """(2L+2,): log p(target) at each state; with a contrast, log p(target) − log p(contrast)."""
        return self.base_log_probs[:, self.target].clone()

    @cached_property
    def base_target_logits(self) -> Tensor:
        """(2L+2,): the target's logit at each state (soft-capped where the model caps), from which the direct
        part of a score, the change of that logit, is measured."""
        return self.readout.capped(self.uncapped_base_target_logits)

    @cached_property
    def uncapped_base_target_logits(self) -> Tensor:
        """(2L+2,): the target's logit at each state before any soft-capping (linear in an added vector)."""
        readout = self.readout
        logits = self.normalised_states @ readout.unembedding.row(self.target)
        return logits + readout.constant_logits[self.target] if readout.has_constant else logits

    def pair_logit_difference(self, normalised: Tensor) -> Tensor:
        """z_target − z_contrast (soft-capped where the model caps) for rows already through the readout's
        linear part: log p(target) − log p(contrast), the log-sum-exp cancelling."""
        readout = self.readout
        pair = torch.tensor([self.target, self.contrast], device=normalised.device)
        logits = normalised @ readout.unembedding.rows(pair).T
        if readout.has_constant:
            logits = logits + readout.constant_logits[pair]
        logits = readout.capped(logits)
        return logits[:, 0] - logits[:, 1]

    @cached_property
    def ffn_coefficients(self) -> Tensor:
        """(L, N): the FFN coefficients at the last position, weighing the residual directions `ffn_values`."""
        return self.trace.ffn_residual_coefficients(-1)

    @cached_property
    def attention_coefficients(self) -> AttentionCoefficients:
        """The coefficient of every attention neuron, indexed (layer, head, dim, source position)."""
        weights = self.trace.attention_weights
        scale = self.trace.attention_scale_at_last()
        if scale is not None:
            weights = weights * scale.reshape(-1, 1, 1)
        return AttentionCoefficients(weights, self.trace.value_states, self.shape)


@dataclass(frozen=True)
class AttentionCoefficients:
    """α_{T,j,p}·v_{p,kv(j),n} of every attention neuron (l, j, n, p) (times the attention post-norm's scale at
    the last position, if the block has one), computed where read. Held whole, (L, H, d_h, T) is as large as
    the prompt's count of attention neurons; only the bounds, which the top-k search needs whole, are."""

    weights: Tensor  # (L, H, T): the last position's attention row, scaled
    values: Tensor | ValuesInFile  # (L, T, H_kv, d_h); read a layer at a time where it is a file
    model_shape: ModelShape

    @property
    def shape(self) -> tuple[int, int, int, int]:
        n_layers, n_heads, n_tokens = self.weights.shape
        return n_layers, n_heads, self.values.shape[-1], n_tokens

    def __getitem__(self, index: tuple) -> Tensor:
        """(layer, head, dim, position) → the coefficient(s), integers or equal-length index tensors;
        (layer, head, dim) → (T,): that neuron at every source position."""
        layer, head, dim, *position = index
        kv_head = self.model_shape.kv_head_of(head)
        if not position:
            return self.weights[layer, head] * self.values[layer, :, kv_head, dim]
        return self.weights[layer, head, position[0]] * self.values[layer, position[0], kv_head, dim]

    def of_head(self, layer: int, head: int) -> Tensor:
        """(T, d_h): one head's coefficients, by source position."""
        return self.weights[layer, head].unsqueeze(-1) * self.values[layer, :, self.model_shape.kv_head_of(head)]

    @cached_property
    def summed(self) -> Tensor:
        """(L, H, d_h): Σ_p of the coefficients, each head's output vector in its value-dimension basis."""
        grouped = self._grouped_weights()
        if isinstance(self.values, Tensor):
            return torch.einsum("lkgt,ltkn->lkgn", grouped, self.values).reshape(self.shape[:3])
        return torch.stack([torch.einsum("kgt,tkn->kgn", grouped[layer], self.values[layer])
                            for layer in range(self.shape[0])]).reshape(self.shape[:3])

    def times(self, factors: Tensor, absolute: bool = False) -> Tensor:
        """(L, H, d_h, T): coefficient · factors[l, j, n] (|coefficient| with `absolute`), made a layer and KV head
        at a time so that nothing but the result is as large as the prompt's attention neurons."""
        result = torch.empty(self.shape, device=self.weights.device)
        for layer, heads, product in self._products(factors, absolute):
            result[layer, heads] = product
        return result

    def block_maxima(self, factors: Tensor, block: int, absolute: bool = False) -> Tensor:
        """(L, H, d_h, ⌈T/block⌉): the largest of `times(factors, absolute)` over each block of `block` source
        positions (the last block may be shorter), made a layer and KV head at a time: nothing as large as the
        prompt's attention neurons is held. Each entry is the maximum of exactly the values `bounds_at` gives."""
        n_layers, n_heads, head_dim, n_tokens = self.shape
        full, n_blocks = n_tokens // block, -(-n_tokens // block)
        result = torch.empty(n_layers, n_heads, head_dim, n_blocks, device=self.weights.device)
        for layer, heads, product in self._products(factors, absolute):
            if full:
                result[layer, heads, :, :full] = product[..., : full * block].unflatten(-1, (full, block)).amax(-1)
            if n_blocks > full:
                result[layer, heads, :, full] = product[..., full * block:].amax(-1)
        return result

    def _products(self, factors: Tensor, absolute: bool) -> Iterator[tuple[int, slice, Tensor]]:
        """(layer, the heads reading one KV head, their (g, d_h, T) coefficients · factors), one KV head at a time."""
        grouped = self._grouped_weights()
        n_kv = self.values.shape[2]
        for layer in range(self.shape[0]):
            layer_factors = factors[layer].reshape(n_kv, -1, self.shape[2], 1)
            for kv_head in range(n_kv):
                values = self.values[layer, :, kv_head].T.unsqueeze(0)  # (1, d_h, T)
                product = grouped[layer, kv_head].unsqueeze(1) * values  # (g, d_h, T)
                if absolute:
                    product.abs_()
                product.mul_(layer_factors[kv_head])
                group = product.shape[0]
                yield layer, slice(kv_head * group, (kv_head + 1) * group), product

    def bounds_at(self, flat: Tensor, factors: Tensor, absolute: bool = False) -> Tensor:
        """`times(factors, absolute)` at flat indices into (L, H, d_h, T) only."""
        layer, head, dim, position = torch.unravel_index(flat, self.shape)
        kv_head = self.model_shape.kv_head_of(head)
        coefficients = self.weights[layer, head, position] * self.values[layer, position, kv_head, dim]
        if absolute:
            coefficients = coefficients.abs()
        return coefficients * factors[layer, head, dim]

    def _grouped_weights(self) -> Tensor:
        """(L, H_kv, g, T): the attention rows with the heads that share a KV head side by side."""
        n_layers, n_heads, n_tokens = self.weights.shape
        return self.weights.reshape(n_layers, self.values.shape[2], n_heads // self.values.shape[2], n_tokens)


def readout_for(model: LoadedModel, trace: Trace, reference: bool = False) -> LinearReadout:
    return LinearReadout.at(model.adapter.final_norm(), model.adapter.unembedding_matrix,
                            model.adapter.unembedding[1], trace.final_residual[-1],
                            reference=reference, max_unembedding_norm=model.adapter.max_unembedding_norm,
                            softcap=model.shape.logit_softcap)


def value_context(model: LoadedModel, trace: Trace, target: int, *, reference: bool = False,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, only_states: list[int] | None = None,
                  contrast: int | None = None, budget_fixed: bool = False) -> ValueContext:
    adapter = model.adapter
    return ValueContext.build(trace, adapter.ffn_value_stack, adapter.output_weight_stack, model.shape,
                              readout_for(model, trace, reference), target, memory_budget, only_states, contrast,
                              budget_fixed)
