"""One forward pass, captured through hooks: everything the scores need, float32, per prompt.

Batches are right-padded, so every real token sees exactly the tokens it would see alone and positions are
unchanged; each prompt's trace is cut to its own length afterwards.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

from .loading import LoadedModel


@dataclass
class Trace:
    """Internals of one prompt's forward pass. L layers, T tokens, d hidden, N FFN neurons, H heads."""

    token_ids: Tensor  # (T,)
    layer_inputs: Tensor  # (L, T, d): h^{l-1}, the residual entering layer l
    attention_outputs: Tensor  # (L, T, d): A^l (output bias included)
    ffn_coefficients: Tensor  # (L, T, N): m
    ffn_outputs: Tensor  # (L, T, d): F^l (output bias included)
    attention_weights: Tensor  # (L, H, T): last position's attention row, per head
    value_states: Tensor  # (L, T, H_kv, d_h)
    final_residual: Tensor  # (T, d): h^L
    logits: Tensor  # (V,): the model's logits at the last position
    # Behind post-norms (docs/method.md §1): the scale each sublayer's raw output got at each position, (L, T).
    # A neuron's vector in the residual is its coefficient times this scale times its residual direction.
    attention_output_scales: Tensor | None = None
    ffn_output_scales: Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def n_layers(self) -> int:
        return int(self.layer_inputs.shape[0])

    def last_residual_before(self, layer: int) -> Tensor:
        """h_T^{l-1}: base for attention scores of `layer`."""
        return self.layer_inputs[layer, -1]

    def ffn_inputs(self, position: int, parallel: bool) -> Tensor:
        """(L, d): the residual each layer's FFN reads at `position`: h^{l-1} + A^l, or h^{l-1} alone in a
        parallel block."""
        before = self.layer_inputs[:, position]
        return before if parallel else before + self.attention_outputs[:, position]

    def ffn_residual_coefficients(self, positions: int | Tensor) -> Tensor:
        """(L, N) at one position or (L, P, N) at several: the FFN coefficients as they weigh the residual
        directions (times the post-norm's scale there, if the block has one)."""
        coefficients = self.ffn_coefficients[:, positions]
        if self.ffn_output_scales is None:
            return coefficients
        return coefficients * self.ffn_output_scales[:, positions].unsqueeze(-1)

    def attention_scale_at_last(self) -> Tensor | None:
        """(L,): the attention post-norm's scale at the last position, or None without post-norms."""
        return None if self.attention_output_scales is None else self.attention_output_scales[:, -1]


