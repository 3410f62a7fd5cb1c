"""Reading models with transformers, within the loading rules: safetensors unless pickle is allowed,
`trust_remote_code` only when passed, local files only unless a hub id is asked for, one-line errors."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from .adapters import adapter_for
from .quantization.methods import check_checkpoint

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def refuse_pickle_unless(allow_pickle: bool, path: Path) -> None:
    if not allow_pickle:
        raise UserError(f"{path} is a pickle checkpoint, which can run code when loaded; "
                        "pass allow_pickle=True (CLI: --allow-pickle) if you trust it")


def load_directory(directory: Path, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool,
                    placement: dict | None = None):
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; not a transformers model directory")
    has_safetensors = any(directory.glob("*.safetensors"))
    if not has_safetensors:
        pickles = [p for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if not pickles:
            raise UserError(f"{directory} has no model weights (*.safetensors)")
        refuse_pickle_unless(allow_pickle, pickles[0])
    check_checkpoint(directory, "quantization_config" in (placement or {}))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, attn_implementation="eager", use_safetensors=has_safetensors,
                trust_remote_code=trust_remote_code, local_files_only=True, **(placement or {}))
    except UserError:
        raise
    except Exception as error:  # transformers raises many types for unreadable or truncated weights
        raise UserError(f"cannot load model weights from {directory}: {first_line(error)}") from None
    adapter_for(model)  # unsupported architectures fail here, before the tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code,
                                                  local_files_only=True)
    except Exception as error:
        raise UserError(f"cannot load the tokenizer from {directory}: {first_line(error)}") from None
    return model, tokenizer


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' per-tensor progress bar off for this load only (for a sub-second load it is noise); the
    caller's setting is restored afterwards."""
    from transformers.utils import logging as transformers_logging

    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def load_from_hub(name: str, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool,
                   placement: dict | None = None):
    try:
        return _from_pretrained_hub(name, dtype, allow_pickle, trust_remote_code, local_only=True,
                                    placement=placement)
    except UserError:
        if not _hub_reachable():
            raise UserError(f"cannot load {name!r}: no such local path, not in the local Hugging Face cache, "
                            "and the hub is unreachable (offline?)") from None
    return _from_pretrained_hub(name, dtype, allow_pickle, trust_remote_code, local_only=False, placement=placement)


def _from_pretrained_hub(name: str, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool,
                         local_only: bool, placement: dict | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code,
                                                  local_files_only=local_only)
        model = AutoModelForCausalLM.from_pretrained(
            name, dtype=dtype, attn_implementation="eager", use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code, local_files_only=local_only, **(placement or {}))
    except UserError:
        raise
    except Exception as error:
        raise UserError(f"cannot load {name!r} from the Hugging Face hub: {first_line(error)}") from None
    adapter_for(model)
    return model, tokenizer


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick connection check, so an offline machine gets an answer at once instead of minutes of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    from urllib.parse import urlparse

    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def write_dequantised(gguf_path: Path, directory: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:
        raise UserError(f"cannot read GGUF file {gguf_path}: {first_line(error)}") from None
    adapter_for(model)
    tied = _tied_parameter_names(model)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _tied_parameter_names(model: nn.Module) -> set[str]:
    """Names of parameters that share storage with an earlier one (safetensors refuses shared tensors)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict().items():
        pointer = tensor.data_ptr()
        if pointer in seen:
            tied.add(name)
        else:
            seen[pointer] = name
    return tied
