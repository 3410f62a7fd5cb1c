"""Mixture-of-experts FFNs, read through the model's own experts module (docs/method.md §1).

Transformers keeps a layer's routed experts in one module with 3-D weights, called as
`experts(hidden (n, d), top_k_index (n, k), top_k_weights (n, k))` after the router chose. A forward hook sees those
arguments, so the router's choice and weights are read, not recomputed. The chosen experts' coefficients
g_e · m_{e,k} are computed here with the module's own gate (`_apply_gate`: its activation, its gate/up layout),
and the trace checks that Σ_e Σ_k coefficient · fc2_{e,k} gives back the module's output; a module that computes
something else is refused. Interventions scale chosen expert neurons with a hook that adds the difference.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import UserError
from .hf_internals import expert_gate
from .weights import Matrix

# Relative error of the rebuilt output that a module's own rounding explains, by its dtype.
_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}
_HALF_TOLERANCE = 5e-2

# The factors installed interventions multiply each experts module's neurons by (several nest as a product, as
# the dense FFN's masks do), and the one hook that applies them, are kept per model (`LoadedModel.expert_scalings`:
# module -> _Scaling); the trace reads the coefficients the module effectively used.
Scalings = dict


def check_readable(module: nn.Module, layer: int) -> None:
    """A one-line error unless the experts module has the layout read here."""
    missing = [name for name in ("num_experts", "down_proj", "act_fn") if not hasattr(module, name)]
    if missing or not (hasattr(module, "gate_up_proj") or hasattr(module, "up_proj")):
        raise UserError(f"layer {layer}'s experts module ({type(module).__name__}) has no fused 3-D expert weights "
                        "(gate_up_proj/up_proj, down_proj, act_fn, num_experts) to read")
    if getattr(module, "has_bias", False):
        raise UserError(f"layer {layer}'s experts ({type(module).__name__}) add biases weighted by the router: "
                        "not a sum of expert neurons, which no adapter reads yet")
    if getattr(module, "has_post_expert_norm", False):
        raise UserError(f"layer {layer}'s experts ({type(module).__name__}) normalise each expert's output: "
                        "not a sum of expert neurons")


def expert_width(module: nn.Module) -> int:
    """N_e, the neurons of one expert."""
    down = module.down_proj
    return int(down.shape[1] if getattr(module, "is_transposed", False) else down.shape[2])


def _gated(module: nn.Module) -> bool:
    return getattr(module, "has_gate", hasattr(module, "gate_up_proj"))


def _input_rows(module: nn.Module, expert: int) -> Tensor:
    """(2N_e or N_e, d): the expert's input projection as rows, as the model holds it (a view)."""
    weight = (module.gate_up_proj if _gated(module) else module.up_proj)[expert].detach()
    return weight.T if getattr(module, "is_transposed", False) else weight


def input_subkeys(module: nn.Module, expert: int) -> dict[str, Tensor]:
    """The expert's keys, (N_e, d) views: "gate" and "up" rows of a gated expert, else "key"."""
    rows = _input_rows(module, expert)
    if not _gated(module):
        return {"key": rows}
    if getattr(module, "is_concatenated", True):
        gate, up = rows.chunk(2, dim=0)
    else:
        gate, up = rows[0::2], rows[1::2]
    return {"gate": gate, "up": up}


def value_rows(module: nn.Module, expert: int) -> Tensor:
    """(N_e, d): the expert's value vectors fc2_{e,k}, a view of its output projection."""
    weight = module.down_proj[expert].detach()
    return weight if getattr(module, "is_transposed", False) else weight.T


def activations(module: nn.Module, hidden: Tensor, expert: int) -> Tensor:
    """(n, N_e) m_{e,k} of the expert at the given rows, computed as the module does (its dtype, its gate)."""
    projected = hidden @ _input_rows(module, expert).to(hidden.dtype).T
    return expert_gate(module, projected) if _gated(module) else module.act_fn(projected)


def coefficients(module: nn.Module, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor,
                 experts: list[int] | None = None) -> Tensor:
    """(n, len(experts), N_e) float32: g_e · m_{e,k} at each of the n rows for each of `experts` (default all),
    zero where the router did not choose the expert for that row."""
    chosen = experts if experts is not None else list(range(module.num_experts))
    out = torch.zeros(hidden.shape[0], len(chosen), expert_width(module), device=hidden.device)
    routed = set(torch.unique(top_k_index).tolist())
    for slot, expert in enumerate(chosen):
        if expert not in routed:
            continue
        rows, k = torch.where(top_k_index == expert)
        m = activations(module, hidden[rows], expert).float()
        out[rows, slot] = m * top_k_weights[rows, k].float().unsqueeze(-1)
    return out


