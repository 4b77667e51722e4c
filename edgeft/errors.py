"""Errors the user can fix. The CLI prints their message on one line and exits with code 2 (bad
input) or 1 (a failed operation or check: ParityError, OperationError)."""


class UserError(Exception):
    """Bad input (missing folder, bad flag value, unusable weights file...)."""


class ParityError(Exception):
    """An exported model does not agree with the Keras model (CLI exit code 1)."""


class OperationError(Exception):
    """A command could not finish its work (training diverged to NaN, a model file fails its
    checksum): CLI exit code 1, one line saying what failed and what to do."""
