"""Attribution methods for FFN neurons: the proposed score, the paper's seven baselines, a random control and
integrated gradients. Every module in this package is imported here, so a method defined in any of them is
registered (`base.METHODS`); the CLI's choices and help texts come from the registry."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Sequence

from ...errors import UserError
from .base import METHODS, FfnScorer, MethodResources

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

ALL = "all"


def default_methods() -> list[str]:
    """What `all` stands for: every method but those marked otherwise (integrated gradients is slow)."""
    return [key for key, method in METHODS.items() if method.in_all]


def resolve_methods(spec: str | Sequence[str] | None) -> list[str]:
    """Method keys from "all", "a,b" or a list, in the order given, without repeats."""
    names = spec.split(",") if isinstance(spec, str) else list(spec or [ALL])
    keys: list[str] = []
    for name in (n.strip() for n in names):
        for key in default_methods() if name == ALL else [name]:
            if key not in METHODS:
                raise UserError(f"unknown method {key!r}; known: {ALL}, {', '.join(METHODS)}")
            if key not in keys:
                keys.append(key)
    if not keys:
        raise UserError("no method given")
    return keys


def create_scorers(keys: Sequence[str], resources: MethodResources) -> dict[str, FfnScorer]:
    return {key: METHODS[key].create(resources) for key in keys}


def methods_help() -> str:
    """One line per method for the CLI's help."""
    return "; ".join(f"{key}: {method.description}" + ("" if method.in_all else f" (not in {ALL})")
                     for key, method in METHODS.items())


__all__ = ["ALL", "METHODS", "FfnScorer", "MethodResources", "create_scorers", "default_methods",
           "methods_help", "resolve_methods"]
