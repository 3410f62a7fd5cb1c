"""The installed versions of the libraries whose internals the method reads, checked against the ranges this
package declares (its own metadata, so pyproject.toml is the one place they are written)."""

from __future__ import annotations

import functools
from importlib import metadata

from ..errors import UserError

CHECKED = ("torch", "transformers")  # the ones whose module layout and hooks the adapters and trace rely on


@functools.cache
def check_supported_versions() -> None:
    """A one-line UserError naming the supported range when torch or transformers is outside it."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    try:
        requirements = [Requirement(r) for r in metadata.requires("neuron-attribution") or []]
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return
    for requirement in requirements:
        if requirement.name not in CHECKED or requirement.marker is not None:
            continue
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            raise UserError(f"{requirement.name} is not installed; neuron-attribution needs "
                            f"{requirement.name}{requirement.specifier}") from None
        release = Version(installed).public  # "2.13.0+cpu" -> "2.13.0"
        if not requirement.specifier.contains(release, prereleases=True):
            raise UserError(f"{requirement.name} {installed} is installed, but neuron-attribution supports "
                            f"{requirement.name}{requirement.specifier} (pip install "
                            f"'{requirement.name}{requirement.specifier}')")
