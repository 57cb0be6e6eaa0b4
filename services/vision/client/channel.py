"""The one way clients open a channel to a vision server, so every client accepts the same message sizes.

gRPC's default of 4 MiB received does not fit this API: a DELF answer carries up to 1000 keypoints and
descriptors per image, and a Tag answer at threshold 0 every label's score, so answers of a few images pass
4 MiB. A client accepts what a server may send (vision.core.wire). What it sends is the server's to judge: a
server started with a larger `--max-request-bytes`, or Ray's proxy, accepts more than the default, so the
client sets no cap of its own and an oversized request gets the server's RESOURCE_EXHAUSTED.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, overload

from vision.core.wire import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    import grpc
    import grpc.aio

DEFAULT_TARGET = "127.0.0.1:50051"

MAX_RECEIVE_BYTES = MAX_MESSAGE_BYTES
UNLIMITED = -1

OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", UNLIMITED),
)


@overload
def open_channel(target: str, *, aio: Literal[False] = False) -> grpc.Channel: ...
@overload
def open_channel(target: str, *, aio: Literal[True]) -> grpc.aio.Channel: ...
def open_channel(target: str, *, aio: bool = False) -> grpc.Channel | grpc.aio.Channel:
    """An insecure channel to `target` (host:port) with the API's message limits; `aio` for asyncio code.
    Both kinds are context managers (`with` / `async with`) that close the channel."""
    import grpc  # here, not above: `vision --help` and the offline commands import this module too

    if aio:
        return grpc.aio.insecure_channel(target, options=OPTIONS)
    return grpc.insecure_channel(target, options=OPTIONS)
