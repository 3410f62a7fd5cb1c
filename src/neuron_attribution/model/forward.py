"""How the model is run for a trace or an intervention: right-padded batches of short prompts, and switching a
long prompt's prefix to the model's fast attention."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .heap import trimmed_after
from .hf_internals import (attention_implementation_of, can_switch_attention, family_eager_attention,
                           register_attention, registered_attention, set_attention_implementation)
from .loaded import LoadedModel

# From this many tokens a prompt is traced alone, its prefix with the model's fast attention.
FAST_ATTENTION_FROM_TOKENS = 64
# Queries per call when a long prompt must run eagerly (a family whose attention cannot be switched at run time):
# through the KV cache a block at a time, so the attention weights are H·QUERY_BLOCK·T per layer, never H·T².
QUERY_BLOCK = 128


# A long prompt's trace runs in one pass under this attention implementation: SDPA for every query, and the
# family's own eager attention once more for the last query, whose weights are the row a trace keeps and whose
# output replaces SDPA's there, so the last position is computed exactly as under eager attention. No KV cache is
# made (the two-pass way, SDPA over the prefix and then the last token over its cache, held 2·L·T·d_kv numbers).
LAST_ROW_ATTENTION = "neuron_attribution_last_row"


def _sdpa_with_last_row(module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                        **kwargs) -> tuple[Tensor, Tensor]:
    if query.shape[0] != 1:
        raise ValueError("the one-pass trace runs one prompt at a time (its last query is the last column)")
    output, _ = registered_attention("sdpa")(module, query, key, value, attention_mask, **kwargs)
    kwargs.pop("is_causal", None)
    last_output, weights = family_eager_attention(module)(module, query[:, :, -1:], key, value,
                                                          _last_row_of_mask(attention_mask, query.dtype), **kwargs)
    if last_output.shape != output[:, -1:].shape:
        raise RuntimeError(f"{type(module).__name__}'s eager attention returned {tuple(last_output.shape)} for the "
                           f"last query, SDPA {tuple(output[:, -1:].shape)}")
    output[:, -1:] = last_output
    return output, weights


def _last_row_of_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The last query's row of an SDPA mask (True: may attend), as the additive mask eager attention adds; None
    (a causal mask SDPA applies itself) lets the last query see every key, as causality does."""
    if mask is None:
        return None
    row = mask[..., -1:, :]
    if row.dtype != torch.bool:
        return row
    return torch.zeros(row.shape, dtype=dtype, device=row.device).masked_fill_(~row, torch.finfo(dtype).min)


register_attention(LAST_ROW_ATTENTION, _sdpa_with_last_row)


def trimming_heap(model: LoadedModel, n_tokens: int) -> AbstractContextManager[None]:
    """A long pass gives freed memory back after each attention sublayer and each block (`heap.trimmed_after`)."""
    layers = model.adapter.decoder_layers()
    return trimmed_after([model.adapter.attention(i) for i in range(len(layers))] + layers, n_tokens)


def has_fast_attention(model: LoadedModel) -> bool:
    """Whether the family can run its prompt under SDPA (switching its attention implementation at run time)."""
    return can_switch_attention(model.hf_model)


def traces_in_one_pass(model: LoadedModel) -> bool:
    """Whether a long prompt is traced in one pass under `LAST_ROW_ATTENTION`: the family can switch its attention
    and its modelling file has the eager attention function that pass calls for the last query."""
    if not has_fast_attention(model):
        return False
    return all(family_eager_attention(model.adapter.attention(layer)) is not None
               for layer in range(model.shape.n_layers))


def attention_path(model: LoadedModel) -> str:
    """How a long prompt is traced, in words (`info`)."""
    if traces_in_one_pass(model):
        return (f"fast attention (SDPA) in one pass, the last query's attention row and output from eager "
                f"attention in the same pass (prompts of {FAST_ATTENTION_FROM_TOKENS}+ tokens; no KV cache)")
    if has_fast_attention(model):
        return (f"fast attention (SDPA) up to the last token, whose attention row comes exactly from eager attention "
                f"over the KV cache (prompts of {FAST_ATTENTION_FROM_TOKENS}+ tokens)")
    return "eager attention over the whole prompt (this family has no switchable fast attention)"


