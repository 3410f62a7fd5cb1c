"""neuron-attribution: which neurons of a causal LM put the answer there (Yu & Ananiadou, EMNLP 2024)."""

from .errors import UserError
from .loading import LoadedModel, load_model
from .trace import Trace, trace_token_ids

__version__ = "0.1.0"

__all__ = ["LoadedModel", "Trace", "UserError", "__version__", "load_model", "trace_token_ids"]
