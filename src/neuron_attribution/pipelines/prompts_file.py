"""Many prompts of the user's own in one process: `attribute --prompts FILE` (docs/method.md §2–3).

Unlike `run`, no filter: every line is attributed, to its target or to the model's top prediction. A line the
model cannot take (a prompt too long, a target the tokenizer cannot encode) is skipped with its file and line,
or ends the call with on_error="stop"."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..datasets import OnError, PromptLine, Skipped
from ..errors import UserError
from ..model.loaded import LoadedModel
from ..model.prompts import encode_contrast, encode_prompt, encode_target
from ..results.attribution import Attribution
from ..settings import ScoringOptions, check_positive
from .attribute import attribute_with

Progress = Callable[[str, int, int], None]


def attribute_lines(model: LoadedModel, lines: Sequence[PromptLine], options: ScoringOptions, *,
                    on_error: OnError = "skip", batch_size: int = 8, progress: Progress | None = None
                    ) -> tuple[list[tuple[PromptLine, Attribution]], list[Skipped]]:
    """Each usable line's attribution, in file order (batches of `batch_size` share a forward pass)."""
    check_positive("--batch-size", batch_size)
    report = progress or (lambda what, done, total: None)
    usable, skipped = [], []
    for line in lines:
        try:
            ids = encode_prompt(model, line.prompt)
            target = None if line.target is None else encode_target(model, ids, line.prompt, line.target)
            if line.contrast is not None:
                encode_contrast(model, ids, line.prompt, line.contrast, None if target is None else target.id)
        except UserError as error:
            skipped.append(_skip(line, error, on_error))
            continue
        usable.append(line)
    results: list[tuple[PromptLine, Attribution]] = []
    report("attributing prompts", 0, len(usable))
    for start in range(0, len(usable), batch_size):
        chunk = usable[start: start + batch_size]
        try:
            results.extend(zip(chunk, _attribute(model, chunk, options, batch_size)))
        except UserError:
            # Some problems show only after the forward pass (a contrast equal to the top prediction): the
            # chunk's lines run one at a time, so only the bad ones are skipped.
            for line in chunk:
                try:
                    results.append((line, _attribute(model, [line], options, 1)[0]))
                except UserError as error:
                    skipped.append(_skip(line, error, on_error))
        report("attributing prompts", start + len(chunk), len(usable))
    return results, sorted(skipped, key=lambda s: (s.source, s.line or 0))


def _attribute(model: LoadedModel, lines: Sequence[PromptLine], options: ScoringOptions,
               batch_size: int) -> list[Attribution]:
    return attribute_with(model, [l.prompt for l in lines], [l.target for l in lines], options,
                          batch_size=batch_size, contrasts=[l.contrast for l in lines])


def _skip(line: PromptLine, error: UserError, on_error: OnError) -> Skipped:
    if on_error == "stop":
        raise UserError(f"{line.source}:{line.line}: {error}") from None
    return Skipped(line.source, line.line, str(error), line.prompt)
