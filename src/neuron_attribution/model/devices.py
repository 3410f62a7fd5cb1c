"""Which devices a model can be asked to run on, checked before anything is loaded.

A device request is "cpu" (or None), "cuda", "cuda:N", or "auto" (accelerate spreads the layers over the GPUs,
or keeps them on the CPU where there is none). Every mistake a user can make here is a one-line UserError
naming what this machine has, raised before any work starts.
"""

from __future__ import annotations

import torch

from ..errors import UserError


def check_device(device: str | None, dtype: torch.dtype = torch.float32, *, option: str = "--device") -> None:
    """A UserError unless this machine can run a model of `dtype` on `device`."""
    if device is None or device in ("cpu", "auto"):
        if device == "auto" and dtype == torch.bfloat16 and torch.cuda.is_available():
            _check_bfloat16(torch.device("cuda"))
        return
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise UserError(f"{option} {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cpu":
        return
    if parsed.type != "cuda":
        raise UserError(f"{option} {device!r}: only cpu, cuda, cuda:N and auto are supported")
    if not torch.cuda.is_available():
        build = "a CPU-only build of torch" if torch.version.cuda is None else f"torch for CUDA {torch.version.cuda}"
        raise UserError(f"{option} {device}: no CUDA GPU is available here ({build} {torch.__version__}); "
                        "use --device cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        have = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
        raise UserError(f"{option} {device}: this machine has {count} CUDA GPU{'s' if count != 1 else ''} "
                        f"({have})")
    if dtype == torch.bfloat16:
        _check_bfloat16(parsed)


def _check_bfloat16(device: torch.device) -> None:
    if not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(device)
        raise UserError(f"--dtype bfloat16: the GPU {name} has no bfloat16 support; use --dtype float16 or float32")
