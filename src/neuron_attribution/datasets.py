"""Fact datasets: JSONL files of {"prompt", "answer", "type"?} lines, packaged by name or given as a path.

A packaged dataset is named by a plain word (letters, digits, "_" and "-"), so a name can never reach outside
the package's data directory; anything else is read as a file path.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

from .errors import UserError

OnError = Literal["skip", "stop"]
_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


UNTYPED = "-"  # the type name of facts whose line gives none


@dataclass(frozen=True)
class Fact:
    prompt: str
    answer: str
    type: str | None
    source: str  # file it came from
    line: int  # 1-based line in that file
    contrast: str | int | None = None  # score log p(answer) − log p(contrast) in `run` (docs/method.md §2)

    @property
    def type_name(self) -> str:
        """The knowledge type as every table, count and report names it; UNTYPED for a fact without one."""
        return self.type or UNTYPED


@dataclass(frozen=True)
class Skipped:
    """A line or sentence left out, and why."""

    source: str
    line: int | None
    reason: str
    prompt: str | None = None

    def to_dict(self) -> dict:
        return {"source": self.source, "line": self.line, "prompt": self.prompt, "reason": self.reason}


KNOWLEDGE_TYPES = ("language", "capital", "country", "color", "number", "month")
ALL_TYPES = "knowledge"  # the name of the six knowledge datasets together


def _data_dir():
    return resources.files("neuron_attribution") / "data"


def packaged_datasets() -> list[str]:
    return sorted(p.name[: -len(".jsonl")] for p in _data_dir().iterdir() if p.name.endswith(".jsonl"))


def candidate_answers() -> dict[str, list[str]]:
    """Each knowledge type's candidate answers (the paper's filter compares the gold answer with them)."""
    return json.loads((_data_dir() / "candidates.json").read_text(encoding="utf-8"))


def dataset_paths(name_or_path: str) -> list[Path]:
    """The files a dataset argument names: "knowledge" (the six types), a packaged dataset, a file, or a
    comma-separated list of them ("capital,language", "capital,mine.jsonl"; each file once, in order). A file
    whose own name holds a comma is read as that file."""
    if "," in name_or_path and not Path(name_or_path).is_file():
        parts = [part.strip() for part in name_or_path.split(",")]
        if not all(parts):
            raise UserError(f"--dataset {name_or_path!r}: an empty name between commas")
        found = [path for part in parts for path in dataset_paths(part)]
        return list(dict.fromkeys(found))
    if name_or_path == ALL_TYPES:
        return [dataset_path(kind) for kind in KNOWLEDGE_TYPES]
    return [dataset_path(name_or_path)]


def dataset_path(name_or_path: str) -> Path:
    """The file a dataset argument names: a packaged dataset or an existing file."""
    if _NAME.match(name_or_path) and name_or_path in packaged_datasets():
        return Path(str(_data_dir() / f"{name_or_path}.jsonl"))
    path = Path(name_or_path)
    if path.is_file():
        return path
    if path.exists():
        raise UserError(f"{name_or_path} is not a file")
    raise UserError(f"no dataset {name_or_path!r}: not a packaged dataset "
                    f"({', '.join([ALL_TYPES, *packaged_datasets()])}) and no such file")


def load_facts(name_or_path: str, on_error: OnError = "skip") -> tuple[list[Fact], list[Skipped]]:
    """Facts of a dataset, and the malformed lines left out. With on_error="stop" the first malformed line
    ends the run with a UserError naming the file and line."""
    _check_on_error(on_error)
    facts, skipped = [], []
    for path in dataset_paths(name_or_path):
        more, left_out = _read(path, on_error)
        facts += more
        skipped += left_out
    return facts, skipped


def _check_on_error(on_error: str) -> None:
    if on_error not in ("skip", "stop"):
        raise UserError(f"--on-error must be skip or stop, not {on_error!r}")


def _read(path: Path, on_error: OnError, parse=None) -> tuple[list, list[Skipped]]:
    """Every non-blank line of a JSONL file through `parse(line, source, number)` (default: a fact). A line
    whose parse raises ValueError is skipped with its reason, or with on_error="stop" ends the run."""
    parse = parse or _parse
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"cannot read {source}: {getattr(error, 'strerror', None) or error}") from None
    items, skipped = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            items.append(parse(line, source, number))
        except ValueError as error:
            if on_error == "stop":
                raise UserError(f"{source}:{number}: {error}") from None
            skipped.append(Skipped(source, number, str(error)))
    return items, skipped


def describe_datasets() -> list[dict]:
    """Every packaged dataset with its fact count per type."""
    rows = []
    for name in packaged_datasets():
        facts, _ = load_facts(name)
        counts: dict[str, int] = {}
        for fact in facts:
            counts[fact.type_name] = counts.get(fact.type_name, 0) + 1
        rows.append({"name": name, "facts": len(facts), "types": counts})
    return rows


def _json_object(line: str) -> dict:
    """One JSONL line as a JSON object; ValueError (a skip reason) otherwise."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"not valid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    return record


def _parse(line: str, source: str, number: int) -> Fact:
    record = _json_object(line)
    fields = {}
    for name in ("prompt", "answer"):
        value = record.get(name)
        if not isinstance(value, str):
            raise ValueError(f"missing or non-text field {name!r}")
        if not value.strip():
            raise ValueError(f"empty {name}")
        fields[name] = value
    kind = record.get("type")
    if kind is not None and not isinstance(kind, str):
        raise ValueError("field 'type' must be text")
    contrast = _contrast_field(record)
    if isinstance(contrast, str) and contrast.strip() == fields["answer"].strip():
        raise ValueError("the contrast is the answer itself")
    return Fact(fields["prompt"], fields["answer"], kind, source, number, contrast)


def _contrast_field(record: dict) -> str | int | None:
    contrast = record.get("contrast")
    if contrast is not None and (isinstance(contrast, bool) or not isinstance(contrast, (str, int))
                                 or (isinstance(contrast, str) and not contrast.strip())):
        raise ValueError("field 'contrast' must be non-empty text or a token id")
    return contrast


@dataclass(frozen=True)
class PromptLine:
    """A prompt of the user's own, with an optional target (None: the model's top prediction)."""

    prompt: str
    target: str | int | None
    source: str
    line: int
    contrast: str | int | None = None


def load_prompt_lines(path: str | Path, on_error: OnError = "skip") -> tuple[list[PromptLine], list[Skipped]]:
    """JSONL lines {"prompt": text, "target": text or token id (optional), "contrast": the same (optional)};
    other keys are ignored. No filter:
    these are the user's own prompts. Malformed lines are skipped and counted, or with on_error="stop" end the
    run with the file and line."""
    _check_on_error(on_error)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such file: {path}")
    return _read(path, on_error, _parse_prompt_line)


def _parse_prompt_line(raw: str, source: str, number: int) -> PromptLine:
    record = _json_object(raw)
    prompt = record.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("missing, empty or non-text field 'prompt'")
    target = record.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, (str, int))):
        raise ValueError("field 'target' must be answer text or a token id")
    return PromptLine(prompt, target, source, number, _contrast_field(record))
