"""neuron-attribution: which neurons of a causal LM put the answer there (Yu & Ananiadou, EMNLP 2024)."""

from .attribution import (AttentionNeuron, Attribution, FfnNeuron, HeadScore, Projection, QueryLayer, QueryNeuron,
                          attribute, attribute_batch, interpret_query_neuron, project, query_value_split,
                          split_queries)
from .errors import UserError
from .loading import LoadedModel, load_model
from .trace import Trace, trace_token_ids

__version__ = "0.1.0"

__all__ = ["AttentionNeuron", "Attribution", "FfnNeuron", "HeadScore", "LoadedModel", "Projection", "QueryLayer",
           "QueryNeuron", "Trace", "UserError", "__version__", "attribute", "attribute_batch",
           "interpret_query_neuron", "load_model", "project", "query_value_split", "split_queries",
           "trace_token_ids"]
