"""Switching neurons off, or scaling what they contribute, through hooks (docs/method.md §5). The model's
weights are never touched: hooks are installed for the duration of a `with` block and removed on the way out,
exceptions included. An `Ablation`'s `scale` k multiplies the chosen neurons' contributions: 0 (the default)
switches them off, 2 doubles them, −1 reverses them, 1 changes nothing.

* FFN neuron (layer, neuron): its coefficient is multiplied by k at every position (input of the FFN output
  projection).
* Expert neuron (layer, neuron, expert) of a mixture-of-experts layer, or a whole expert (layer, expert): wherever
  the router chose the expert, (k − 1) times the neuron's contribution g_e·m_{e,k}·fc2_{e,k} is added to the
  experts' output (`model/experts.py`). The router is left as it is: the other experts keep their weights.
* Attention neuron (layer, head, dim): its column of the heads' concatenated output is multiplied by k at every
  position (input of the attention output projection); a whole head its d_h columns.
* Position-specific attention neuron (layer, head, dim, source position): (1 − k) times its contribution
  α_{t,head,p}·v_{p,kv(head),dim}·W_O[head, dim] is subtracted from the attention output at every query
  position t. This is exact for grouped-query models too, where scaling the shared value state itself would
  also change the other query heads that read the same KV head.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..neurons import AttentionIndex, ExpertIndex, FfnIndex, HeadIndex, as_index
from .experts import ExpertScaling
from .loaded import LoadedModel
from .forward import PaddedBatch
from .prompts import Prompt, encode_prompt


@dataclass(frozen=True)
class Ablation:
    """What to switch off (or, with `scale`, amplify): index types (`FfnIndex`, `AttentionIndex`, `HeadIndex`,
    `ExpertIndex`) or plain tuples."""

    ffn: Sequence[tuple[int, ...]] = ()  # (layer, neuron) or, in a mixture of experts, (layer, neuron, expert)
    attention: Sequence[tuple[int, int, int]] = ()  # (layer, head, dim), every source position
    attention_at: Sequence[tuple[int, int, int, int]] = ()  # (layer, head, dim, source position)
    heads: Sequence[tuple[int, int]] = ()  # (layer, head)
    experts: Sequence[tuple[int, int]] = ()  # (layer, expert): every neuron of a routed expert
    # What the neurons' contributions are multiplied by: 0 switches them off, k amplifies them k-fold.
    scale: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.scale, (int, float)) or isinstance(self.scale, bool) or self.scale != self.scale \
                or abs(self.scale) == float("inf"):
            raise UserError(f"an intervention's scale must be a finite number, got {self.scale!r}")

    def __len__(self) -> int:
        return len(self.ffn) + len(self.attention) + len(self.attention_at) + len(self.heads) + len(self.experts)

    @classmethod
    def of(cls, neurons, scale: float = 0.0) -> Ablation:
        """Switch off (scale 0) or scale the given neurons, sorted by kind (an attention neuron without a
        position: every position). A neuron is named by its text ("25_1120", "23_1_17@2", "21.19"), its index
        type, a result's neuron, or a tuple form (`neurons.as_index`)."""
        if isinstance(neurons, (str, FfnIndex, AttentionIndex, HeadIndex, ExpertIndex)):
            neurons = [neurons]  # one neuron, not a sequence of them
        ffn, attention, attention_at, heads, experts = [], [], [], [], []
        for n in map(as_index, neurons):
            if isinstance(n, FfnIndex):
                ffn.append(n)
            elif isinstance(n, ExpertIndex):
                experts.append(n)
            elif isinstance(n, AttentionIndex):
                (attention if n.position is None else attention_at).append(n)
            elif isinstance(n, HeadIndex):
                heads.append(n)
            else:
                raise TypeError(f"not a neuron index: {n!r}")
        return cls(ffn, [a[:3] for a in attention], attention_at, heads, experts, scale)


def _check(model: LoadedModel, ablation: Ablation) -> None:
    s = model.shape
    for index in ablation.ffn:
        s.check(FfnIndex(*index))
    for index in ablation.attention:
        s.check(AttentionIndex(*index))
    for index in ablation.heads:
        s.check(HeadIndex(*index))
    for index in ablation.attention_at:
        s.check(AttentionIndex(*index))
    for index in ablation.experts:
        s.check(ExpertIndex(*index))


