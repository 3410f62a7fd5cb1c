"""The model's own next-token prediction (no attribution): a quick check that a model works."""

from __future__ import annotations

import torch

from ..model.loaded import LoadedModel
from ..model.prompts import Prompt, encode_prompt, token_text
from ..results.attribution import Prediction
from ..settings import check_positive


def top_predictions(model: LoadedModel, logits: torch.Tensor, k: int) -> list[Prediction]:
    probs = torch.softmax(logits.double(), dim=-1)
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [Prediction(token_text(model, int(i)), int(i), float(p)) for p, i in zip(values, ids)]


def predict_next(model: LoadedModel, prompt: Prompt, k: int = 10) -> list[Prediction]:
    ids = encode_prompt(model, prompt)
    with torch.inference_mode():
        logits = model.hf_model(torch.tensor([ids], device=model.device)).logits[0, -1].float().cpu()
    return top_predictions(model, logits, k)


def predict(model: LoadedModel, prompt: Prompt, k: int = 10) -> list[Prediction]:
    """The model's top-k next-token predictions for a prompt (text or token ids), as the CLI's `predict`."""
    check_positive("k", k)
    return predict_next(model, prompt, k)
