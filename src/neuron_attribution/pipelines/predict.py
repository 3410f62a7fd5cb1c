"""The model's own next-token prediction (no attribution): a quick check that a model works."""

from __future__ import annotations

import torch

from ..model.interventions import last_logits
from ..model.loaded import LoadedModel
from ..model.prompts import Prompt, encode_prompt, token_text
from ..results.attribution import Prediction
from ..settings import check_positive


def top_predictions(model: LoadedModel, logits: torch.Tensor, k: int) -> list[Prediction]:
    probs = torch.softmax(logits.double(), dim=-1)
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [Prediction(token_text(model, int(i)), int(i), float(p)) for p, i in zip(values, ids)]


def predict_next(model: LoadedModel, prompt: Prompt, k: int = 10) -> list[Prediction]:
    # the last position's logits only, in memory linear in the prompt (no T×V logits, no T×T attention)
    return top_predictions(model, last_logits(model, [encode_prompt(model, prompt)])[0], k)


def predict(model: LoadedModel, prompt: Prompt, k: int = 10) -> list[Prediction]:
    """The model's top-k next-token predictions for a prompt (text or token ids), as the CLI's `predict`."""
    check_positive("k", k)
    return predict_next(model, prompt, k)
