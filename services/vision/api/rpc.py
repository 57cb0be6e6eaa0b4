"""The one place where RPC outcomes become gRPC statuses and request metrics.

Every servicer method is wrapped with `@rpc_method(service, method)`: domain errors map to their status
with the caller-facing message; anything unexpected is logged with its traceback and returned as INTERNAL
without leaking internals; deadlines and cancellations are counted as such.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from vision.backends.base import request_deadline
from vision.core import metrics
from vision.core.errors import VisionError

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


_DEADLINE_SLACK_S = 0.25
_INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_of(error: VisionError) -> grpc.StatusCode:
    return grpc.StatusCode[error.status]


def rpc_method(service: str, method: str) -> Callable[[Handler], Handler]:
    def decorate(fn: Handler) -> Handler:
        in_flight = metrics.IN_FLIGHT.labels(service=service, method=method)
        latency = metrics.REQUEST_LATENCY.labels(service=service, method=method)

        @functools.wraps(fn)
        async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            code = grpc.StatusCode.OK
            message = ""
            started = time.perf_counter()
            in_flight.inc()
            remaining = context.time_remaining()
            request_deadline.set(time.monotonic() + remaining if remaining is not None else None)
            try:
                return await fn(self, request, context)
            except VisionError as exc:
                code, message = status_of(exc), str(exc)
                if code == grpc.StatusCode.INTERNAL:
                    # Our fault, not the caller's: details go to the log, never into the response.
                    log.error("%s/%s failed: %s", service, method, exc, exc_info=exc)
                    message = _INTERNAL_MESSAGE
            except asyncio.CancelledError:
                remaining = context.time_remaining()
                # The client gives up at its own deadline and cancels; the server's copy of the deadline was
                # computed on arrival, so it trails by the transit time. Within that slack it is an expiry.
                expired = remaining is not None and remaining <= _DEADLINE_SLACK_S
                code = grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
                raise
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except Exception:
                log.exception("%s/%s failed", service, method)
                code, message = grpc.StatusCode.INTERNAL, _INTERNAL_MESSAGE
            finally:
                in_flight.dec()
                latency.observe(time.perf_counter() - started)
                metrics.REQUESTS.labels(service=service, method=method, code=code.name).inc()
            # Only now: abort() sends the status at once, and a client that reads /metrics right after its
            # error must find it counted.
            await context.abort(code, message)

        return handler

    return decorate
