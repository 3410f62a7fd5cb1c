"""What every model source shares: how to load (`LoadRequest`), what a load gives (`LoadedParts`), the
`ModelSource` protocol, and `OfflineModel`, the source of a model shipped as a GGUF in PyPI packages (each such
model is one module that defines one, listed in `sources`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from . import hf_loading, model_cache


@dataclass(frozen=True)
class LoadRequest:
    """How to load, whatever the source: dtype, the loading rules, and where the layers go."""

    dtype: torch.dtype
    allow_pickle: bool = False
    trust_remote_code: bool = False
    placement: dict = field(default_factory=dict)  # {"device_map": "auto"} to spread layers over GPUs


@dataclass
class LoadedParts:
    hf_model: nn.Module
    tokenizer: object
    source: str  # where the weights came from, for `info` and the results
    name: str  # the name results carry
    weight_files: tuple[Path, ...] = ()  # the files its numbers come from (a run's identity hashes them)


class ModelSource(Protocol):
    description: str

    def claims(self, name: str | None) -> bool: ...

    def load(self, name: str | None, request: LoadRequest) -> LoadedParts: ...


@dataclass(frozen=True)
class OfflineModel:
    """A model shipped as a GGUF file in PyPI packages, loadable without a network."""

    name: str | None  # what load_model takes (None: the default model)
    display_name: str  # the name results carry
    label: str  # where the GGUF comes from, in words
    locate: Callable[[Path], Path]  # the cache root -> the GGUF file (fetched or joined there if need be)
    description: str = "a packaged offline model"

    def claims(self, name: str | None) -> bool:
        return name == self.name

    def load(self, name: str | None, request: LoadRequest) -> LoadedParts:
        gguf = self.locate(model_cache.cache_root())
        directory = model_cache.dequantised(gguf, hf_loading.write_dequantised)
        model, tokenizer = hf_loading.load_directory(directory, request.dtype, False, request.trust_remote_code,
                                                     request.placement)
        return LoadedParts(model, tokenizer, f"{self.label}; dequantised cache {directory}", self.display_name,
                           (gguf,))
