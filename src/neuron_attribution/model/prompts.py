"""Turning prompts and answers into token ids, with the checks a user's input needs."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from ..datasets import Fact, OnError, Skipped
from ..errors import UserError
from .loaded import LoadedModel

Prompt = str | Sequence[int]


def _tokenizer(model: LoadedModel):
    if model.tokenizer is None:
        raise UserError("this model has no tokenizer; pass token ids instead of text")
    return model.tokenizer


def encode_prompt(model: LoadedModel, prompt: Prompt) -> list[int]:
    """Token ids of a prompt (text, or ids passed through), checked against the model's context length."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise UserError("the prompt is empty")
        ids = list(_tokenizer(model)(prompt)["input_ids"])
    else:
        try:
            ids = [int(i) for i in prompt]
        except (TypeError, ValueError):
            raise UserError(f"a prompt is text (str) or a list of token ids, not {type(prompt).__name__}: "
                            f"{prompt!r}") from None
        bad = [i for i in ids if not 0 <= i < model.shape.vocab_size]
        if bad:
            raise UserError(f"token id {bad[0]} is outside the vocabulary (size {model.shape.vocab_size})")
    if not ids:
        raise UserError("the prompt is empty")
    limit = model.shape.max_positions
    if limit and len(ids) > limit:
        raise UserError(f"the prompt has {len(ids)} tokens; the model's context holds {limit}")
    return ids


@dataclass(frozen=True)
class TargetToken:
    id: int
    text: str
    n_answer_tokens: int  # how many tokens the answer text spans; only the first is scored by default
    answer_ids: tuple[int, ...] = ()  # every token of the answer, the first being `id`


def encode_answer(model: LoadedModel, prompt_ids: list[int], prompt: Prompt, answer: str | Sequence[int]
                  ) -> list[int]:
    """Every token id of an answer (for teacher forcing): answer text tokenised in context, or ids given."""
    if isinstance(answer, str):
        return list(encode_target(model, prompt_ids, prompt, answer).answer_ids)
    if isinstance(answer, numbers.Integral) and not isinstance(answer, bool):
        return [encode_target(model, prompt_ids, prompt, int(answer)).id]
    try:
        ids = [int(i) for i in answer]
    except (TypeError, ValueError):
        raise UserError(f"an answer is text or a list of token ids, not {type(answer).__name__}: {answer!r}") from None
    if not ids:
        raise UserError("the answer has no tokens")
    for token in ids:
        encode_target(model, prompt_ids, prompt, token)  # range check
    limit = model.shape.max_positions
    if limit and len(prompt_ids) + len(ids) - 1 > limit:
        raise UserError(f"prompt and answer take {len(prompt_ids) + len(ids) - 1} tokens; the context holds {limit}")
    return ids


def encode_target(model: LoadedModel, prompt_ids: list[int], prompt: Prompt, target: str | int) -> TargetToken:
    """The first token of an answer. The answer is tokenised in context (prompt + answer) so that word-initial
    forms (" Paris") come out as the model would produce them; a missing leading space is added."""
    if isinstance(target, bool) or not isinstance(target, (str, numbers.Integral)):
        raise UserError(f"a target is answer text (str), a token id (int) or None, not {type(target).__name__}: "
                        f"{target!r}")
    if not isinstance(target, str):
        target = int(target)
        if not 0 <= target < model.shape.vocab_size:
            raise UserError(f"target id {target} is outside the vocabulary (size {model.shape.vocab_size})")
        return TargetToken(target, token_text(model, target), 1, (target,))
    if not target.strip():
        raise UserError("the target is empty")
    tokenizer = _tokenizer(model)
    prompt_text = prompt if isinstance(prompt, str) else tokenizer.decode(prompt_ids)
    if not target[0].isspace() and not prompt_text[-1:].isspace():
        target = " " + target
    full = list(tokenizer(prompt_text + target)["input_ids"])
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        answer_ids = full[len(prompt_ids):]
    else:
        answer_ids = list(tokenizer(target, add_special_tokens=False)["input_ids"])
    if not answer_ids:
        raise UserError(f"the tokenizer cannot encode the target {target!r}")
    unknown = getattr(tokenizer, "unk_token_id", None)
    if unknown is not None and answer_ids[0] == unknown and tokenizer.unk_token not in target:
        raise UserError(f"the tokenizer cannot encode the target {target!r} (it maps to the unknown token)")
    return TargetToken(answer_ids[0], token_text(model, answer_ids[0]), len(answer_ids), tuple(answer_ids))


def encode_contrast(model: LoadedModel, prompt_ids: list[int], prompt: Prompt, contrast: str | int,
                    target_id: int | None) -> TargetToken:
    """The contrast's token (its first, like a target's); it must differ from the target's first token, or every
    score would be zero. `target_id` None: the target is not known yet (the top prediction)."""
    token = encode_target(model, prompt_ids, prompt, contrast)
    if token.id == target_id:
        raise UserError(f"the contrast {token.text!r} is the target's own first token; a contrast must differ")
    return token


def token_text(model: LoadedModel, token_id: int) -> str:
    text = model.token_texts.get(token_id)
    if text is None:
        text = f"<{token_id}>" if model.tokenizer is None else model.tokenizer.decode([token_id])
        model.token_texts[token_id] = text
    return text


def token_texts(model: LoadedModel, ids: Sequence[int]) -> list[str]:
    return [token_text(model, int(i)) for i in ids]


@dataclass(frozen=True)
class Sentence:
    """A fact with its prompt's token ids and the id of its answer's first token."""

    fact: Fact
    ids: list[int]
    target: int

    @property
    def type(self) -> str:
        return self.fact.type_name


def encode_facts(model: LoadedModel, facts: Sequence[Fact], on_error: OnError = "skip"
                 ) -> tuple[list[Sentence], list[Skipped]]:
    """Token ids of each fact's prompt and answer; facts the model cannot take (an empty or too long prompt, an
    answer the tokenizer cannot encode, a contrast whose first token is the answer's) are skipped with the
    reason, or with on_error="stop" end the run."""
    sentences, skipped = [], []
    for fact in facts:
        try:
            ids = encode_prompt(model, fact.prompt)
            target = encode_target(model, ids, fact.prompt, fact.answer).id
            if fact.contrast is not None:
                encode_contrast(model, ids, fact.prompt, fact.contrast, target)
        except UserError as error:
            if on_error == "stop":
                raise UserError(f"{fact.source}:{fact.line}: {error}") from None
            skipped.append(Skipped(fact.source, fact.line, str(error), fact.prompt))
            continue
        sentences.append(Sentence(fact, ids, target))
    return sentences, skipped
