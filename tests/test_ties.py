"""Ties in the top-k search (#23 item 2): successive searches over the bounds must agree on their prefixes, so
no neuron is scored twice or skipped; tied neurons are ranked by index."""

from __future__ import annotations

import pytest
import torch

from neuron_attribution import attribute
from neuron_attribution.scoring.topk import BlockBounds, TopKSearch, top_indices

from .conftest import tiny_llama_like


def _reference_order(values: torch.Tensor) -> list[int]:
    """A loop over the definition: descending value, ties to the lower index."""
    return sorted(range(len(values)), key=lambda i: (-float(values[i]), i))


def test_top_indices_orders_ties_by_index_across_chunks():
    values = torch.tensor([3.0, 1.0, 3.0, 2.0, 3.0, 2.0, 1.0, 3.0, 2.0, 0.0, 3.0])
    for chunk in (1, 2, 3, 4, 100):
        for count in range(1, len(values) + 1):
            assert top_indices(values, count, chunk=chunk).tolist() == _reference_order(values)[:count]


def test_search_with_tied_bounds_scores_each_item_once():
    bounds = torch.tensor([5.0] * 40 + [4.0] * 40 + [1.0] * 20)
    scores = bounds - 0.5 * (torch.arange(100) % 3 == 0).float()  # several items reach the bound exactly
    search = TopKSearch(bounds, 30)
    seen: list[int] = []
    while (chunk := search.pending()) is not None:
        seen += chunk.tolist()
        search.record(chunk, scores[chunk])
    assert len(seen) == len(set(seen))  # nothing scored twice
    result = search.result()
    assert result.indices.tolist() == _reference_order(scores)[:30]


def test_duplicated_ffn_neuron_ranks_like_dense():
    """Two FFN neurons with identical weights have identical bounds and scores: both are found, in index
    order, exactly as the dense ranking has them."""
    model = tiny_llama_like("llama", n_layers=2, seed=7)
    mlp = model.hf_model.model.layers[1].mlp
    with torch.no_grad():
        for weight in (mlp.gate_proj.weight, mlp.up_proj.weight):
            weight[5] = weight[2]
        mlp.down_proj.weight[:, 5] = mlp.down_proj.weight[:, 2]
    model.adapter.forget_weights()
    ids = [3, 17, 42, 8, 99, 5, 61]
    n_ffn = model.shape.n_layers * model.shape.d_ffn
    result = attribute(model, ids, 3, top_k=n_ffn, dense=True, query_top=0)
    dense = torch.as_tensor(result.dense.ffn).reshape(-1)
    assert float(dense[model.shape.d_ffn + 2]) == float(dense[model.shape.d_ffn + 5])
    expected = _reference_order(dense)
    got = [n.layer * model.shape.d_ffn + n.neuron for n in result.ffn_neurons]
    assert len(set(got)) == len(got) == n_ffn
    assert [n.score for n in result.ffn_neurons] == pytest.approx([float(dense[i]) for i in expected], abs=1e-6)
    # The twins tie exactly: the lower index comes first, the other right after it.
    twins = [got.index(model.shape.d_ffn + 2), got.index(model.shape.d_ffn + 5)]
    assert twins[1] == twins[0] + 1


def _block_bounds(values: torch.Tensor, width: int, block: int, first_blocks: int = 1) -> BlockBounds:
    """`values` (rows · width) held by blocks, as a long prompt's attention bounds are."""
    rows = values.reshape(-1, width)
    blocks_per_row = -(-width // block)
    maxima = torch.stack([rows[:, b * block: (b + 1) * block].amax(-1) for b in range(blocks_per_row)], dim=1)
    return BlockBounds(maxima, width, block, lambda flat: values[flat], first_blocks)


@pytest.mark.parametrize("width,block", [(40, 8), (37, 16), (5, 16), (64, 1)])
def test_block_bounds_give_the_dense_order_ties_included(width, block):
    """The two-level search's order is the whole bounds' order: descending, ties to the lower index, for every
    count, with a row's last block shorter than the others and values tied across blocks."""
    generator = torch.Generator().manual_seed(width + block)
    values = torch.randint(-6, 7, (9 * width,), generator=generator).float() / 2  # many exact ties
    reference = _reference_order(values)
    for count in [0, 1, 2, 3, 7, 20, 50, len(values) - 1, len(values)]:
        held = _block_bounds(values, width, block)
        assert held.top(count).tolist() == reference[:count], count
    held = _block_bounds(values, width, block)  # one object asked for growing counts, as a search asks
    for count in range(0, len(values) + 1, 13):
        assert held.top(count).tolist() == reference[:count]


def test_block_bounds_expand_only_blocks_that_can_reach_the_top():
    values = torch.zeros(200 * 256)
    values[[5, 70_000 % values.numel(), 12_345]] = torch.tensor([3.0, 2.0, 1.0])
    held = _block_bounds(values - 1, 256, 32, first_blocks=64)
    assert held.top(3).tolist() == [5, 70_000 % values.numel(), 12_345]
    assert held.items.numel() <= 64 * 32  # one round of blocks, not the 51,200 items
    search = TopKSearch(held, 3)
    while (chunk := search.pending()) is not None:
        search.record(chunk, values[chunk] - 1)
    assert search.result().indices.tolist() == [5, 70_000 % values.numel(), 12_345]
