"""`run`: attribution of every kept sentence of a dataset, into Parquet tables under one directory.

Layout of DIR:
    run.json                    what was run (model, arguments, versions), the filter's counts, timings
    filter.json                 every fact with its gold rank and whether the filter kept it
    parts/part-000123/*.parquet one batch of sentences, all six tables; written to a temporary directory and
                                renamed into place, so a part is either complete or absent
    <table>.parquet             the parts merged, once every sentence is done

Resuming: a second run with the same arguments reads which sentence ids the complete parts hold (a part whose
files cannot be read is removed and recomputed) and attributes only the rest, so after any interruption,
kill -9 included, each sentence ends up exactly once.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import __version__
from .attribution import Attribution, attribute_batch
from .datasets import dataset_paths, load_facts
from .errors import UserError
from .execution import Backend, LocalBackend
from .filtering import Checked, filter_facts
from .loading import LoadedModel
from .output import write_json

TABLES = ("sentences", "ffn_neurons", "attention_neurons", "query_neurons", "layers", "heads")
DEFAULT_TOP = 300

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RunArguments:
    dataset: str
    limit: int | None  # kept sentences of each type, at most
    top: int  # value and query neurons stored per sentence
    on_error: str

    def identity(self, model: LoadedModel, batch_size: int) -> dict:
        """What must match for a directory to be resumed: the model and everything that changes results (the
        batch size too: float32 rounding depends on which prompts are padded together)."""
        return {"model": model.name, "dtype": model_dtype(model), "device": str(model.device), "dataset": self.dataset,
                "dataset_sha256": _dataset_digest(self.dataset), "limit": self.limit, "top": self.top,
                "on_error": self.on_error, "batch_size": batch_size, "neuron_attribution": __version__}


def model_dtype(model: LoadedModel) -> str:
    """The dtype the model's weights run in, as load_model's `dtype` takes it ("float32", "bfloat16")."""
    return str(next(model.hf_model.parameters()).dtype).removeprefix("torch.")


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


def run_dataset(model: LoadedModel, directory: Path | str, arguments: RunArguments, *, batch_size: int = 8,
                progress: Progress | None = None, model_argument: str | None = None,
                backend: Backend | None = None) -> RunSummary:
    """Attribute every kept sentence into `directory`, resuming what an earlier call with the same arguments
    left there. `model_argument`: how the model was named (None: the default), so `analyze` can load it.
    `backend`: where the batches run (default: here); only this process writes files."""
    started = time.perf_counter()
    if batch_size <= 0:
        raise UserError("--batch-size must be a positive number")
    if arguments.top <= 0:
        raise UserError("--top must be a positive number")
    if arguments.limit is not None and arguments.limit <= 0:
        raise UserError("--limit must be a positive number")
    report = progress or (lambda what, done, total: None)
    directory = Path(directory)
    _prepare_directory(directory)
    identity = arguments.identity(model, batch_size)
    record = _claim(directory, identity)
    checked = _filtered(model, directory, arguments, report)
    sentences = _selected(checked, arguments.limit)
    if not sentences:
        raise UserError("no sentence is left after the filter: the model knows none of these facts "
                        f"({len(checked)} checked)")
    parts = directory / "parts"
    done = _completed_ids(parts)
    # Batches are fixed by sentence id, and a part is one whole batch: a resumed run pads exactly the same
    # prompts together as an uninterrupted one, so its numbers are bit-identical.
    batches = [list(range(start, min(start + batch_size, len(sentences))))
               for start in range(0, len(sentences), batch_size)]
    todo = [batch for batch in batches if not done.issuperset(batch)]
    finished = len(sentences) - sum(len(batch) for batch in todo)
    report("attributing sentences", finished, len(sentences))
    attribution_started = time.perf_counter()
    works = [PartWork([(i, sentences[i]) for i in batch], arguments.top) for batch in todo]
    for index, tables in (backend or LocalBackend(model)).map(attribute_part, works):
        _write_part(parts, todo[index][0], tables)
        finished += len(todo[index])
        report("attributing sentences", finished, len(sentences))
    attribution_seconds = time.perf_counter() - attribution_started
    attributed = sum(len(batch) for batch in todo)
    _merge_parts(directory)
    used = Counter(s.fact.type or "-" for s in sentences)
    kept = Counter(c.fact.type or "-" for c in checked if c.kept)
    facts = Counter(c.fact.type or "-" for c in checked)
    record.update({
        "complete": True,
        "model_source": model.source,
        "model_argument": model_argument,
        "model_dtype": model_dtype(model),
        "sentences": len(sentences),
        "facts": dict(facts),
        "kept": {kind: kept.get(kind, 0) for kind in facts},
        "used": dict(used),
        "timings": {**record.get("timings", {}), "last_call_seconds": round(time.perf_counter() - started, 2),
                    "last_call_attributed": attributed,
                    "last_call_sentences_per_second": round(attributed / attribution_seconds, 3)
                    if todo and attribution_seconds > 0 else None},
    })
    write_json(directory / "run.json", record)
    return RunSummary(directory, dict(facts), {kind: kept.get(kind, 0) for kind in facts}, dict(used), attributed,
                      len(sentences) - attributed, time.perf_counter() - started)


def _prepare_directory(directory: Path) -> None:
    try:
        (directory / "parts").mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UserError(f"cannot write to {directory}: {error.strerror or error}") from None


def _claim(directory: Path, identity: dict) -> dict:
    """run.json: created for a new directory; for an existing one, it must describe the same run."""
    path = directory / "run.json"
    if path.exists():
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise UserError(f"{path} is unreadable; use an empty --out directory") from None
        differences = [f"{key}: {record.get('identity', {}).get(key)!r} there, {value!r} now"
                       for key, value in identity.items() if record.get("identity", {}).get(key) != value]
        if differences:
            raise UserError(f"{directory} holds a different run ({'; '.join(differences)}); "
                            "use another --out directory")
        return record
    if any(p for p in directory.iterdir() if p.name != "parts") or any((directory / "parts").iterdir()):
        raise UserError(f"{directory} is not empty and holds no run; use an empty or new --out directory")
    record = {"identity": identity, "complete": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "versions": _versions(), "timings": {}}
    write_json(path, record)
    return record


def _versions() -> dict:
    import torch
    import transformers

    return {"neuron_attribution": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "pyarrow": pa.__version__, "python": platform.python_version()}


def _filtered(model: LoadedModel, directory: Path, arguments: RunArguments, report: Progress) -> list[Checked]:
    """The filter's verdict on every fact, computed once per directory (filter.json) and reused."""
    facts, skipped = load_facts(arguments.dataset, arguments.on_error)  # type: ignore[arg-type]
    path = directory / "filter.json"
    if path.exists():
        try:
            verdicts = json.loads(path.read_text(encoding="utf-8"))["facts"]
            by_place = {(f.source, f.line): f for f in facts}
            return [Checked(by_place[(v["source"], v["line"])], v["ids"], v["target"], v["rank"], v["kept"],
                            v["reason"]) for v in verdicts]
        except (OSError, KeyError, TypeError, json.JSONDecodeError):
            path.unlink(missing_ok=True)  # recomputed below
    started = time.perf_counter()
    checked, not_usable = filter_facts(model, facts, on_error=arguments.on_error,  # type: ignore[arg-type]
                                       enough=arguments.limit,
                                       progress=lambda done, total: report("filtering facts", done, total))
    write_json(path, {
        "seconds": round(time.perf_counter() - started, 2),
        "skipped": [s.to_dict() for s in [*skipped, *not_usable]],
        "facts": [{"source": c.fact.source, "line": c.fact.line, "type": c.fact.type, "prompt": c.fact.prompt,
                   "answer": c.fact.answer, "ids": c.ids, "target": c.target, "rank": c.rank, "kept": c.kept,
                   "reason": c.reason} for c in checked],
    })
    return checked


