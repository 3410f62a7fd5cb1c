"""Reading neurons in the vocabulary: a neuron's vector through the final norm's gain and the unembedding, and a
query neuron as one head carries it (docs/method.md §2–3)."""

from __future__ import annotations

import torch

from ..errors import UserError
from ..model.loaded import LoadedModel
from ..model.prompts import token_texts
from ..model.readout import project_to_vocabulary
from ..neurons import AttentionIndex, ExpertIndex, FfnIndex, HeadIndex, as_index
from ..results.attribution import AttentionNeuron, FfnNeuron, Projection
from ..scoring import query


def project(model: LoadedModel, neuron: str | FfnNeuron | AttentionNeuron | FfnIndex | AttentionIndex | tuple,
            k: int = 10) -> Projection:
    """The neuron's value vector through the final norm's gain and the unembedding, U(γ ⊙ u), sorted.

    `neuron`: its text ("25_1120", "23_1_17"), an FfnNeuron or AttentionNeuron from a result, an FfnIndex or
    AttentionIndex, ("ffn", layer, neuron) or ("attention", layer, head, dim). Top tokens are promoted when the neuron's coefficient is
    positive, bottom tokens when it is negative."""
    return projection_of(model, neuron_vector(model, neuron), k)


def projection_of(model: LoadedModel, vector: torch.Tensor, k: int) -> Projection:
    logits = project_to_vocabulary(model.adapter.final_norm(), model.adapter.unembedding_matrix, vector)
    top, bottom = logits.topk(k), logits.topk(k, largest=False)
    return Projection(token_texts(model, top.indices.tolist()), top.indices.tolist(), top.values.tolist(),
                      token_texts(model, bottom.indices.tolist()), bottom.indices.tolist(), bottom.values.tolist())


def neuron_vector(model: LoadedModel, neuron) -> torch.Tensor:
    """The (d,) direction an FFN or attention neuron writes into the residual per unit of coefficient (its
    value vector, times a post-norm's gain where the block has one)."""
    index = as_index(neuron)
    if isinstance(index, (HeadIndex, ExpertIndex)):
        kind = "a head" if isinstance(index, HeadIndex) else "a whole expert"
        raise UserError(f"{kind} has no single vector: {index}; give an FFN or attention neuron")
    model.shape.check(index)
    if isinstance(index, FfnIndex):
        return model.adapter.ffn_value_stack.layers[index.layer].row(model.shape.ffn_row(index))
    return model.adapter.output_weight_stack.layers[index.layer].row(model.shape.head_column(index.head, index.dim))


def interpret_query_neuron(model: LoadedModel, ffn_layer: int, neuron: int, layer: int, head: int,
                           k: int = 10, coefficient: float | None = None, expert: int | None = None) -> Projection:
    """A query FFN neuron as one head carries it (docs/method.md §3): its value vector through `layer`'s input
    norm, `head`'s value and output projections, then projected to the vocabulary like any neuron.

    `coefficient`: the neuron's coefficient where it acts (`QueryNeuron.coefficient`). Given, the vector is
    taken with that sign, so the top tokens are the ones it promotes there (a negative coefficient writes the
    opposite of the value vector); without it, the top tokens are those of a positive coefficient. `expert`: the
    routed expert of a mixture-of-experts layer the neuron belongs to (`QueryNeuron.expert`)."""
    s = model.shape
    ffn = FfnIndex(ffn_layer, neuron, expert)
    for index in (ffn, HeadIndex(layer, head)):
        s.check(index)
    vector = model.adapter.ffn_value_stack.layers[ffn_layer].row(s.ffn_row(ffn))
    if coefficient is not None and coefficient < 0:
        vector = -vector
    carried = query.interpret_through_head(model.adapter.layer_weights(layer), s, vector, head)
    return projection_of(model, carried, k)
