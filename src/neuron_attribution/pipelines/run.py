"""`run`: attribution of every kept sentence of a dataset, into Parquet tables under one directory
(layout: `run_store.py`).

Resuming: a second run with the same arguments reads which sentence ids the complete parts hold (a part whose
files cannot be read is removed and recomputed) and attributes only the rest, so after any interruption,
kill -9 included, each sentence ends up exactly once. A run that fails before its first part is written leaves
nothing behind in a directory it created.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from ..version import __version__
from ..datasets import Skipped, dataset_paths, load_facts
from ..errors import UserError
from ..execution import Backend, LocalBackend, settings_for
from ..files import write_json
from ..model.loaded import LoadedModel
from ..results.tables import tables_of
from ..scoring.exact import device_budget
from ..settings import DEFAULT_RUN_TOP, ScoringOptions, Settings, check_positive
from .attribute import attribute_with
from .filter import Checked, filter_facts
from .run_store import LOCK_FILE, claim, completed_ids, merge_parts, prepare_directory, remove_run, run_lock, write_part

DEFAULT_TOP = DEFAULT_RUN_TOP  # value and query neurons stored per sentence

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RunArguments:
    dataset: str
    limit: int | None = None  # kept sentences of each type, at most
    on_error: str = "skip"

    def identity(self, model: LoadedModel, settings: Settings, batch_size: int) -> dict:
        """What must match for a directory to be resumed: every setting (derived from the settings object, so
        none can be forgotten), the model's weights (not only its name: re-saved weights at the same path are
        another model), the dataset's content, the versions that change the numbers, and everything else that
        changes results (the batch size too: float32 rounding depends on which prompts are padded together)."""
        return {"model": model.name, "weights": model.weights_fingerprint(), **settings.flat(),
                "dataset": self.dataset, "dataset_sha256": _dataset_digest(self.dataset), "limit": self.limit,
                "on_error": self.on_error, "batch_size": batch_size, "neuron_attribution": __version__,
                **numeric_versions()}


def numeric_versions() -> dict[str, str]:
    """The versions of what computes the numbers: another torch or transformers can change them."""
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def run_settings(model: LoadedModel, top: int = DEFAULT_TOP) -> Settings:
    """Settings for a run of an already loaded model with `top` neurons stored per sentence."""
    return Settings(model=settings_for(model).model, scoring=ScoringOptions(top_k=top))


def _dataset_digest(dataset: str) -> str:
    digest = hashlib.sha256()
    for path in dataset_paths(dataset):
        digest.update(path.read_bytes())
    return digest.hexdigest()


@dataclass
class RunSummary:
    directory: Path
    facts: dict[str, int]  # per type, before the filter
    kept: dict[str, int]  # per type, passed the filter
    used: dict[str, int]  # per type, attributed (the filter's, up to --limit)
    attributed: int  # sentences attributed by this call
    already_done: int  # sentences found complete from an earlier call
    seconds: float
    skipped: list[Skipped] = field(default_factory=list)  # lines left out before the filter, with their reasons


def run_dataset(model: LoadedModel, directory: Path | str, arguments: RunArguments, *,
                settings: Settings | None = None, batch_size: int = 8, progress: Progress | None = None,
                backend: Backend | None = None, overwrite: bool = False) -> RunSummary:
    """Attribute every kept sentence into `directory`, resuming what an earlier call with the same arguments
    left there (`overwrite`: replace a different run instead). `settings`: the model spec (recorded, so
    `analyze` can load the model again) and the scoring options; default: the model as loaded and
    `DEFAULT_TOP` neurons per sentence. `backend`: where the batches run (default: here); it carries its own
    settings, which then win. Only this process writes files."""
    started = time.perf_counter()
    check_positive("--batch-size", batch_size)
    if arguments.limit is not None:
        check_positive("--limit", arguments.limit)
    settings = backend.settings if backend is not None else settings or run_settings(model)
    if model.spec is not None and replace(settings.model, device=None) != replace(model.spec, device=None):
        raise UserError(f"the settings name another model ({settings.model}) than the one given ({model.spec}); "
                        "build them with Settings(model.spec, ...)")
    report = progress or (lambda what, done, total: None)
    directory = Path(directory)
    created = not directory.exists() or all(p.name == LOCK_FILE for p in directory.iterdir())
    prepare_directory(directory)
    with run_lock(directory):
        try:
            return _run(model, directory, arguments, settings, batch_size, report, backend, overwrite, started)
        except BaseException:
            if created and not completed_ids(directory / "parts"):
                remove_run(directory, including_lock=True)  # nothing worth keeping: leave no half-made directory behind
            raise


def _run(model: LoadedModel, directory: Path, arguments: RunArguments, settings: Settings, batch_size: int,
         report: Progress, backend: Backend | None, overwrite: bool, started: float) -> RunSummary:
    record = claim(directory, arguments.identity(model, settings, batch_size), overwrite)
    pool = backend or LocalBackend(model, settings)
    budget = _memory_budget_in_use(directory, record, pool)
    checked, left_out = _filtered(model, directory, arguments, report)
    sentences = _selected(checked, arguments.limit)
    if not sentences:
        raise UserError(_nothing_left(checked, left_out))
    parts = directory / "parts"
    done = completed_ids(parts)
    # Batches are fixed by sentence id, and a part is one whole batch: a resumed run pads exactly the same
    # prompts together as an uninterrupted one, so its numbers are bit-identical.
    batches = [list(range(start, min(start + batch_size, len(sentences))))
               for start in range(0, len(sentences), batch_size)]
    todo = [batch for batch in batches if not done.issuperset(batch)]
    finished = len(sentences) - sum(len(batch) for batch in todo)
    report("attributing sentences", finished, len(sentences))
    attribution_started = time.perf_counter()
    works = [PartWork([(i, sentences[i]) for i in batch], budget) for batch in todo]
    for index, tables in pool.map(attribute_part, works):
        write_part(parts, todo[index][0], tables)
        finished += len(todo[index])
        report("attributing sentences", finished, len(sentences))
    attribution_seconds = time.perf_counter() - attribution_started
    attributed = sum(len(batch) for batch in todo)
    merge_parts(directory)
    used = Counter(s.fact.type_name for s in sentences)
    kept = Counter(c.fact.type_name for c in checked if c.kept)
    facts = Counter(c.fact.type_name for c in checked)
    record.update({
        "complete": True,
        "settings": settings.to_dict(),
        "shape": model.shape.to_dict(),
        "top": settings.scoring.top_k,
        "query_top": settings.scoring.query_top,
        "query_via": settings.scoring.query_via,
        "answer_tokens": settings.scoring.answer_tokens,
        "model_source": model.source,
        "model_argument": settings.model.name,
        "model_dtype": model.dtype,
        "sentences": len(sentences),
        "facts": dict(facts),
        "kept": {kind: kept.get(kind, 0) for kind in facts},
        "used": dict(used),
        "skipped": len(left_out),
        "timings": {**record.get("timings", {}), "last_call_seconds": round(time.perf_counter() - started, 2),
                    "last_call_attributed": attributed,
                    "last_call_sentences_per_second": round(attributed / attribution_seconds, 3)
                    if todo and attribution_seconds > 0 else None},
    })
    write_json(directory / "run.json", record)
    return RunSummary(directory, dict(facts), {kind: kept.get(kind, 0) for kind in facts}, dict(used), attributed,
                      len(sentences) - attributed, time.perf_counter() - started,
                      [Skipped(s["source"], s.get("line"), s["reason"], s.get("prompt")) for s in left_out])


def _nothing_left(checked: Sequence[Checked], left_out: list[dict]) -> str:
    message = f"no sentence is left after the filter: {len(checked)} facts checked, none known to the model"
    if left_out:
        first = left_out[0]
        where = f"{first['source']}:{first['line']}" if first.get("line") else first["source"]
        message += f"; {len(left_out)} lines skipped (first: {where}: {first['reason']})"
    return message


@dataclass(frozen=True)
class PartWork:
    """One fixed batch: (sentence id, checked fact) pairs, and the scoring buffers' budget the run fixed."""

    sentences: list[tuple[int, Checked]]
    memory_budget: int