@dataclass
class _Plan:
    """Ablations of R rows (R = 1: the same for every row of a batch), grouped by layer as masks of factors
    (1 where nothing changes)."""

    rows: int
    ffn_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (R, N)
    column_masks: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (R, H·d_h)
    # layer -> (row, head, dim, source position, the factor its contribution is multiplied by)
    positioned: dict[int, list[tuple[int, int, int, int, float]]] = field(default_factory=lambda: defaultdict(list))


def _plan(model: LoadedModel, ablations: Sequence[Ablation]) -> _Plan:
    s = model.shape
    plan = _Plan(len(ablations))

    def mask(masks: dict[int, torch.Tensor], layer: int, width: int) -> torch.Tensor:
        if layer not in masks:
            masks[layer] = torch.ones(plan.rows, width, device="cpu")  # the hook moves it to the layer's device
        return masks[layer]

    for row, ablation in enumerate(ablations):
        _check(model, ablation)
        k = float(ablation.scale)
        for index in ablation.ffn:
            index = FfnIndex(*index)
            mask(plan.ffn_masks, index.layer, s.d_ffn)[row, s.ffn_row(index)] = k
        for layer, expert in ablation.experts:
            rows = s.expert_row_range(expert)
            mask(plan.ffn_masks, layer, s.d_ffn)[row, rows.start: rows.stop] = k
        for layer, head, dim in ablation.attention:
            mask(plan.column_masks, layer, s.n_heads * s.head_dim)[row, s.head_column(head, dim)] = k
        for layer, head in ablation.heads:
            first = s.head_column(head, 0)
            mask(plan.column_masks, layer, s.n_heads * s.head_dim)[row, first: first + s.head_dim] = k
        for layer, head, dim, position in ablation.attention_at:
            plan.positioned[layer].append((row, head, dim, position, k))
    return plan


def _masking(mask: torch.Tensor):
    """Pre-hook multiplying the module's input by a (R, width) mask of factors, row by row (R = 1 broadcasts).
    Multiplying by 1 leaves a value bit-identical."""

    def hook(module, args):
        hidden = args[0]
        factors = mask.to(device=hidden.device, dtype=hidden.dtype)
        shaped = hidden
        if hidden.dim() == 2:  # tokens flattened to (B·t, width) (OPT's FFN), the batch's rows in order
            shaped = hidden.reshape(factors.shape[0], -1, hidden.shape[-1])
        return ((shaped * factors.unsqueeze(1)).reshape(hidden.shape), *args[1:])
    return hook


class _CallPositions:
    """The absolute position of the current model call's first token, read from the `position_ids` every run
    here passes: a long prompt runs as blocks of queries through the KV cache."""

    def __init__(self) -> None:
        self.first = 0

    def read(self, module, args, kwargs) -> None:
        positions = kwargs.get("position_ids")
        self.first = 0 if positions is None else int(positions.min())


