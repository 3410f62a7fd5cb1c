"""What scoring keeps between calls belongs to the model (#23 item 7): bounded, released with the model, and a
long session holds steady memory."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

import neuron_attribution as na
from neuron_attribution.scoring import buffers
from neuron_attribution.scoring.buffers import BoundedCache, caches_for
from neuron_attribution.scoring.ranks import FULL_RANK_TARGETS, ranks_for

from .conftest import TINY_VOCAB, tiny_llama


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20


def test_bounded_cache_forgets_the_least_recently_used():
    cache = BoundedCache(3)
    for key in "abc":
        cache.put(key, key.upper())
    assert cache.get("a") == "A"  # now the most recent
    cache.put("d", "D")
    assert len(cache) == 3 and cache.get("b") is None and cache.get("a") == "A"


def test_caches_are_bounded_and_released_with_the_model(monkeypatch):
    monkeypatch.setattr(buffers, "PROJECTION_ENTRIES", 5)
    model = tiny_llama()
    ids = [5, 9, 11, 3]
    na.attribute(model, ids, 1, top_k=4, query_top=0)  # vocabulary-sized products: the scratch buffers
    for target in range(1, 12):  # contrastive scoring caches each returned FFN neuron's projection
        na.attribute(model, ids, target, contrast=0, top_k=4, query_top=0)
    caches = caches_for(model.adapter.ffn_value_stack)
    assert len(caches.projections) == 5
    ranks = ranks_for(model)
    for target in range(FULL_RANK_TARGETS + 10):
        ranks.full(target)
    assert len(ranks._full) == FULL_RANK_TARGETS
    assert caches.scratch.held_bytes() > 0
    released = weakref.ref(caches)
    del caches, ranks, model
    gc.collect()
    assert released() is None
    # Replacing the weights starts afresh: nothing derived from the old ones is served.
    model = tiny_llama()
    before = caches_for(model.adapter.ffn_value_stack)
    model.adapter.forget_weights()
    assert caches_for(model.adapter.ffn_value_stack) is not before


@pytest.mark.slow  # 200 prompts, three calls each: a soak test
def test_a_long_session_holds_steady_memory():
    model = tiny_llama()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TINY_VOCAB, (int(n),), generator=generator).tolist()
               for n in torch.randint(3, 12, (200,), generator=generator)]
    chosen = [na.FfnIndex(0, 1), na.AttentionIndex(1, 0, 2, 0)]

    def attribute(prompt, i):
        na.attribute(model, prompt, i % TINY_VOCAB, top_k=5, query_top=0 if i % 4 else 3)
        na.attribute(model, prompt, i % TINY_VOCAB, contrast=(i + 1) % TINY_VOCAB, top_k=5, query_top=0)
        na.score_neurons(model, [prompt], [i % TINY_VOCAB], chosen)

    for i, prompt in enumerate(prompts[:20]):
        attribute(prompt, i)
    gc.collect()
    warmed = _rss_mb()
    for i, prompt in enumerate(prompts[20:], start=20):
        attribute(prompt, i)
    gc.collect()
    assert _rss_mb() - warmed < 25, (warmed, _rss_mb())