def attribute_part(model: LoadedModel, settings: Settings, work: PartWork) -> dict[str, pa.Table]:
    """The six tables of one batch (runs wherever the backend puts it)."""
    options = replace(settings.scoring, memory_budget=work.memory_budget, budget_fixed=True)
    results = attribute_with(model, [c.fact.prompt for _, c in work.sentences],
                             [c.fact.answer if options.answer_tokens == "all" else c.target
                              for _, c in work.sentences], options,
                             batch_size=len(work.sentences), contrasts=[c.fact.contrast for _, c in work.sentences])
    return tables_of([(i, c.fact, r) for (i, c), r in zip(work.sentences, results)])


def memory_budget_here(model: LoadedModel, settings: Settings, cap: int) -> int:
    """The scoring buffers' budget on this model's device now: the cap, and on a GPU at most half its free
    memory (runs wherever the backend puts it, so it is the workers' device that counts)."""
    return device_budget(cap, model.adapter.device) if not settings.scoring.budget_fixed else cap


def _memory_budget_in_use(directory: Path, record: dict, backend: Backend) -> int:
    """Fixed when the run starts and recorded in run.json: a resumed run batches its products, and so rounds,
    exactly as the first call did, whatever memory is free on its GPU now."""
    if "memory_budget_in_use" not in record:
        cap = backend.settings.scoring.memory_budget
        ((_, budget),) = list(backend.map(memory_budget_here, [cap]))
        record["memory_budget_in_use"] = int(budget)
        write_json(directory / "run.json", record)
    return record["memory_budget_in_use"]


