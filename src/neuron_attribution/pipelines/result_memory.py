"""The returned neurons count against the memory budget (`--max-memory`) too, not only the scoring's buffers.

A top-k of a hundred neurons takes nothing worth counting; every neuron of a model does: on SmolLM2 with a 5-token
prompt that is 132,480 neurons, each with its parts and projections (measured: 717 bytes an FFN neuron and 654 an
attention neuron as Python objects, plus the tensors they are assembled from). Attention neurons grow with the
prompt (one per source position), so without this check a long prompt's every-neuron result could outgrow any
machine while the buffers stayed within their budget."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..neurons import ModelShape
from ..scoring.buffers import smallest_budget
from ..settings import format_size

# Bytes one returned neuron takes, an upper bound of the measured 654–717 with room for the tensors behind it.
RESULT_BYTES_PER_NEURON = 1024


def returned_neurons(shape: ModelShape, n_tokens: int, wanted: int) -> int:
    """How many value neurons a top-`wanted` returns: each kind's count is clamped to the neurons it has."""
    return min(wanted, shape.n_layers * shape.d_ffn) + min(wanted, shape.attention_neurons_per_token * n_tokens)


def buffers_budget(shape: ModelShape, n_tokens: int, wanted: int, budget: int, vocabulary: int,
                   device: torch.device) -> int:
    """What the budget leaves to the scoring's vocabulary-sized buffers once the neurons asked for are counted.
    On the CPU both live in the same memory, so the buffers get the rest; on a GPU the buffers live there and the
    returned neurons in the host's memory, so each has the whole budget. A one-line UserError, before any
    scoring, where the neurons leave no room for one row of the products."""
    returned = returned_neurons(shape, n_tokens, wanted)
    need = returned * RESULT_BYTES_PER_NEURON
    shared = device.type == "cpu"
    row = smallest_budget(vocabulary) if shared else 0
    if need + row > budget:
        products = f" and one row of the vocabulary-sized products ({vocabulary} tokens) {format_size(row)}" if row \
            else ""
        each = max(0, budget - row) // RESULT_BYTES_PER_NEURON // 2
        fewer = f", or ask for fewer (--top, top_k: {each:,} of each kind fit)" if each else ""
        raise UserError(f"--max-memory {format_size(budget)} is too small: returning {returned:,} neurons with their "
                        f"parts takes about {format_size(need)}{products}; give at least {format_size(need + row)}"
                        f"{fewer}")
    return budget - need if shared else budget
