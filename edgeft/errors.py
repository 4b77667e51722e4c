"""Errors the user can fix. The CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Bad input (missing folder, bad flag value, unusable weights file...)."""


class ParityError(Exception):
    """An exported model does not agree with the Keras model (CLI exit code 1)."""
