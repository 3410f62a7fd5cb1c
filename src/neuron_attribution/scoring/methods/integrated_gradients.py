"""Integrated gradients over FFN coefficients (Dai et al. 2022, "knowledge neurons"): the gradient-based
reference method the paper argues against on cost. Not static: it runs the model forward and backward again,
`steps` times per layer, so it is far slower than every other scorer.

For layer l, the last position's coefficients m are scaled along a straight path α·m, α from 0 to 1, with every
other layer and position left as the model computes them. Neuron k of layer l scores
m_k · mean over α of ∂p(w)/∂m_k (midpoint rule), so a layer's scores sum to p(w | m) − p(w | 0·m) up to the
quadrature error (completeness). A mixture of experts has no single input of its FFN coefficients to scale (the
routed experts compute theirs inside one module), so it is refused there.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...errors import UserError
from ...model.loaded import LoadedModel
from ...model.trace import PaddedBatch
from ...settings import DEFAULT_IG_STEPS
from ..context import ValueContext
from .base import FfnScorer, MethodResources



class IntegratedGradients(FfnScorer):
    key = "integrated_gradients"
    description = "integrated gradients of p(w) over FFN coefficients (Dai et al. 2022); not static, slow"
    static = False
    in_all = False

    def __init__(self, model: LoadedModel, steps: int = DEFAULT_IG_STEPS):
        if steps <= 0:
            raise ValueError("steps must be positive")
        if model.shape.n_experts:
            raise UserError("integrated gradients scale the FFN coefficients at the FFN's output projection; a "
                            "mixture-of-experts model computes its experts' inside one module: choose another method")
        self.model, self.steps = model, steps

    @classmethod
    def create(cls, resources: MethodResources) -> IntegratedGradients:
        return cls(resources.model, resources.ig_steps)

    def scores(self, ctx: ValueContext) -> Tensor:
        ids = ctx.trace.token_ids.tolist()
        coefficients = ctx.trace.ffn_coefficients[:, -1]  # (L, N)
        return torch.stack([self.layer_scores(ids, layer, coefficients[layer], ctx.target)
                            for layer in range(self.model.shape.n_layers)])

    def layer_scores(self, token_ids: list[int], layer: int, coefficients: Tensor, target: int) -> Tensor:
        """(N,) integrated gradients of p(target) for one layer's last-position coefficients."""
        alphas = (torch.arange(self.steps, dtype=torch.float32, device=coefficients.device) + 0.5) / self.steps
        grads = self._gradients(token_ids, layer, alphas.unsqueeze(-1) * coefficients, target)
        return coefficients * grads.mean(dim=0)

    def _gradients(self, token_ids: list[int], layer: int, path: Tensor, target: int) -> Tensor:
        """(steps, N) ∂p(target)/∂m at each point of the path, one batched forward and backward pass."""
        model = self.model
        padded = PaddedBatch.of([token_ids] * path.shape[0])
        module = model.adapter.mlp_output_projection(layer)
        dtype = next(model.hf_model.parameters()).dtype
        point = path.to(device=model.device, dtype=dtype).requires_grad_(True)

        def replace_last(mod, args):
            hidden = args[0].clone()
            # (B, T, N), or (B·T, N) where the family flattens tokens (OPT): a view either way
            per_token = hidden.view(path.shape[0], len(token_ids), -1)
            per_token[:, -1, :] = point.to(hidden.device)  # layers may sit on different GPUs (device_map="auto")
            return (hidden, *args[1:])

        handle = module.register_forward_pre_hook(replace_last)
        try:
            with torch.enable_grad():
                output = padded.run(model)
                probs = torch.softmax(output.logits[:, -1].float(), dim=-1)[:, target]
                (grads,) = torch.autograd.grad(probs.sum(), point)
        finally:
            handle.remove()
        return grads.detach().to(device=path.device, dtype=torch.float32)
