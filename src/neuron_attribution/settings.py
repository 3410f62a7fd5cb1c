"""What a command was asked to do, made once (by the CLI or an API caller) and carried everywhere.

`Settings` names the model (`ModelSpec`: enough to load it again, in another process or on a Ray worker) and
the scoring options. It is a frozen, picklable dataclass with a JSON form, recorded in every run's `run.json`;
resumed runs, `analyze` and every worker read it from there. No module keeps settings of its own.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import UserError

DEFAULT_MEMORY_BUDGET = 2 * 1024**3  # bytes the vocabulary-sized buffers of exact scoring may take
DEFAULT_TOP_K = 100
DEFAULT_QUERY_TOP = 30  # value neurons of each kind whose query neurons and layers are scored
# Which value neurons query neurons are scored through (docs/method.md §3): the top attention value neurons at
# their source positions (the paper's method), the top FFN value neurons at the last position, or both (summed).
QUERY_PATHS = ("attention", "ffn", "both")
DEFAULT_QUERY_VIA = "attention"
# Which answer tokens are scored: the first (the paper's) or all of them by teacher forcing (docs/method.md §2).
ANSWER_TOKENS = ("first", "all")
# What value neurons are ranked by: the whole score, or its direct part (the push on the target's own logit,
# without the change of the log-normaliser; docs/method.md §2), or, among the top `measure`, by the measured change
# of log p(target) when each is switched off alone (docs/method.md §5).
RANK_BY = ("score", "direct", "measured")
DEFAULT_IG_STEPS = 20  # integrated gradients' steps from zero to the real activation (the baseline method)
DEFAULT_MAX_MEMORY = "2GB"  # DEFAULT_MEMORY_BUDGET as the CLI's --max-memory writes it
DEFAULT_RUN_TOP = 300  # value and query neurons a dataset run stores per sentence
DEFAULT_BATCH_SIZE = 8  # sentences or prompts per forward pass in runs, evaluations and prompt files


@dataclass(frozen=True)
class ModelSpec:
    """How to load a model: `name` is None for the offline default, else a directory, .gguf file or hub id."""

    name: str | None = None
    dtype: str | None = None  # None: float32
    device: str | None = None  # None: cpu; "cuda", "cuda:1", or "auto" (layers spread over the GPUs)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    quantization: str | None = None  # None: the weights as stored; "bnb-4bit", "bnb-8bit", "torchao-int8", ...


def needs_cuda(device: str | None) -> bool:
    """Whether a device request asks for GPUs ("cuda", "cuda:N", or "auto"): a Ray worker then asks Ray for a
    GPU share."""
    return device is not None and (device == "auto" or device.startswith("cuda"))


@dataclass(frozen=True)
class ScoringOptions:
    """How neurons are scored: how many to return, how much memory the exact scoring may use."""

    top_k: int = DEFAULT_TOP_K  # value (and query) neurons returned or stored per prompt
    query_top: int = DEFAULT_QUERY_TOP  # value neurons of each kind whose query neurons are scored; 0: none
    memory_budget: int = DEFAULT_MEMORY_BUDGET  # bytes for the vocabulary-sized buffers and the returned neurons
    reference: bool = False  # drop the final LayerNorm bias, as the authors' GPT-2 code does
    query_via: str = DEFAULT_QUERY_VIA  # one of QUERY_PATHS
    answer_tokens: str = "first"  # one of ANSWER_TOKENS
    rank_by: str = "score"  # one of RANK_BY
    # False: on a GPU the budget is capped at half the memory free there when each prompt is scored. True: used as
    # it is (a run fixes it when it starts, so that a resumed run batches, and rounds, exactly as before).
    budget_fixed: bool = False
    # The top N value neurons of each kind and heads switched off alone, their measured change of log p(target)
    # stored beside their scores (0: none measured).
    measure: int = 0

    def __post_init__(self) -> None:
        for name in ("top_k", "memory_budget"):
            check_positive(name, getattr(self, name))
        check_positive("query_top", self.query_top, zero_allowed=True)
        check_choice("query_via", self.query_via, QUERY_PATHS)
        check_choice("answer_tokens", self.answer_tokens, ANSWER_TOKENS)
        check_choice("rank_by", self.rank_by, RANK_BY)
        if self.rank_by == "direct" and self.answer_tokens == "all":
            raise UserError("rank_by='direct' applies to the first answer token; use answer_tokens='first' with it")
        check_positive("measure", self.measure, zero_allowed=True)
        if self.rank_by == "measured" and not self.measure:
            raise UserError("rank_by='measured' re-ranks the neurons it measures: give measure=N (--measure N)")
        if self.measure and self.answer_tokens == "all":
            raise UserError("measuring applies to the first answer token; use answer_tokens='first' with it")

    def overridden(self, **changes: Any) -> ScoringOptions:
        """These options with some fields changed by name (as `attribute(..., top_k=300)` passes them); a name that
        is no field is a TypeError naming the fields."""
        names = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise TypeError(f"unknown scoring option {unknown[0]!r}; the options are {', '.join(sorted(names))}")
        return replace(self, **changes) if changes else self


@dataclass(frozen=True)
class Settings:
    model: ModelSpec = field(default_factory=ModelSpec)
    scoring: ScoringOptions = field(default_factory=ScoringOptions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def flat(self) -> dict[str, Any]:
        """Every setting as "model.device", "scoring.top_k", ...: what a resumed run must match, option by
        option, so that an option added later is part of it without being listed anywhere."""
        return {f"{part}.{key}": value for part, values in self.to_dict().items() for key, value in values.items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Unknown keys (written by a later version) are ignored; missing ones take their defaults."""
        scoring = dict(data.get("scoring", {}))
        # Versions before query_via existed ranked query neurons by the sum of both paths.
        scoring.setdefault("query_via", "both")
        return cls(model=_known(ModelSpec, data.get("model", {})), scoring=_known(ScoringOptions, scoring))


def _known(kind, data: dict[str, Any]):
    names = {f.name for f in fields(kind)}
    return kind(**{k: v for k, v in data.items() if k in names})


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def check_positive(name: str, value: object, *, zero_allowed: bool = False) -> None:
    """A UserError unless `value` is a whole number > 0 (>= 0 with `zero_allowed`)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if zero_allowed else 1):
        what = "a whole number, 0 or more" if zero_allowed else "a positive whole number"
        raise UserError(f"{name} must be {what}, got {value!r}")


_UNITS = {"": 1, "B": 1, "KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4}


def format_size(n: int) -> str:
    """Bytes as parse_size reads them back: '2GB', '1.5MB', '2.01KB', '512B'."""
    for unit in ("TB", "GB", "MB", "KB"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.3g}{unit}"
    return f"{n}B"


def parse_size(text: str) -> int:
    """'2GB', '500 MB', '1.5gb', '1048576' -> bytes (binary units)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?B?)\s*", text.upper())
    if not match or float(match.group(1)) <= 0:
        raise UserError(f"--max-memory {text!r}: use a size such as 2GB or 500MB")
    unit = match.group(2) if match.group(2) in _UNITS else match.group(2) + "B"
    return max(1, int(float(match.group(1)) * _UNITS[unit]))
