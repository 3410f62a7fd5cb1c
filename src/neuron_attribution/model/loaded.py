"""A loaded model: the transformers causal LM, its tokenizer and its family adapter. What every later stage
takes; how it was loaded is `loading`'s business."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..neurons import ModelShape
from ..settings import ModelSpec
from .adapters import FamilyAdapter, adapter_for
from .environment import check_supported_versions


@dataclass
class LoadedModel:
    """A transformers causal LM with its tokenizer and family adapter."""

    hf_model: nn.Module
    tokenizer: object
    adapter: FamilyAdapter = field(repr=False)
    name: str
    source: str
    spec: ModelSpec | None = None  # how to load it again (None: built in memory, cannot be reloaded)
    token_texts: dict[int, str] = field(default_factory=dict, repr=False)  # decoded once per token id

    @classmethod
    def from_hf(cls, hf_model: nn.Module, tokenizer: object = None, *, name: str = "in-memory",
                source: str = "in-memory model", spec: ModelSpec | None = None) -> LoadedModel:
        """Wrap a model already in memory. Switches it to eager attention (the trace reads attention weights)."""
        check_supported_versions()
        adapter = adapter_for(hf_model)
        if getattr(hf_model.config, "_attn_implementation", None) != "eager":
            hf_model.set_attn_implementation("eager")
        if getattr(hf_model.config, "_attn_implementation", None) != "eager":
            # Families that cannot switch (Falcon) read the choice from their config at every call.
            hf_model.config._attn_implementation = "eager"
        hf_model.eval()
        return cls(hf_model=hf_model, tokenizer=tokenizer, adapter=adapter, name=name, source=source, spec=spec)

    def __repr__(self) -> str:
        s = self.shape
        return (f"LoadedModel({self.name!r}, family={s.family!r}, layers={s.n_layers}, d_model={s.d_model}, "
                f"dtype={self.dtype}, device={self.device})")

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
