"""neuron-attribution: which neurons of a causal LM put the answer there (Yu & Ananiadou, EMNLP 2024)."""

from .attribution import (AttentionNeuron, Attribution, FfnNeuron, HeadScore, Projection, attribute,
                          attribute_batch, project)
from .errors import UserError
from .loading import LoadedModel, load_model
from .trace import Trace, trace_token_ids

__version__ = "0.1.0"

__all__ = ["AttentionNeuron", "Attribution", "FfnNeuron", "HeadScore", "LoadedModel", "Projection", "Trace",
           "UserError", "__version__", "attribute", "attribute_batch", "load_model", "project",
           "trace_token_ids"]
