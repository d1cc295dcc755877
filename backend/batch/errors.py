"""Failures that belong to one input (image, task) rather than to the machine doing the work."""
from __future__ import annotations


class BadInput(Exception):
    """This image or task cannot be pre-labelled as it is (corrupt, not an image, too large, 404, invalid result).

    Retrying cannot help, so an RQ worker fails such a job at once instead of spending its retries; every other
    exception (LS or Redis unreachable, a killed worker) is retried.
    """


def input_error_types() -> tuple[type[BaseException], ...]:
    """Exception types that mean "this input is bad" in the modules the batch code calls."""
    from backend.engine import InvalidImageError
    from backend.images import ImageError
    from backend.ls_config import LabelConfigError
    from backend.ls_results import InvalidPredictionError
    from backend.predict import TaskError

    # An invalid prediction is deterministic for its image too: a retry would build the same one.
    return (BadInput, ImageError, InvalidImageError, LabelConfigError, InvalidPredictionError, TaskError)


def describe(exc: BaseException) -> str:
    """A one-line reason for the summary: the exception's class and message, never a traceback."""
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {message}" if message else name
