"""neuron-attribution: which neurons of a causal LM put the answer there (Yu & Ananiadou, EMNLP 2024).

The public API is importable from here; names are loaded on first use, so `import neuron_attribution` (and the
CLI's `--help`) does not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import UserError
from .version import __version__

# public name -> module (relative to this package) that defines it
_EXPORTS = {
    "Settings": "settings", "ModelSpec": "settings", "ScoringOptions": "settings",
    "FfnIndex": "neurons", "AttentionIndex": "neurons", "HeadIndex": "neurons", "ExpertIndex": "neurons",
    "parse_neuron": "neurons",
    "LoadedModel": "model.loaded", "load_model": "model.loading",
    "Trace": "model.trace", "trace_token_ids": "model.trace",
    "Ablation": "model.interventions", "ablated": "model.interventions", "last_logits": "model.interventions",
    "last_logits_each": "model.interventions",
    "Attribution": "results.attribution", "AttentionNeuron": "results.attribution",
    "FfnNeuron": "results.attribution", "HeadScore": "results.attribution", "Prediction": "results.attribution",
    "Projection": "results.attribution", "QueryLayer": "results.attribution", "QueryNeuron": "results.attribution",
    "Evaluation": "results.evaluation", "Metrics": "results.metrics",
    "attribute": "pipelines.attribute", "attribute_batch": "pipelines.attribute",
    "circuit": "pipelines.circuit", "CircuitSettings": "pipelines.circuit",
    "predict": "pipelines.predict",
    "score_neurons": "pipelines.score", "NeuronScores": "results.neuron_scores",
    "direct_parts": "pipelines.direct", "DirectParts": "pipelines.direct",
    "project": "pipelines.projection", "interpret_query_neuron": "pipelines.projection",
    "query_value_split": "pipelines.paper", "split_queries": "pipelines.paper",
    "evaluate": "pipelines.evaluate",
    "RunArguments": "pipelines.run", "run_dataset": "pipelines.run",
    "analyze_run": "pipelines.analyze",
    "load_facts": "datasets",
}

__all__ = sorted([*_EXPORTS, "UserError", "__version__"])


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from .datasets import load_facts
    from .model.interventions import Ablation, ablated
    from .model.loaded import LoadedModel
    from .model.loading import load_model
    from .pipelines.direct import DirectParts, direct_parts
    from .model.trace import Trace, trace_token_ids
    from .neurons import AttentionIndex, ExpertIndex, FfnIndex, HeadIndex, parse_neuron
    from .pipelines.analyze import analyze_run
    from .pipelines.circuit import CircuitSettings, circuit
    from .pipelines.attribute import attribute, attribute_batch
    from .pipelines.evaluate import evaluate
    from .pipelines.paper import query_value_split, split_queries
    from .pipelines.predict import predict
    from .pipelines.projection import interpret_query_neuron, project
    from .pipelines.score import score_neurons
    from .pipelines.run import RunArguments, run_dataset
    from .results.attribution import (AttentionNeuron, Attribution, FfnNeuron, HeadScore, Prediction, Projection,
                                      QueryLayer, QueryNeuron)
    from .results.evaluation import Evaluation
    from .results.neuron_scores import NeuronScores
    from .results.metrics import Metrics
    from .settings import ModelSpec, ScoringOptions, Settings
