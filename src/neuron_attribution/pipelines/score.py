"""`score_neurons`: exact scores of neurons the user names, for one or many prompts (docs/method.md §2).

One vocabulary-sized product per (prompt, neuron), batched across a prompt's neurons; no top-k search. The
scores are the same numbers `attribute` gives the neurons it returns, and `dense=True` gives every neuron.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import UserError
from ..model.loaded import LoadedModel
from ..model.prompts import Prompt, encode_prompt
from ..model.trace import trace_token_ids
from ..neurons import NeuronIndex, as_index
from ..results.neuron_scores import NeuronScores, coefficient_or_none
from ..scoring import value
from ..scoring.context import value_context
from ..scoring.exact import score_rows
from ..settings import DEFAULT_MEMORY_BUDGET, check_positive
from .targets import Target, prompt_text, target_info

NeuronLike = NeuronIndex | tuple | str


def score_neurons(model: LoadedModel, prompts: Prompt | Sequence[Prompt], targets: Target | Sequence[Target] = None,
                  neurons: Sequence[NeuronLike] = (), *, reference: bool = False,
                  memory_budget: int = DEFAULT_MEMORY_BUDGET, batch_size: int = 8,
                  contrast: Target | Sequence[Target] = None) -> NeuronScores:
    """Exact scores of the given neurons for each prompt and target.

    `prompts`: one prompt (text or a list of token ids) or a list of them; `targets`: one target per prompt
    (answer text, token id, or None for the model's top prediction), or one for all. `neurons`: `FfnIndex`,
    `AttentionIndex` (with a source position, or None for every position), `HeadIndex`, the tuples
    ("ffn", layer, neuron), ("attention", layer, head, dim[, position]), ("head", layer, head), or text such as
    "24_177", "23_4_38@3", "21.19". `contrast` (answer text or token id; one for all prompts or one per prompt):
    score log p(target) − log p(contrast) instead, as `attribute(contrast=...)` does."""
    check_positive("batch_size", batch_size)
    indices = [as_index(n) for n in neurons]
    if not indices:
        raise UserError("no neurons given")
    for index in indices:
        model.shape.check(index)
    single = _is_one_prompt(prompts)
    prompt_list = [prompts] if single else _as_prompt_list(prompts)
    target_list = [targets] if single else _as_target_list(targets, len(prompt_list))
    contrast_list = [contrast] if single else _as_target_list(contrast, len(prompt_list))
    encoded = [encode_prompt(model, p) for p in prompt_list]
    infos, scores, coefficients = [], [], []
    for start in range(0, len(encoded), batch_size):
        traces = trace_token_ids(model, encoded[start: start + batch_size])
        for offset, trace in enumerate(traces):
            i = start + offset
            info = target_info(model, prompt_list[i], encoded[i], trace, target_list[i], contrast_list[i])
            ctx = value_context(model, trace, info.id, reference=reference, memory_budget=memory_budget,
                                only_states=value.chosen_states(indices),
                                contrast=None if info.contrast is None else info.contrast.id)
            rows, chosen_coefficients = value.chosen_rows(ctx, indices)
            (scored,) = score_rows(ctx, [rows])
            infos.append(info)
            scores.append(scored.scores.tolist())
            coefficients.append([coefficient_or_none(c) for c in chosen_coefficients.tolist()])
    return NeuronScores(indices, [prompt_text(model, p, ids) for p, ids in zip(prompt_list, encoded)], infos,
                        scores, coefficients, reference)


def _is_one_prompt(prompts) -> bool:
    """Text, or a flat list of token ids."""
    return isinstance(prompts, str) or (isinstance(prompts, Sequence) and bool(prompts) and
                                        all(isinstance(t, int) and not isinstance(t, bool) for t in prompts))


def _as_prompt_list(prompts) -> list[Prompt]:
    if not isinstance(prompts, Sequence) or not prompts:
        raise UserError("prompts: give a prompt (text or token ids) or a non-empty list of prompts")
    return list(prompts)


def _as_target_list(targets, n_prompts: int) -> list[Target]:
    if targets is None or isinstance(targets, (str, int)):
        return [targets] * n_prompts
    targets = list(targets)
    if len(targets) != n_prompts:
        raise UserError(f"{n_prompts} prompts but {len(targets)} targets")
    return targets