class _PositionedAttention:
    """Scales chosen (row, head, dim, source position) contributions in one layer's attention output by
    subtracting (1 − k) times each, α_{t,head,p}·v_{p,kv(head),dim}·W_O[head, dim] at every query t.

    α·v comes from the attention weights where the module returns them (eager attention: a whole prompt, or blocks
    of queries through the KV cache, whose value rows at the positions read are kept across blocks). Under the
    model's fast attention, which returns none, the attention module is run once more per source position read,
    with the value states at that position scaled by 1 + PROBE: the heads' outputs change by exactly PROBE·α·v at
    every query (attention is linear in the values), which gives the columns needed and no others — never an
    H·T·T matrix. Recorders skip that extra run (`LoadedModel.probing`)."""

    PROBE = 256.0

    def __init__(self, model: LoadedModel, layer: int, neurons: list[tuple[int, int, int, int, float]], rows: int,
                 call: _CallPositions):
        self.model, self.adapter, self.layer, self.shape, self.rows, self.call = \
            model, model.adapter, layer, model.shape, rows, call
        self.index = torch.tensor([n[:4] for n in neurons], dtype=torch.long, device="cpu").reshape(-1, 4)
        self.removed = torch.tensor([1.0 - n[4] for n in neurons], dtype=torch.float64, device="cpu")
        self.read = sorted({n[3] for n in neurons})  # the source positions read
        self.block_values: torch.Tensor | None = None  # (B, t, H_kv, d_h) of the current call's tokens
        self.kept: dict[int, torch.Tensor] = {}  # source position -> (B, H_kv, d_h), across blocks
        self.probing: int | None = None  # the source position whose values the extra run scales
        self.heads_output: dict[bool, torch.Tensor] = {}  # the heads' concatenated outputs: {probing?: (B, t, H·d_h)}

    def capture_values(self, module, args, output) -> None:
        values = self.adapter.values_from_output(self.layer, output)
        if self.probing is None:
            self.block_values = values
            return
        if values.untyped_storage().data_ptr() != output.untyped_storage().data_ptr():
            raise RuntimeError(f"{type(module).__name__}'s value states are not a view of its output: "
                               "cannot probe them under fast attention")
        values[:, self.probing - self.call.first] *= 1.0 + self.PROBE  # in place: the attention reads this output

    def capture_heads_output(self, module, args) -> None:
        self.heads_output[self.probing is not None] = args[0].detach()

    def _values_at(self, first: int, tokens: int) -> torch.Tensor:
        """(B, len(read), H_kv, d_h): value rows at the read positions (zeros for those not reached yet), the
        current call's tokens being positions first..first+tokens-1."""
        if first == 0:
            self.kept = {}
        for position in self.read:
            if first <= position < first + tokens:
                self.kept[position] = self.block_values[:, position - first]
        rows = [self.kept.get(p, torch.zeros_like(self.block_values[:, 0])) for p in self.read]
        return torch.stack(rows, dim=1)

    def subtract(self, module, args, kwargs, output):
        if self.probing is not None:
            return None  # the extra run: measured, not corrected
        attention_output, weights = output[0], output[1]
        batch, tokens = attention_output.shape[:2]
        first = self.call.first
        # The keys are the positions up to this call's last one: all of them, or a sliding window's last ones.
        key_start = first if weights is None else first + tokens - weights.shape[-1]
        row, head, dim, position = self.index.unbind(-1)
        removed = self.removed
        if self.rows == 1:  # the same neurons in every row of the batch
            count = row.numel()
            row = torch.arange(batch, device=row.device).repeat_interleave(count)
            head, dim, position = head.repeat(batch), dim.repeat(batch), position.repeat(batch)
            removed = removed.repeat(batch)
        # not reached yet (a later block), or out of a sliding window's cache
        inside = (position < first + tokens) & (position >= (0 if weights is None else key_start))
        row, head, dim, position, removed = row[inside], head[inside], dim[inside], position[inside], removed[inside]
        device = attention_output.device
        direction = self.adapter.layer_weights(self.layer).output_weight[head, dim].to(device)  # (M, d)
        if weights is None:
            contribution = self._probed(module, args, kwargs, row, head, dim, position)  # (M, t) α·v
        else:
            contribution = self._from_weights(weights, first, tokens, key_start, row, head, dim, position)
        contribution = contribution * removed.to(device=device, dtype=contribution.dtype).unsqueeze(-1)
        vectors = contribution.unsqueeze(-1) * direction.to(contribution.dtype).unsqueeze(1)  # (M, t, d)
        correction = torch.zeros_like(attention_output).index_add_(0, row.to(device), vectors.to(attention_output.dtype))
        return (attention_output - correction, *output[1:])

    def _from_weights(self, weights, first, tokens, key_start, row, head, dim, position) -> torch.Tensor:
        values = self._values_at(first, tokens)
        device = weights.device
        slot = torch.searchsorted(torch.tensor(self.read, device="cpu"), position).to(device)
        row, head, dim, position = (t.to(device) for t in (row, head, dim, position))
        value = values[row, slot, self.shape.kv_head_of(head), dim]  # (M,)
        return weights[row, head, :, position - key_start] * value.unsqueeze(-1)  # (M, t)

    def _probed(self, module, args, kwargs, row, head, dim, position) -> torch.Tensor:
        if any(_is_cache(value) for value in (*args, *kwargs.values())):
            raise RuntimeError("a position-specific intervention under fast attention runs without a KV cache")
        base = self.heads_output[False].float()
        column = (head * self.shape.head_dim + dim).to(base.device)
        contribution = torch.zeros(len(row), base.shape[1], device=base.device)
        for source in sorted(set(position.tolist())):
            self.probing, self.model.probing = source, True
            try:
                module.forward(*args, **kwargs)
            finally:
                self.probing, self.model.probing = None, False
            change = (self.heads_output[True].float() - base) / self.PROBE  # (B, t, H·d_h): α·v at every column
            mine = (position == source).to(base.device)
            at = torch.nonzero(mine).flatten()
            contribution[at] = change[row.to(base.device)[at], :, column[at]]
        return contribution