def _selected(checked: Sequence[Checked], limit: int | None) -> list[Checked]:
    """Kept sentences in dataset order; with a limit, the first `limit` of each type."""
    taken: Counter = Counter()
    result = []
    for c in checked:
        if c.kept and (limit is None or taken[c.fact.type] < limit):
            taken[c.fact.type] += 1
            result.append(c)
    return result


def _completed_ids(parts: Path) -> set[int]:
    """Sentence ids held by complete, readable parts. Leftover temporary directories and parts with an
    unreadable table are removed, so their sentences are attributed again."""
    done: set[int] = set()
    for part in sorted(parts.iterdir()):
        if not part.name.startswith("part-"):
            shutil.rmtree(part, ignore_errors=True)
            continue
        try:
            for table in TABLES:
                pq.read_metadata(part / f"{table}.parquet")
            ids = pq.read_table(part / "sentences.parquet", columns=["sentence_id"]).column(0).to_pylist()
        except (OSError, pa.ArrowException):
            shutil.rmtree(part, ignore_errors=True)
            continue
        if done & set(ids):  # cannot happen with atomic parts; never count a sentence twice
            shutil.rmtree(part, ignore_errors=True)
            continue
        done.update(ids)
    return done


@dataclass(frozen=True)
class PartWork:
    """One fixed batch: (sentence id, checked fact) pairs, and how many neurons to keep."""

    sentences: list[tuple[int, Checked]]
    top: int


