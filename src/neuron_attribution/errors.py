"""Errors a user can cause. The CLI turns these into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input from the user (model name, prompt, file, flag): reported without a traceback."""