@contextmanager
def attention_implementation(model: LoadedModel, name: str) -> Iterator[None]:
    """Run the model with `name` attention inside the block (holding the model's lock: the choice lives on its
    shared config)."""
    hf_model = model.hf_model
    with model.lock:
        before = attention_implementation_of(hf_model)
        set_attention_implementation(hf_model, name)
        try:
            yield
        finally:
            set_attention_implementation(hf_model, before)


@dataclass(frozen=True)
class PaddedBatch:
    """Prompts right-padded into one batch, with explicit positions, so each sees only its own tokens."""

    input_ids: Tensor  # (B, W)
    mask: Tensor  # (B, W)
    lengths: Tensor  # (B,)

    @classmethod
    def of(cls, batch: Sequence[Sequence[int]]) -> PaddedBatch:
        if not batch or any(len(ids) == 0 for ids in batch):
            raise ValueError("every prompt needs at least one token")
        # Token ids and lengths are bookkeeping on the host; `run` moves what the model reads to its device.
        lengths = torch.tensor([len(ids) for ids in batch], device="cpu")
        input_ids = torch.zeros(len(batch), int(lengths.max()), dtype=torch.long, device="cpu")
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.as_tensor(list(ids), dtype=torch.long, device="cpu")
            mask[row, : len(ids)] = 1
        return cls(input_ids, mask, lengths)

    @property
    def _last_positions(self) -> Tensor:
        return torch.unique(self.lengths - 1)

    def run(self, model: LoadedModel):
        """The forward pass, its logits computed at the prompts' last positions only (no (B, T, V) tensor)."""
        device = model.device
        batch, width = self.input_ids.shape
        positions = torch.arange(width, device=device).unsqueeze(0).expand(batch, -1)
        return model.hf_model(input_ids=self.input_ids.to(device), attention_mask=self.mask.to(device),
                              position_ids=positions, use_cache=False,
                              logits_to_keep=self._last_positions.to(device))

    def last_logits_linear(self, model: LoadedModel) -> Tensor:
        """(B, V) float32 logits at each prompt's last token, in memory linear in the prompt's length: a short
        batch in one eager pass (as always); a long one with the model's fast attention, or, for a family that
        cannot switch, eagerly a block of queries at a time through the KV cache."""
        width = self.input_ids.shape[1]
        if width < FAST_ATTENTION_FROM_TOKENS:
            return self.last_logits(self.run(model))
        with trimming_heap(model, width):
            if has_fast_attention(model):
                with attention_implementation(model, "sdpa"):
                    return self.last_logits(self.run(model))
            return self._last_logits_in_blocks(model, QUERY_BLOCK)

    def _last_logits_in_blocks(self, model: LoadedModel, block: int) -> Tensor:
        device = model.device
        batch, width = self.input_ids.shape
        ids, mask, last = self.input_ids.to(device), self.mask.to(device), self.lengths - 1
        result: Tensor | None = None
        cache = None
        for start in range(0, width, block):
            stop = min(start + block, width)
            ending = torch.nonzero((last >= start) & (last < stop)).flatten()  # rows whose last token is here
            keep = torch.unique(last[ending] - start) if len(ending) else torch.tensor([stop - start - 1], device="cpu")
            positions = torch.arange(start, stop, device=device).unsqueeze(0).expand(batch, -1)
            output = model.hf_model(input_ids=ids[:, start:stop], attention_mask=mask[:, :stop],
                                    position_ids=positions, past_key_values=cache, use_cache=True,
                                    logits_to_keep=keep.to(device))
            cache = output.past_key_values
            if len(ending):
                columns = torch.searchsorted(keep, last[ending] - start).to(output.logits.device)
                logits = output.logits[ending.to(output.logits.device), columns].detach().float().cpu()
                if result is None:
                    result = torch.empty(batch, logits.shape[-1], device="cpu")
                result[ending] = logits
            del output
        assert result is not None
        return result

    def last_logits(self, output) -> Tensor:
        """(B, V) float32 logits at each prompt's own last token."""
        rows = torch.arange(self.input_ids.shape[0], device=output.logits.device)
        columns = torch.searchsorted(self._last_positions, self.lengths - 1).to(output.logits.device)
        return output.logits[rows, columns].detach().float().cpu()