class _Recorder:
    """Hooks that write one batch's internals into per-layer slots."""

    def __init__(self, model: LoadedModel, last_index: Tensor):
        self.model, self.adapter = model, model.adapter
        self.device = model.adapter.device  # where the scores will be computed
        self.last_index = last_index
        n = model.shape.n_layers
        keys = ["layer_inputs", "attention_outputs", "attention_weights", "value_states", "ffn_coefficients",
                "ffn_outputs"]
        if model.shape.post_norms:
            keys += ["attention_output_scales", "ffn_output_scales"]
        self.slots: dict[str, list[Tensor | None]] = {key: [None] * n for key in keys}
        self.final_residual: Tensor | None = None
        self.handles: list = []

    def _store(self, key: str, layer: int, value: Tensor) -> None:
        self.slots[key][layer] = value.detach().to(device=self.device, dtype=torch.float32)

    def install(self) -> None:
        adapter = self.adapter
        for layer, module in enumerate(adapter.decoder_layers()):
            self.handles.append(module.register_forward_pre_hook(self._layer_input(layer), with_kwargs=True))
            attention_post = adapter.attention_post_norm_module(layer)
            ffn_post = adapter.ffn_post_norm_module(layer)
            self.handles.append(adapter.attention(layer).register_forward_hook(
                self._attention(layer, keep_output=attention_post is None)))
            self.handles.append(adapter.value_source(layer).register_forward_hook(self._values(layer)))
            self.handles.append(adapter.mlp_output_projection(layer).register_forward_pre_hook(
                self._coefficients(layer)))
            if ffn_post is None:
                self.handles.append(adapter.mlp(layer).register_forward_hook(self._ffn_output(layer)))
            for module, kind in ((attention_post, "attention"), (ffn_post, "ffn")):
                if module is not None:
                    self.handles.append(module.register_forward_hook(self._post_norm(layer, kind)))
        self.handles.append(adapter.final_norm_module().register_forward_pre_hook(self._final))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _layer_input(self, layer: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            self._store("layer_inputs", layer, hidden)
        return hook

    def _post_norm(self, layer: int, kind: str):
        """The normalised sublayer output is what the residual receives; the scale is the norm's own
        1/rms of the raw output, in float32 as the norm computes it."""
        norm = self.adapter.post_norm_params(layer, kind)

        def hook(module, args, output):
            self._store(f"{kind}_outputs", layer, output)
            self._store(f"{kind}_output_scales", layer, norm.own_scale(args[0].detach().float()).squeeze(-1))
        return hook

    def _attention(self, layer: int, keep_output: bool):
        def hook(module, args, output):
            attention_output, weights = output[0], output[1]
            if weights is None:
                raise RuntimeError("attention weights were not returned; the model must use eager attention")
            if keep_output:
                self._store("attention_outputs", layer, attention_output)
            rows = torch.arange(weights.shape[0], device=weights.device)
            # (B, H, Tq, Tk) -> each prompt's own last query row: (B, H, Tk)
            self._store("attention_weights", layer, weights[rows, :, self.last_index.to(weights.device), :])
        return hook

    def _values(self, layer: int):
        def hook(module, args, output):
            self._store("value_states", layer, self.adapter.values_from_output(layer, output))
        return hook

    def _coefficients(self, layer: int):
        def hook(module, args):
            self._store("ffn_coefficients", layer, args[0])
        return hook

    def _ffn_output(self, layer: int):
        def hook(module, args, output):
            self._store("ffn_outputs", layer, output[0] if isinstance(output, tuple) else output)
        return hook

    def _final(self, module, args):
        self.final_residual = args[0].detach().to(device=self.device, dtype=torch.float32)


@contextmanager
def _recording(model: LoadedModel, last_index: Tensor):
    recorder = _Recorder(model, last_index)
    recorder.install()
    try:
        yield recorder
    finally:
        recorder.remove()


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

    def run(self, model: LoadedModel):
        device = model.device
        batch, width = self.input_ids.shape
        positions = torch.arange(width, device=device).unsqueeze(0).expand(batch, -1)
        return model.hf_model(input_ids=self.input_ids.to(device), attention_mask=self.mask.to(device),
                              position_ids=positions, use_cache=False)

    def last_logits(self, output) -> Tensor:
        """(B, V) float32 logits at each prompt's own last token."""
        rows = torch.arange(self.input_ids.shape[0], device=output.logits.device)
        return output.logits[rows, (self.lengths - 1).to(output.logits.device)].detach().float().cpu()


def trace_token_ids(model: LoadedModel, batch: Sequence[Sequence[int]]) -> list[Trace]:
    """Run one padded forward pass over `batch` (lists of token ids) and return a trace per prompt."""
    padded = PaddedBatch.of(batch)
    lengths, input_ids = padded.lengths, padded.input_ids
    with torch.inference_mode(), _recording(model, padded.lengths - 1) as recorder:
        output = padded.run(model)
    logits = padded.last_logits(output)  # (B, V): only the last positions are kept, not (B, T, V)
    del output
    stacked = {}
    for key in list(recorder.slots):
        stacked[key] = torch.stack(recorder.slots.pop(key), dim=1)  # (B, L, ...); the per-layer slots go
    alone = len(lengths) == 1

    def own(t: Tensor) -> Tensor:
        # In a batch each row gets its own copy, without the padding; a prompt traced alone keeps the stacked
        # storage: no second copy of a long prompt's activations.
        return t if alone else t.clone()

    traces = []
    for row, length in enumerate(lengths.tolist()):
        traces.append(Trace(
            token_ids=input_ids[row, :length].clone(),
            layer_inputs=own(stacked["layer_inputs"][row, :, :length]),
            attention_outputs=own(stacked["attention_outputs"][row, :, :length]),
            ffn_coefficients=own(stacked["ffn_coefficients"][row, :, :length]),
            ffn_outputs=own(stacked["ffn_outputs"][row, :, :length]),
            attention_weights=own(stacked["attention_weights"][row, :, :, :length]),
            value_states=own(stacked["value_states"][row, :, :length]),
            final_residual=own(recorder.final_residual[row, :length]),
            logits=logits[row].to(recorder.device, copy=True),
            **{key: own(stacked[key][row, :, :length]) for key in ("attention_output_scales", "ffn_output_scales")
               if key in stacked},
        ))
    return traces
