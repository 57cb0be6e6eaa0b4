"""Errors of the `vision.triton` package (runtime set-up, the server process, its admin API)."""

from __future__ import annotations


class TritonError(RuntimeError):
    """Base class of this package's errors."""


class TritonRuntimeMissing(TritonError):
    """The Triton venv is absent or incomplete; the message says the command that sets it up."""


class TritonSetupError(TritonError):
    """Setting the runtime up failed (pip, missing libpython, ...)."""


class TritonStartError(TritonError):
    """tritonserver exited or did not become ready; the message carries Triton's reasons and log tail."""


class TritonAdminError(TritonError):
    """An admin call (repository, readiness, config, statistics) failed; `status` is Triton's HTTP status
    as a string ("400", "404"), or "" when the server could not be reached; `detail` is Triton's own
    message (or the connection error)."""

    def __init__(self, message: str, status: str = "", detail: str = "") -> None:
        self.status = status
        self.detail = detail or message
        super().__init__(message)


class TritonModelLoadError(TritonAdminError):
    """Triton refused to load a model; `reason` is Triton's own message."""

    def __init__(self, model: str, reason: str, status: str = "") -> None:
        self.model = model
        self.reason = reason
        super().__init__(f"Triton could not load model {model!r}: {reason}", status, reason)
