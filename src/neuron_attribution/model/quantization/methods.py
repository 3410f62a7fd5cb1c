"""Loading a model quantized: the methods `load_model(quantization=...)` takes, the optional extra each needs, and
the check of a checkpoint that is quantized already (its config's `quantization_config`)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...errors import UserError


@dataclass(frozen=True)
class Method:
    name: str
    package: str  # the import name the method needs
    extra: str  # neuron-attribution[extra] installs it
    config: Callable[[torch.dtype, str], object]  # (model dtype, device) -> transformers' quantization_config


def _bnb_4bit(quant_type: str) -> Callable[[torch.dtype, str], object]:
    def build(dtype: torch.dtype, device: str):
        from transformers import BitsAndBytesConfig

        # Computing in the model's own dtype: a float32 model's 4-bit layers are exact float32 linear maps.
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return build


def _bnb_8bit(dtype: torch.dtype, device: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_8bit=True)


def _torchao_int8(dtype: torch.dtype, device: str):
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig

    return TorchAoConfig(Int8WeightOnlyConfig())


def _torchao_int4(dtype: torch.dtype, device: str):
    from transformers import TorchAoConfig

    if device.startswith("cuda") or device == "auto":
        from torchao.quantization import Int4WeightOnlyConfig

        return TorchAoConfig(Int4WeightOnlyConfig(group_size=128))
    # torchao's packed int4 layouts need a GPU; on the CPU its int4 values are held one per byte (same numbers).
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerGroup

    return TorchAoConfig(IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=PerGroup(32)))


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("bnb-4bit", "bitsandbytes", "bnb", _bnb_4bit("nf4")),  # NF4, double quantisation
    Method("bnb-4bit-fp4", "bitsandbytes", "bnb", _bnb_4bit("fp4")),
    Method("bnb-8bit", "bitsandbytes", "bnb", _bnb_8bit),  # LLM.int8
    Method("torchao-int8", "torchao", "torchao", _torchao_int8),  # weight-only
    Method("torchao-int4", "torchao", "torchao", _torchao_int4),
)}

# A checkpoint's `quantization_config.quant_method` -> the package and extra that read it.
CHECKPOINT_METHODS = {"bitsandbytes": ("bitsandbytes", "bnb"), "torchao": ("torchao", "torchao"),
                      "compressed-tensors": ("compressed_tensors", "compressed-tensors")}


def check_method(name: str | None) -> Method | None:
    if name is None:
        return None
    if name not in METHODS:
        raise UserError(f"unknown quantization {name!r}; use one of {', '.join(METHODS)}")
    method = METHODS[name]
    require(method.package, method.extra, name)
    return method


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def require(package: str, extra: str, what: str) -> None:
    if not installed(package):
        raise UserError(f"{what} needs the package {package}: pip install 'neuron-attribution[{extra}]'")


def loading_arguments(name: str | None, dtype: torch.dtype, device: str | None) -> dict:
    """from_pretrained's extra arguments for quantization `name` (none without one). Quantized weights are
    placed by loading (they cannot be moved afterwards): the device goes into the device map."""
    method = check_method(name)
    if method is None:
        return {}
    device = device or "cpu"
    return {"quantization_config": method.config(dtype, device),
            "device_map": "auto" if device == "auto" else {"": device}}


def stored_method(directory: Path) -> str | None:
    """The quantisation method a checkpoint directory's config records (None: none, or no readable config)."""
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        return None
    stored = config.get("quantization_config") if isinstance(config, dict) else None
    return str(stored.get("quant_method", "unknown")) if isinstance(stored, dict) else None


def check_checkpoint(directory: Path, quantizing: bool) -> None:
    """A checkpoint quantized already loads as it is, if its method is one this tool reads; any other method is
    refused before loading, and asking to quantize it again is an error."""
    method = stored_method(directory)
    if method is None:
        return
    if method not in CHECKPOINT_METHODS:
        raise UserError(f"{directory} is quantized with {method!r}, which this tool cannot read; supported: "
                        f"{', '.join(CHECKPOINT_METHODS)}")
    if quantizing:
        raise UserError(f"{directory} is quantized already ({method}); load it without --quantization")
    package, extra = CHECKPOINT_METHODS[method]
    require(package, extra, f"{directory} (quantized with {method})")


def quantization_of(model: nn.Module) -> str | None:
    """The quantisation method a loaded model's config records ("bitsandbytes", "compressed-tensors", ...; None:
    not quantized)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    method = getattr(method, "value", method)  # transformers' QuantizationMethod enum, or a config's string
    return None if method is None else str(method)
