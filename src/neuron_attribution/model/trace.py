"""One forward pass, captured through hooks: everything the scores need, float32, per prompt.

What is kept grows linearly with the prompt: value states and the last position's attention row at every
position (attention neurons sit at every source position), and the other per-position tensors only at the
positions that are kept — every position for a short prompt, the last one (plus any asked for) for a long one.
A long prompt runs in one pass with the model's fast attention (SDPA), the last query computed once more by the
family's eager attention inside the same pass (`forward.LAST_ROW_ATTENTION`), which returns exactly the last
query's attention row without a T×T matrix per head and without a KV cache. A family that can switch to SDPA but
has no eager function by the usual name runs its prefix under SDPA, then the last token alone eagerly over the KV
cache; families without a switchable fast attention run eagerly over the whole prompt (`attention_path`).

Short prompts traced together are right-padded, so every real token sees exactly the tokens it would see alone
and positions are unchanged; each prompt's trace is cut to its own length afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .forward import (FAST_ATTENTION_FROM_TOKENS, LAST_ROW_ATTENTION, PaddedBatch, attention_implementation,
                      has_fast_attention, traces_in_one_pass, trimming_heap)
from .loaded import LoadedModel
from .recording import recording
from .value_store import ValuesInFile, keeps_values_in_a_file

# A prompt whose full per-position record (L·(3d + N) float32 per token) would exceed this keeps it at its last
# position only; query scoring traces the prompt up to the source positions it reads (`with_positions`).
FULL_RECORD_BYTES = 128 * 2**20


class PositionsNotKept(LookupError):
    """A trace was asked for per-position data at positions it did not keep."""


@dataclass
class Trace:
    """Internals of one prompt's forward pass. L layers, T tokens, P kept positions, d hidden, N FFN neurons,
    H heads. Per-position fields hold the kept positions in ascending order, the last position last, so index -1
    is always the last token; `slots` maps positions to their index."""

    token_ids: Tensor  # (T,)
    layer_inputs: Tensor  # (L, P, d): h^{l-1}, the residual entering layer l
    attention_outputs: Tensor  # (L, P, d): A^l (output bias included)
    ffn_coefficients: Tensor  # (L, P, N): m; in a mixture g·m of the chosen experts' neurons (0: not chosen)
    ffn_outputs: Tensor  # (L, P, d): F^l (output bias included)
    attention_weights: Tensor  # (L, H, T): last position's attention row, per head
    # (L, T, H_kv, d_h): every position; in a file past `value_store.VALUES_IN_MEMORY_BYTES` on the CPU (indexed
    # the same way); empty in a trace made only for its per-position records (the pass `with_positions` adds
    # positions from)
    value_states: Tensor | ValuesInFile
    final_residual: Tensor  # (P, d): h^L
    logits: Tensor  # (V,): the model's logits at the last position
    # Behind post-norms (docs/method.md §1): the scale each sublayer's raw output got at each position, (L, P).
    # A neuron's vector in the residual is its coefficient times this scale times its residual direction.
    attention_output_scales: Tensor | None = None
    ffn_output_scales: Tensor | None = None
    kept_positions: Tensor | None = None  # (P,) ascending, on the CPU; None: every position is kept
    attention_rows: Tensor | None = None  # (L, H, T, T): every query's row, where asked for (a circuit's prompt)

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.layer_inputs.shape[0])

    def keeps(self, positions: Sequence[int]) -> bool:
        """Whether the per-position fields hold every one of `positions`."""
        if self.kept_positions is None:
            return True
        return bool(torch.isin(torch.as_tensor(list(positions), dtype=torch.long),
                               self.kept_positions).all())

    def slots(self, positions: int | Tensor) -> int | Tensor:
        """Where absolute position(s) sit in the per-position fields (-1 stays the last position)."""
        if self.kept_positions is None:
            return positions
        if isinstance(positions, int) and positions in (-1, self.n_tokens - 1):
            return -1
        wanted = torch.as_tensor(positions, dtype=torch.long, device="cpu")
        found = torch.searchsorted(self.kept_positions, wanted.clamp(min=0))
        found = found.clamp(max=len(self.kept_positions) - 1)
        if not bool((self.kept_positions[found] == wanted).all()):
            missing = sorted(set(wanted.reshape(-1).tolist()) - set(self.kept_positions.tolist()))
            raise PositionsNotKept(f"this trace keeps per-position data at {len(self.kept_positions)} positions, "
                                   f"not at {missing}")
        if isinstance(positions, int):
            return int(found)
        device = positions.device if isinstance(positions, Tensor) else "cpu"
        return found.to(device)

    def layer_input(self, layer: int, position: int) -> Tensor:
        """h_p^{l-1}: the residual entering `layer` at `position`."""
        return self.layer_inputs[layer, self.slots(position)]

    def ffn_inputs(self, position: int, parallel: bool) -> Tensor:
        """(L, d): the residual each layer's FFN reads at `position`: h^{l-1} + A^l, or h^{l-1} alone in a
        parallel block."""
        slot = self.slots(position)
        before = self.layer_inputs[:, slot]
        return before if parallel else before + self.attention_outputs[:, slot]

    def ffn_residual_coefficients(self, positions: int | Tensor) -> Tensor:
        """(L, N) at one position or (L, P, N) at several: the FFN coefficients as they weigh the residual
        directions (times the post-norm's scale there, if the block has one)."""
        slots = self.slots(positions)
        coefficients = self.ffn_coefficients[:, slots]
        if self.ffn_output_scales is None:
            return coefficients
        return coefficients * self.ffn_output_scales[:, slots].unsqueeze(-1)

    def attention_scale_at_last(self) -> Tensor | None:
        """(L,): the attention post-norm's scale at the last position, or None without post-norms."""
        return None if self.attention_output_scales is None else self.attention_output_scales[:, -1]


def trace_token_ids(model: LoadedModel, batch: Sequence[Sequence[int]],
                    positions: Sequence[int] | None = None, every_attention_row: bool = False,
                    values: bool = True) -> list[Trace]:
    """A trace per prompt of `batch` (lists of token ids). Per-position data is kept at every position of a
    short prompt and at the last position of one whose full record would pass `FULL_RECORD_BYTES`; `positions`
    adds positions to keep (for every prompt). Short prompts share one padded forward pass.
    `every_attention_row`: the traces keep every query's attention row too (`Trace.attention_rows`), from the
    same pass; quadratic in length by nature, so only for prompts under FAST_ATTENTION_FROM_TOKENS tokens.
    `values=False`: no value states are recorded (a pass made only for its per-position records)."""
    plans = [_kept_positions(model, len(ids), positions) for ids in batch]
    traces: list[Trace | None] = [None] * len(batch)
    together = [i for i, (ids, kept) in enumerate(zip(batch, plans))
                if kept is None and len(ids) < FAST_ATTENTION_FROM_TOKENS]
    if every_attention_row and len(together) < len(batch):
        raise ValueError(f"every attention row is kept for prompts under {FAST_ATTENTION_FROM_TOKENS} tokens only")
    if together:
        traced = _trace_padded(model, [batch[i] for i in together], every_attention_row, values)
        for i, trace in zip(together, traced):
            traces[i] = trace
    for i, ids in enumerate(batch):
        if traces[i] is None:
            traces[i] = _trace_alone(model, ids, plans[i], values)
    return traces


def with_positions(model: LoadedModel, trace: Trace, positions: Sequence[int]) -> Trace:
    """`trace` if it keeps per-position data at `positions`, else `trace` with that data added. It comes from a
    pass over the prompt up to the last of the missing positions only: in a causal model nothing at a position
    depends on later tokens, so a long prompt's early positions cost a short pass, and the prompt's own record
    (its value states above all) is not made a second time."""
    if trace.keeps(positions):
        return trace
    held = set(trace.kept_positions.tolist())
    missing = sorted({p for p in positions if 0 <= p < trace.n_tokens} - held)
    if not missing:
        return trace
    # Without value states: the prompt's own cover every position, and the prefix's would be as large as the
    # prompt's up to there.
    prefix = trace_token_ids(model, [trace.token_ids[: missing[-1] + 1].tolist()], positions=missing, values=False)[0]
    return _with_positions_of(trace, prefix, missing)


def _with_positions_of(trace: Trace, prefix: Trace, missing: list[int]) -> Trace:
    """`trace` keeping per-position data at `missing` too, taken from `prefix` (a trace of the prompt's start)."""
    kept = sorted(set(trace.kept_positions.tolist()) | set(missing))
    from_prefix = set(missing)

    def joined(field: str) -> Tensor | None:
        ours, theirs = getattr(trace, field), getattr(prefix, field)
        if ours is None:
            return None
        axis = 0 if field == "final_residual" else 1
        pieces = [(theirs if p in from_prefix else ours).select(axis, (prefix if p in from_prefix else trace).slots(p))
                  for p in kept]
        return torch.stack(pieces, dim=axis)

    fields = ("layer_inputs", "attention_outputs", "ffn_coefficients", "ffn_outputs", "final_residual",
              "attention_output_scales", "ffn_output_scales")
    return replace(trace, **{field: joined(field) for field in fields},
                   kept_positions=torch.tensor(kept, dtype=torch.long, device="cpu"))


def full_record_bytes(model: LoadedModel, n_tokens: int) -> int:
    """Bytes of a prompt's per-position record kept at every position."""
    s = model.shape
    return 4 * n_tokens * s.n_layers * (3 * s.d_model + s.d_ffn)


def _kept_positions(model: LoadedModel, n_tokens: int, extra: Sequence[int] | None) -> Tensor | None:
    if full_record_bytes(model, n_tokens) <= FULL_RECORD_BYTES:
        return None
    wanted = {n_tokens - 1} | {p for p in (extra or ()) if 0 <= p < n_tokens}
    return torch.tensor(sorted(wanted), dtype=torch.long, device="cpu")


def _trace_padded(model: LoadedModel, batch: Sequence[Sequence[int]], every_row: bool = False, values: bool = True
                  ) -> list[Trace]:
    padded = PaddedBatch.of(batch)
    lengths, input_ids = padded.lengths, padded.input_ids
    with torch.inference_mode(), recording(model, padded.lengths - 1, every_row=every_row,
                                           values=values) as recorder:
        output = padded.run(model)
        logits = padded.last_logits(output)
        del output
        stacked = recorder.stacked(input_ids.shape[1])
    alone = len(lengths) == 1

    def own(t: Tensor) -> Tensor:
        # In a batch each row gets its own copy, without the padding; a prompt traced alone keeps the stacked
        # storage: no second copy of a long prompt's activations.
        return t if alone else t.clone()

    traces = []
    for row, length in enumerate(lengths.tolist()):
        traces.append(_trace_of({key: own(_cut(key, value[row], length)) for key, value in stacked.items()},
                                input_ids[row, :length].clone(), logits[row].to(recorder.device, copy=True)))
    return traces


def _cut(key: str, value: Tensor, length: int) -> Tensor:
    """One prompt's share of a padded batch's tensor: its first `length` positions."""
    if key == "final_residual":
        return value[:length]
    if key == "attention_weights":
        return value[:, :, :length]
    if key == "attention_rows":
        return value[:, :, :length, :length]
    return value[:, :length]


def _trace_alone(model: LoadedModel, ids: Sequence[int], kept: Tensor | None, values: bool = True) -> Trace:
    token_ids = torch.as_tensor(list(ids), dtype=torch.long, device="cpu")
    n_tokens = len(token_ids)
    device = model.device
    inputs = token_ids.unsqueeze(0).to(device)
    positions = torch.arange(n_tokens, device=device).unsqueeze(0)
    last = torch.tensor([n_tokens - 1], device="cpu")
    s = model.shape
    in_file = values and keeps_values_in_a_file(s.n_layers, n_tokens, s.n_kv_heads, s.head_dim, model.adapter.device)
    values_file = ValuesInFile(s.n_layers, n_tokens, s.n_kv_heads, s.head_dim) if in_file else None
    with torch.inference_mode(), recording(model, last, kept, values=values, values_file=values_file) as recorder, \
            trimming_heap(model, n_tokens):
        if n_tokens > 1 and traces_in_one_pass(model):
            with attention_implementation(model, LAST_ROW_ATTENTION):
                output = model.hf_model(input_ids=inputs, position_ids=positions, use_cache=False, logits_to_keep=1)
        elif n_tokens > 1 and has_fast_attention(model):
            with attention_implementation(model, "sdpa"):
                prefix = model.hf_model(input_ids=inputs[:, :-1], position_ids=positions[:, :-1], use_cache=True,
                                        logits_to_keep=1)
            recorder.offset = n_tokens - 1
            output = model.hf_model(input_ids=inputs[:, -1:], position_ids=positions[:, -1:],
                                    past_key_values=prefix.past_key_values, use_cache=True)
            del prefix
        else:
            output = model.hf_model(input_ids=inputs, position_ids=positions, use_cache=False, logits_to_keep=1)
        logits = output.logits[0, -1].detach().to(device=recorder.device, dtype=torch.float32)
        del output
        stacked = recorder.stacked(n_tokens)
    parts = {key: value[0] for key, value in stacked.items()}
    if values_file is not None:
        parts["value_states"] = values_file
    trace = _trace_of(parts, token_ids, logits)
    trace.kept_positions = kept
    return trace


def _trace_of(parts: dict[str, Tensor], token_ids: Tensor, logits: Tensor) -> Trace:
    if "value_states" not in parts:
        layers = parts["layer_inputs"].shape[0]
        parts["value_states"] = parts["layer_inputs"].new_empty(layers, 0, 0, 0)
    return Trace(token_ids=token_ids, layer_inputs=parts["layer_inputs"],
                 attention_outputs=parts["attention_outputs"], ffn_coefficients=parts["ffn_coefficients"],
                 ffn_outputs=parts["ffn_outputs"], attention_weights=parts["attention_weights"],
                 value_states=parts["value_states"], final_residual=parts["final_residual"], logits=logits,
                 attention_output_scales=parts.get("attention_output_scales"),
                 ffn_output_scales=parts.get("ffn_output_scales"), attention_rows=parts.get("attention_rows"))