def _filtered(model: LoadedModel, directory: Path, arguments: RunArguments, report: Progress
              ) -> tuple[list[Checked], list[dict]]:
    """The filter's verdict on every fact, computed once per directory (filter.json) and reused; and the
    lines left out before the filter (malformed, or a prompt the model cannot take)."""
    facts, skipped = load_facts(arguments.dataset, arguments.on_error)  # type: ignore[arg-type]
    path = directory / "filter.json"
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            by_place = {(f.source, f.line): f for f in facts}
            return [Checked(by_place[(v["source"], v["line"])], v["ids"], v["target"], v["rank"], v["kept"],
                            v["reason"]) for v in stored["facts"]], stored["skipped"]
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            path.unlink(missing_ok=True)  # recomputed below
    started = time.perf_counter()
    checked, not_usable = filter_facts(model, facts, on_error=arguments.on_error,  # type: ignore[arg-type]
                                       enough=arguments.limit,
                                       progress=lambda done, total: report("filtering facts", done, total))
    left_out = [s.to_dict() for s in [*skipped, *not_usable]]
    write_json(path, {
        "seconds": round(time.perf_counter() - started, 2),
        "skipped": left_out,
        "facts": [{"source": c.fact.source, "line": c.fact.line, "type": c.fact.type, "prompt": c.fact.prompt,
                   "answer": c.fact.answer, "ids": c.ids, "target": c.target, "rank": c.rank, "kept": c.kept,
                   "reason": c.reason} for c in checked],
    })
    return checked, left_out


def _selected(checked: Sequence[Checked], limit: int | None) -> list[Checked]:
    """Kept sentences in dataset order; with a limit, the first `limit` of each type."""
    taken: Counter = Counter()
    result = []
    for c in checked:
        if c.kept and (limit is None or taken[c.fact.type] < limit):
            taken[c.fact.type] += 1
            result.append(c)
    return result
