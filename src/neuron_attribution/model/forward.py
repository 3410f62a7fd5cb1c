"""How the model is run for a trace or an intervention: right-padded batches of short prompts, and switching a
long prompt's prefix to the model's fast attention."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .hf_internals import attention_implementation_of, can_switch_attention, set_attention_implementation
from .loaded import LoadedModel

# From this many tokens a prompt is traced alone, its prefix with the model's fast attention.
FAST_ATTENTION_FROM_TOKENS = 64
# Queries per call when a long prompt must run eagerly (a family whose attention cannot be switched at run time):
# through the KV cache a block at a time, so the attention weights are H·QUERY_BLOCK·T per layer, never H·T².
QUERY_BLOCK = 128


def has_fast_attention(model: LoadedModel) -> bool:
    """Whether the family can run its prompt under SDPA and switch back to eager attention for the last token."""
    return can_switch_attention(model.hf_model)


def attention_path(model: LoadedModel) -> str:
    """How a long prompt is traced, in words (`info`)."""
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
        if self.input_ids.shape[1] < FAST_ATTENTION_FROM_TOKENS:
            return self.last_logits(self.run(model))
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
