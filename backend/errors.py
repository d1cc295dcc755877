"""The one error taxonomy: an input error names what is wrong with ONE input and carries a stable `reason`;
every other exception is ours ("internal").

Entry points act on that split alone: the server answers 4xx or gives the one task no prediction, a batch job
returns a failed item instead of raising (retrying cannot fix the input), and metrics count by `reason`. Modules
raise their own subclasses (images.ImageError, ls_config.LabelConfigError, engine InvalidImageError...), so the
reasons stay next to the code that knows them.
"""
from __future__ import annotations

INTERNAL = "internal"


class InputError(Exception):
    """This input (image, task, labeling config, request) cannot be served as it is; retrying will not help."""

    reason: str = "bad_input"

    def __init__(self, message: str = "", reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


def reason_of(exc: BaseException) -> str:
    """The stable tag for metrics, logs and batch summaries: the input error's reason, else "internal"."""
    return exc.reason if isinstance(exc, InputError) else INTERNAL


def describe(exc: BaseException) -> str:
    """One line for a log or a summary: the message (class name for internal errors), never a traceback."""
    text = str(exc).strip()
    message = text.splitlines()[0] if text else ""
    if isinstance(exc, InputError):
        return message or exc.reason
    name = type(exc).__name__
    return f"{name}: {message}" if message else name
