"""The hooks behind a trace (`model/trace.py`): they write a forward pass's internals, float32 on the scoring device,
into per-layer slots, one piece per model call, and join the pieces into (B, L, ...) tensors afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from . import experts as moe
from .loaded import LoadedModel
from .value_store import ValuesInFile

# Recorded at the kept positions only; the value states and the attention row cover every position.
_PER_POSITION = ("layer_inputs", "attention_outputs", "ffn_coefficients", "ffn_outputs", "attention_output_scales",
                 "ffn_output_scales", "shared_gates")


class _Recorder:
    """Hooks that write a forward pass's internals into per-layer slots, one piece per model call (a prompt may
    run as a prefix and then its last token)."""

    def __init__(self, model: LoadedModel, last_index: Tensor, kept: Tensor | None, every_row: bool = False,
                 values: bool = True, values_file: ValuesInFile | None = None):
        self.model, self.adapter = model, model.adapter
        self.every_row = every_row  # keep every query's attention row too (a circuit's short prompt)
        self.values = values  # record the value states (not for a pass made only for its per-position records)
        self.values_file = values_file  # where a single prompt's value states go instead of memory
        self.device = model.adapter.device  # where the scores will be computed
        self.last_index = last_index  # per batch row, the absolute position of its last token
        self.kept = kept  # absolute positions to keep, or None for all
        self.offset = 0  # absolute position of the current call's first token
        n = model.shape.n_layers
        keys = ["layer_inputs", "attention_outputs", "attention_weights", "ffn_coefficients", "ffn_outputs"]
        if values and values_file is None:
            keys.append("value_states")
        if every_row:
            keys.append("attention_rows")
        if model.shape.post_norms:
            keys += ["attention_output_scales", "ffn_output_scales"]
        if model.shape.n_experts:
            # A mixture's FFN coefficients come in parts, joined in `stacked`: the routed experts', and the shared
            # expert's (in "ffn_coefficients") with its gate.
            keys += ["expert_coefficients", "shared_gates"]
        self.slots: dict[str, list[list[Tensor]]] = {key: [[] for _ in range(n)] for key in keys}
        self.final_residual: list[Tensor] = []
        self.handles: list = []
        self.call_shape: tuple[int, ...] = ()  # (B, t) of the current call, for tensors a family flattened

    def _kept_part(self, value: Tensor) -> Tensor:
        """`value` (B, t, ...) over this call's t positions, cut to the kept ones among them."""
        if self.kept is None:
            return value
        inside = (self.kept >= self.offset) & (self.kept < self.offset + value.shape[1])
        return value[:, (self.kept[inside] - self.offset).to(value.device)]

    def _float(self, value: Tensor) -> Tensor:
        # A copy even where dtype and device already match: some blocks add into a sublayer's output in place
        # after it is returned (Falcon's `mlp_output += attention_output`).
        return value.detach().to(device=self.device, dtype=torch.float32, copy=True)

    def _store(self, key: str, layer: int, value: Tensor) -> None:
        """`value` is (B, t, ...) over this call's t positions; per-position keys keep only the kept ones."""
        if key in _PER_POSITION:
            value = self._kept_part(value)
        self.slots[key][layer].append(self._float(value))

    def install(self) -> None:
        adapter = self.adapter
        for layer, module in enumerate(adapter.decoder_layers()):
            self.handles.append(module.register_forward_pre_hook(self._layer_input(layer), with_kwargs=True))
            attention_post = adapter.attention_post_norm_module(layer)
            ffn_post = adapter.ffn_post_norm_module(layer)
            self.handles.append(adapter.attention(layer).register_forward_hook(
                self._attention(layer, keep_output=attention_post is None)))
            if self.values:
                self.handles.append(adapter.value_source(layer).register_forward_hook(self._values(layer)))
            experts, shared_gate = adapter.experts(layer), adapter.shared_expert_gate(layer)
            if experts is not None:
                self.handles.append(experts.register_forward_hook(self._experts(layer)))
            if shared_gate is not None:
                self.handles.append(shared_gate.register_forward_hook(self._shared_gate(layer)))
            down = adapter.mlp_output_projection(layer)
            if down is not None:
                self.handles.append(down.register_forward_pre_hook(self._coefficients(layer)))
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
            self.call_shape = hidden.shape[:2]
            self._store("layer_inputs", layer, hidden)
        return hook

    def _per_token(self, value: Tensor) -> Tensor:
        """(B, t, ...) from a sublayer tensor that the family flattened to (B·t, ...) (OPT's FFN)."""
        return value if value.dim() == 3 else value.reshape(*self.call_shape, -1)

    def _post_norm(self, layer: int, kind: str):
        """The normalised sublayer output is what the residual receives; the scale is the norm's own
        1/rms of the raw output, in float32 as the norm computes it."""
        norm = self.adapter.post_norm_params(layer, kind)

        def hook(module, args, output):
            self._store(f"{kind}_outputs", layer, output)
            self._store(f"{kind}_output_scales", layer, norm.own_scale(args[0].detach().float()).squeeze(-1))
        return hook

    def _own_output(self, args, output: Tensor) -> Tensor:
        """A sublayer's output as the residual receives it: less the residual a family's module adds to it
        itself (Bloom), times the residual multiplier (Granite)."""
        if self.adapter.sublayers_add_residual:
            output = output - args[1]
        multiplier = self.adapter.residual_multiplier
        return output if multiplier == 1.0 else output * multiplier

    def _attention(self, layer: int, keep_output: bool):
        def hook(module, args, output):
            attention_output, weights = self._own_output(args, output[0]), output[1]
            if keep_output:
                self._store("attention_outputs", layer, attention_output)
            tokens = attention_output.shape[1]
            if not bool((self.last_index < self.offset + tokens).all()):
                return  # a prefix under fast attention: the last query row comes with the last token
            if weights is None:
                raise RuntimeError("attention weights were not returned; the last token must use eager attention")
            rows = torch.arange(weights.shape[0], device=weights.device)
            # The weights may cover only the call's last queries (a single pass that keeps the last row alone).
            query = (self.last_index - self.offset - (tokens - weights.shape[2])).to(weights.device)
            # (B, H, t, K) -> each prompt's own last query row over the K keys it sees: (B, H, K)
            self._store("attention_weights", layer, weights[rows, :, query, :])
            if self.every_row:
                self._store("attention_rows", layer, weights)
        return hook

    def _values(self, layer: int):
        def hook(module, args, output):
            if self.model.probing:
                return  # an intervention measuring this layer's attention once more, not a pass of the prompt
            values = self.adapter.values_from_output(layer, output)
            if self.values_file is not None:
                self.values_file.write(layer, self.offset, values[0])
                return
            self._store("value_states", layer, values)
        return hook

    def _coefficients(self, layer: int):
        def hook(module, args):
            self._store("ffn_coefficients", layer, self._per_token(args[0]))
        return hook

    def _kept_rows(self, device: torch.device) -> Tensor:
        """Which rows of this call's tokens flattened to (B·t) are at kept positions, batch row by batch row."""
        batch, tokens = self.call_shape
        positions = torch.arange(tokens, device="cpu")
        if self.kept is not None:
            positions = self._kept_part(positions.unsqueeze(0))[0]
        return (torch.arange(batch, device="cpu").unsqueeze(1) * tokens + positions).reshape(-1).to(device)

    def _experts(self, layer: int):
        """The routed experts' coefficients g_e·m_{e,k} at the kept positions, from the router's choice the
        module is called with, checked against the module's output there."""
        def hook(module, args, output):
            hidden, top_k_index, top_k_weights = args[:3]
            rows = self._kept_rows(hidden.device)
            coefficients = moe.coefficients(module, hidden[rows], top_k_index[rows], top_k_weights[rows])
            coefficients = moe.scaled_by_intervention(self.model.expert_scalings, module, coefficients,
                                                      rows // self.call_shape[1])
            moe.check_reproduces(module, layer, coefficients, output[rows])
            batch = self.call_shape[0]
            self.slots["expert_coefficients"][layer].append(
                coefficients.reshape(batch, -1, coefficients.shape[1] * coefficients.shape[2]).to(self.device))
        return hook

    def _shared_gate(self, layer: int):
        def hook(module, args, output):
            self._store("shared_gates", layer, self._per_token(torch.sigmoid(output.float())))
        return hook

    def _ffn_output(self, layer: int):
        def hook(module, args, output):
            output = self._own_output(args, output[0] if isinstance(output, tuple) else output)
            self._store("ffn_outputs", layer, self._per_token(output))
        return hook

    def _final(self, module, args):
        self.final_residual.append(self._float(self._kept_part(args[0])))

    def _join_mixture_coefficients(self) -> None:
        """Each layer's FFN coefficients of a mixture: the routed experts', then the shared expert's times its
        gate (where it has one)."""
        experts = self.slots.pop("expert_coefficients", None)
        gates = self.slots.pop("shared_gates", None)
        if experts is None:
            return
        for layer, routed in enumerate(experts):
            shared = self.slots["ffn_coefficients"][layer]
            if gates[layer]:
                shared = [part * gate for part, gate in zip(shared, gates[layer])]
            self.slots["ffn_coefficients"][layer] = [torch.cat([r, *s], dim=-1)
                                                     for r, *s in zip(routed, *([shared] if shared else []))]

    def stacked(self, n_tokens: int) -> dict[str, Tensor]:
        """(B, L, ...) per key, the pieces of every call joined along positions. An attention row over fewer
        keys than tokens (a sliding-window layer's cache holds only the window) covers the last positions: the
        ones before are outside the window, where the weight is zero."""
        result = {}
        self._join_mixture_coefficients()
        for key, per_layer in self.slots.items():
            if key == "attention_rows":
                result[key] = torch.stack([pieces[-1] for pieces in per_layer], dim=1)
            elif key == "attention_weights":
                rows = [pieces[-1] for pieces in per_layer]
                rows = [torch.nn.functional.pad(row, (n_tokens - row.shape[-1], 0)) for row in rows]
                result[key] = torch.stack(rows, dim=1)
            else:
                result[key] = _joined(per_layer)
            per_layer.clear()
        result["final_residual"] = torch.cat(self.final_residual, dim=1)
        return result


def _joined(per_layer: list[list[Tensor]]) -> Tensor:
    """(B, L, t, ...): each layer's pieces joined along positions, written into one tensor and let go a layer at a
    time, so a long prompt's value states are held about once, not three times (pieces, joined, stacked)."""
    first = per_layer[0][0]
    length = sum(piece.shape[1] for piece in per_layer[0])
    result = first.new_empty((first.shape[0], len(per_layer), length, *first.shape[2:]))
    for layer, pieces in enumerate(per_layer):
        offset = 0
        for piece in pieces:
            result[:, layer, offset: offset + piece.shape[1]] = piece
            offset += piece.shape[1]
        pieces.clear()
    return result


@contextmanager
def recording(model: LoadedModel, last_index: Tensor, kept: Tensor | None = None,
              every_row: bool = False, values: bool = True, values_file: ValuesInFile | None = None
              ) -> Iterator[_Recorder]:
    """The hooks of a trace, installed inside the block. `values_file`: a single prompt's value states are written
    there instead of kept (`stacked` then has no "value_states")."""
    recorder = _Recorder(model, last_index, kept, every_row, values, values_file)
    with model.lock:
        try:
            recorder.install()  # inside the try: hooks installed before a failure are removed too
            yield recorder
        finally:
            recorder.remove()
