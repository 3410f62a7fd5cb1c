"""Errors a user can cause. The CLI turns these into a one-line message and exit code 2; the explorer into a
400 answer. Messages name options as the Python API spells them (`answer_tokens='first'`); each surface rewrites
that spelling into its own (`--answer-tokens first` on the command line, the control's label on the page)."""

from __future__ import annotations

import re

_OPTION = re.compile(r"\b([a-z][a-z_]*)=(['\"])([\w.-]+)\2")


class UserError(Exception):
    """Bad input from the user (model name, prompt, file, flag): reported without a traceback."""


def for_the_command_line(message: str) -> str:
    """`answer_tokens='first'` → `--answer-tokens first`."""
    return _OPTION.sub(lambda m: f"--{m.group(1).replace('_', '-')} {m.group(3)}", message)


def for_a_page(message: str, labels: dict[str, str]) -> str:
    """`answer_tokens='first'` → “Answer tokens: first” for the options a page has a control for (`labels`: option
    name → the control's label); other options keep the Python spelling."""
    def spelled(m: re.Match) -> str:
        label = labels.get(m.group(1))
        return m.group(0) if label is None else f"“{label}: {m.group(3)}”"
    return _OPTION.sub(spelled, message)