def _is_cache(value) -> bool:
    return type(value).__name__.endswith("Cache") and hasattr(value, "update")


def _install_ffn_hooks(model: LoadedModel, layer: int, mask: torch.Tensor, handles: list) -> None:
    """Hooks scaling one layer's FFN rows by `mask` (R, N): the coefficients at the output projection, and in a
    mixture of experts the routed experts' rows through their module, the shared expert's at its projection.
    Each is added to `handles` as soon as it is installed, so that a failure leaves none behind."""
    adapter, routed = model.adapter, model.shape.expert_rows
    experts = adapter.experts(layer)
    if experts is not None and bool((mask[:, :routed] != 1).any()):
        scaling = ExpertScaling(model.expert_scalings, experts, mask[:, :routed])
        scaling.install()
        handles.append(scaling)
    down = adapter.mlp_output_projection(layer)
    if down is not None and bool((mask[:, routed:] != 1).any()):
        handles.append(down.register_forward_pre_hook(_masking(mask[:, routed:].contiguous())))


@contextmanager
def ablated(model: LoadedModel, ablation: Ablation) -> Iterator[LoadedModel]:
    """Run the model with the given neurons switched off (or scaled by `ablation.scale`), inside the `with`
    block only."""
    with ablated_rows(model, [ablation]):
        yield model


@contextmanager
def ablated_rows(model: LoadedModel, ablations: Sequence[Ablation]) -> Iterator[LoadedModel]:
    """Inside the block, row i of every batch runs with ablations[i] switched off; a single ablation applies
    to every row. Lets one padded batch carry a different intervention per prompt."""
    if not ablations:
        raise ValueError("no ablation given")
    plan = _plan(model, ablations)
    adapter = model.adapter
    handles = []
    with model.lock:  # hooks on shared modules: one thread's intervention at a time
        try:
            for layer, mask in plan.ffn_masks.items():
                _install_ffn_hooks(model, layer, mask, handles)
            for layer, mask in plan.column_masks.items():
                handles.append(adapter.attention_output_projection(layer).register_forward_pre_hook(_masking(mask)))
            call = _CallPositions()
            if plan.positioned:
                handles.append(model.hf_model.register_forward_pre_hook(call.read, with_kwargs=True))
            for layer, neurons in plan.positioned.items():
                positioned = _PositionedAttention(model, layer, neurons, plan.rows, call)
                handles.append(adapter.value_source(layer).register_forward_hook(positioned.capture_values))
                handles.append(adapter.attention_output_projection(layer).register_forward_pre_hook(
                    positioned.capture_heads_output))
                handles.append(adapter.attention(layer).register_forward_hook(positioned.subtract, with_kwargs=True))
            yield model
        finally:
            for handle in handles:
                handle.remove()


def last_logits(model: LoadedModel, batch: Sequence[Prompt], ablation: Ablation | None = None,
                batch_size: int = 16) -> torch.Tensor:
    """(n, V) float32 next-token logits for prompts (texts or lists of token ids), with `ablation` switched off
    if given. Memory is linear in the prompts' length (`PaddedBatch.last_logits_linear`)."""
    return _last_logits(model, [encode_prompt(model, prompt) for prompt in batch], [ablation or Ablation()],
                        batch_size)


def last_logits_each(model: LoadedModel, batch: Sequence[Prompt], ablations: Sequence[Ablation],
                     batch_size: int = 16) -> torch.Tensor:
    """(n, V) float32 next-token logits, prompt i (a text or a list of token ids) run with ablations[i]
    switched off."""
    if len(batch) != len(ablations):
        raise ValueError(f"{len(batch)} prompts but {len(ablations)} ablations")
    return _last_logits(model, [encode_prompt(model, prompt) for prompt in batch], list(ablations), batch_size)


def _last_logits(model: LoadedModel, batch: list[list[int]], ablations: list[Ablation], batch_size: int
                 ) -> torch.Tensor:
    """Padded batches of `batch_size` prompts, each run with its rows' ablations (one ablation: every row's)."""
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(batch), batch_size):
            rows = slice(start, start + batch_size)
            own = ablations if len(ablations) == 1 else ablations[rows]
            padded = PaddedBatch.of(batch[rows])
            with ablated_rows(model, own):
                chunks.append(padded.last_logits_linear(model))
    return torch.cat(chunks) if chunks else torch.empty(0, model.shape.vocab_size, device="cpu")
