"""What identifies a model's weights, for a run's identity: re-saved weights at the same `--model DIR` are another
model, and a resumed run must not mix the two.

A model loaded from files is identified by the sha256 of its weight files and config (each hash remembered beside
the converted-model cache by device, inode, size and times, as GGUF hashes are: `model_cache.content_sha256`), so
a second look costs a stat per file. A model built in memory (or from the hub cache, whose files are not tracked
here) by a digest of every parameter's name, shape, dtype and up to 4,096 evenly spaced values: cheap for a 70B
model, and any retraining or re-initialisation changes it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .model_cache import content_sha256

WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf", "config.json")
SAMPLED_VALUES = 4096


def weight_files_in(directory: Path) -> tuple[Path, ...]:
    """A model directory's files that determine its numbers, in a stable order."""
    return tuple(sorted({p.resolve() for pattern in WEIGHT_FILE_PATTERNS for p in directory.glob(pattern)
                         if p.is_file()}))


def weights_fingerprint(hf_model: nn.Module, files: Sequence[Path] = ()) -> str:
    """"files:<sha256>" over the files' names and content hashes, or "parameters:<sha256>" over samples of the
    parameters where no files are known."""
    digest = hashlib.sha256()
    if files:
        for path in files:
            digest.update(f"{Path(path).name}\0{content_sha256(Path(path))}\n".encode())
        return "files:" + digest.hexdigest()
    with torch.no_grad():
        for name, parameter in hf_model.named_parameters():
            digest.update(f"{name}\0{tuple(parameter.shape)}\0{parameter.dtype}\n".encode())
            flat = parameter.detach().reshape(-1)
            if flat.numel() == 0 or flat.is_meta:
                continue
            step = max(1, flat.numel() // SAMPLED_VALUES)
            digest.update(flat[::step][:SAMPLED_VALUES].to("cpu", torch.float32).numpy().tobytes())
    return "parameters:" + digest.hexdigest()