def attribute_part(model: LoadedModel, work: PartWork) -> dict[str, pa.Table]:
    """The six tables of one batch (runs wherever the backend puts it)."""
    results = attribute_batch(model, [c.fact.prompt for _, c in work.sentences],
                              [c.target for _, c in work.sentences], top_k=work.top,
                              batch_size=len(work.sentences))
    return _tables([(i, c, r) for (i, c), r in zip(work.sentences, results)])


def _write_part(parts: Path, first_id: int, tables: dict[str, pa.Table]) -> None:
    final = parts / f"part-{first_id:07d}"
    if final.exists():  # already written: a batch is never stored twice
        return
    temporary = parts / f".tmp-{uuid.uuid4().hex}"
    temporary.mkdir()
    try:
        for name, table in tables.items():
            pq.write_table(table, temporary / f"{name}.parquet")
        _fsync_directory(temporary)
        os.rename(temporary, final)
        _fsync_directory(parts)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _fsync_directory(path: Path) -> None:
    for file in [path, *path.iterdir()] if path.is_dir() else [path]:
        try:
            descriptor = os.open(file, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(descriptor)
        except OSError:
            pass
        finally:
            os.close(descriptor)


def _tables(rows: list[tuple[int, Checked, Attribution]]) -> dict[str, pa.Table]:
    columns: dict[str, dict[str, list]] = {name: {} for name in TABLES}

    def add(table: str, **values) -> None:
        for key, value in values.items():
            columns[table].setdefault(key, []).append(value)

    for sentence_id, checked, result in rows:
        kind = checked.fact.type or "-"
        common = {"sentence_id": sentence_id, "type": kind}
        add("sentences", **common, prompt=result.prompt, answer=checked.fact.answer, tokens=result.tokens,
            target_text=result.target.text, target_id=result.target.id, target_prob=result.target.prob,
            target_rank=result.target.rank, source=checked.fact.source, line=checked.fact.line)
        # Neuron and head columns are the result's own fields, so they are named as in the attribute JSON.
        for table, items in (("ffn_neurons", result.ffn_neurons), ("attention_neurons", result.attention_neurons),
                             ("query_neurons", result.query_neurons)):
            for rank, item in enumerate(items, 1):
                add(table, **common, rank=rank, **asdict(item))
        for layer, (attention, ffn) in enumerate(zip(result.layers.attention, result.layers.ffn)):
            add("layers", **common, layer=layer, attention=attention, ffn=ffn)
        for h in result.heads:
            add("heads", **common, **asdict(h))
    return {name: pa.table(_typed(values)) for name, values in columns.items()}


def _typed(values: dict[str, list]) -> dict[str, pa.Array]:
    """Columns with explicit types, so that parts with and without optional values merge."""
    out = {}
    for key, column in values.items():
        if key in ("gate_score", "up_score"):
            out[key] = pa.array(column, type=pa.float64())
        elif key in ("top_tokens", "bottom_tokens", "tokens"):
            out[key] = pa.array(column, type=pa.list_(pa.string()))
        else:
            out[key] = pa.array(column)
    return out


def _merge_parts(directory: Path) -> None:
    for leftover in directory.glob(".*.parquet.*"):  # from a merge that was interrupted
        leftover.unlink(missing_ok=True)
    parts = sorted((directory / "parts").glob("part-*"))
    for table in TABLES:
        merged = pa.concat_tables([pq.read_table(part / f"{table}.parquet") for part in parts],
                                  promote_options="default")
        merged = merged.sort_by([("sentence_id", "ascending")])
        temporary = directory / f".{table}.parquet.{uuid.uuid4().hex}"
        try:
            pq.write_table(merged, temporary)
            os.replace(temporary, directory / f"{table}.parquet")
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


def read_table(directory: Path | str, table: str) -> pa.Table:
    path = Path(directory) / f"{table}.parquet"
    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as error:
        raise UserError(f"cannot read {path}: {error}; is {directory} a finished run?") from None


def read_run(directory: Path | str) -> dict:
    path = Path(directory) / "run.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{directory} holds no readable run.json; is it a run directory?") from None
    if not record.get("complete"):
        raise UserError(f"the run in {directory} is not finished; run it again with the same arguments to resume")
    return record
