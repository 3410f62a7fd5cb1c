"""A loaded model: the transformers causal LM, its tokenizer and its family adapter. What every later stage
takes; how it was loaded is `loading`'s business."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import nn

from ..neurons import ModelShape
from ..settings import ModelSpec
from .adapters import FamilyAdapter, adapter_for
from .environment import check_supported_versions
from .hf_internals import attention_implementation_of, set_attention_implementation
from .quantization import prepare_for_reading


@dataclass
class LoadedModel:
    """A transformers causal LM with its tokenizer and family adapter.

    One model may be used from several threads (a notebook attributing while `serve` runs in the background):
    tracing, interventions and readouts install hooks on the model's shared modules and may switch its attention
    implementation, so each takes `lock` for as long as it runs. A re-entrant lock: a trace inside an
    intervention's `with` block, on the same thread, goes through. All per-model state (the interventions on its
    experts modules) lives here, none in the process."""

    hf_model: nn.Module
    tokenizer: object
    adapter: FamilyAdapter = field(repr=False)
    name: str
    source: str
    spec: ModelSpec | None = None  # how to load it again (None: built in memory, cannot be reloaded)
    token_texts: dict[int, str] = field(default_factory=dict, repr=False)  # decoded once per token id
    weight_files: tuple = field(default=(), repr=False)  # the files its numbers come from, if loaded from files
    lock: threading.RLock = field(default_factory=threading.RLock, repr=False, compare=False)
    # experts module -> the hook applying the interventions installed on it (model/experts.py)
    expert_scalings: dict = field(default_factory=dict, repr=False, compare=False)
    # True while an intervention runs a sublayer once more to measure it (model/interventions.py): recorders
    # skip what they see then
    probing: bool = field(default=False, repr=False, compare=False)

    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer: object = None, *, name: str = "in-memory",
                source: str = "in-memory model", spec: ModelSpec | None = None) -> LoadedModel:
        """Wrap a model already in memory. Switches it to eager attention (the trace reads attention weights)."""
        check_supported_versions()
        adapter = adapter_for(hf_model)
        prepare_for_reading(hf_model)
        if attention_implementation_of(hf_model) != "eager":
            set_attention_implementation(hf_model, "eager")
        hf_model.eval()
        return cls(hf_model=hf_model, tokenizer=tokenizer, adapter=adapter, name=name, source=source, spec=spec)

    def __getstate__(self) -> dict:
        # A copy (copy.deepcopy, pickling) gets a lock of its own and no interventions in progress.
        state = dict(self.__dict__)
        del state["lock"]
        state["expert_scalings"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.lock = threading.RLock()

    def __repr__(self) -> str:
        s = self.shape
        return (f"LoadedModel({self.name!r}, family={s.family!r}, layers={s.n_layers}, d_model={s.d_model}, "
                f"dtype={self.dtype}, device={self.device})")

    def weights_fingerprint(self) -> str:
        """What identifies these weights (`fingerprint`): the weight files' sha256, or a digest of the
        parameters for a model built in memory."""
        from .fingerprint import weights_fingerprint

        return weights_fingerprint(self.hf_model, self.weight_files)

    @property
    def shape(self) -> ModelShape:
        return self.adapter.shape

    @property
    def device(self) -> torch.device:
        return next(self.hf_model.parameters()).device

    @property
    def dtype(self) -> str:
        """The dtype the weights run in, as `load_model` takes it ("float32", "bfloat16")."""
        return str(next(self.hf_model.parameters()).dtype).removeprefix("torch.")
