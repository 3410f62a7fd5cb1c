"""The package version, in one place (read by the package, run.json and `--version`)."""

__version__ = "0.2.0"