def rebuilt_output(module: nn.Module, coefficients_: Tensor, experts: list[int] | None = None) -> Tensor:
    """(n, d) float32 Σ_e coefficients[:, e] · fc2_e over every expert with a non-zero coefficient (`experts`: the
    experts the coefficients' slots stand for, default all), reading each expert's vectors a chunk at a time."""
    experts = experts if experts is not None else list(range(coefficients_.shape[1]))
    out = torch.zeros(coefficients_.shape[0], value_rows(module, 0).shape[1], device=coefficients_.device)
    for slot in torch.nonzero(coefficients_.abs().sum(dim=(0, 2))).flatten().tolist():
        out += Matrix.of(value_rows(module, experts[slot]), out.device).transposed_times(coefficients_[:, slot])
    return out


def check_reproduces(module: nn.Module, layer: int, coefficients_: Tensor, output: Tensor) -> None:
    """A one-line error unless Σ coefficient · fc2 gives back the module's own output at these rows."""
    expected = output.detach().float()
    error = float((rebuilt_output(module, coefficients_) - expected).abs().max()) if len(expected) else 0.0
    scale = max(float(expected.abs().max()) if len(expected) else 0.0, 1e-6)
    tolerance = _TOLERANCE.get(output.dtype, _HALF_TOLERANCE)
    if error > tolerance * scale:
        raise UserError(f"layer {layer}'s experts module ({type(module).__name__}) computes something other than "
                        f"Σ_e g_e·act(gate)·up·fc2 (rebuilt output off by {error:.3g}, outputs up to {scale:.3g}): "
                        "its expert neurons cannot be read exactly")


def active_factors(scalings: Scalings, module: nn.Module) -> Tensor | None:
    """(R, E·N_e) factors the installed interventions multiply this module's expert neurons by, or None."""
    scaling = scalings.get(module)
    return None if scaling is None else scaling.factors()


def scaled_by_intervention(scalings: Scalings, module: nn.Module, coefficients_: Tensor, batch_rows: Tensor
                           ) -> Tensor:
    """`coefficients_` (n, E, N_e) as the module effectively used them under the interventions installed in
    `scalings` (the model's); `batch_rows`: the batch row each of the n rows belongs to."""
    factors = active_factors(scalings, module)
    if factors is None:
        return coefficients_
    by_expert = factors.to(coefficients_.device).reshape(factors.shape[0], *coefficients_.shape[1:])
    return coefficients_ * _per_row(by_expert, batch_rows)


def _per_row(factors: Tensor, batch_rows: Tensor) -> Tensor:
    """(n, ...) factors from (R, ...) ones: row r for the tokens of batch row r (R = 1: the same for all)."""
    if factors.shape[0] == 1:
        return factors.expand(len(batch_rows), *factors.shape[1:])
    return factors[batch_rows.to(factors.device)]


class ExpertScaling:
    """An intervention on one experts module: multiplies expert neurons' contributions by (R, E·N_e) factors at
    every token (row r of the factors for batch row r; one row for all), for as long as it is installed."""

    def __init__(self, scalings: Scalings, module: nn.Module, factors: Tensor):
        self.scalings, self.module, self.factors = scalings, module, factors

    def install(self) -> None:
        scaling = self.scalings.get(self.module)
        if scaling is None:
            scaling = self.scalings[self.module] = _Scaling(self.module)
        scaling.parts.append(self.factors)

    def remove(self) -> None:
        scaling = self.scalings.get(self.module)
        if scaling is None:
            return
        scaling.parts = [part for part in scaling.parts if part is not self.factors]
        if not scaling.parts:
            scaling.handle.remove()
            del self.scalings[self.module]


class _Scaling:
    """The hook of one experts module under interventions: adds (F − 1) · g_e·m_{e,k} · fc2_{e,k} to its output,
    F the product of the installed factors, computing only the experts some factor changes."""

    def __init__(self, module: nn.Module):
        self.parts: list[Tensor] = []
        # First among the module's hooks, so that a trace recording this pass sees the scaled output.
        self.handle = module.register_forward_hook(self._hook, prepend=True)

    def factors(self) -> Tensor:
        product = self.parts[0]
        for part in self.parts[1:]:
            product = product * part
        return product

    def _hook(self, module, args, output):
        hidden, top_k_index, top_k_weights = args[:3]
        factors = self.factors()
        width = expert_width(module)
        by_expert = factors.reshape(factors.shape[0], -1, width)
        experts = torch.nonzero((by_expert != 1).any(dim=(0, 2))).flatten().tolist()
        if not experts:
            return output
        chosen = coefficients(module, hidden, top_k_index, top_k_weights, experts)
        batch_rows = torch.arange(len(hidden), device=chosen.device) // max(1, len(hidden) // len(factors))
        change = chosen * (_per_row(by_expert[:, experts].to(chosen.device), batch_rows) - 1)
        return (output.float() + rebuilt_output(module, change, experts)).to(output.dtype)
