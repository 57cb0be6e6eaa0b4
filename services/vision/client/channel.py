"""The one way clients open a channel to a vision server, so every client accepts the same message sizes.

gRPC's defaults (4 MiB received, unlimited sent) do not fit this API: a DELF answer carries up to 1000
keypoints and descriptors per image, and a Tag answer at threshold 0 every label's score, so answers of a few
images pass 4 MiB. A client accepts what the server may send and sends what a default server accepts; a larger
request then fails on the client with RESOURCE_EXHAUSTED, as the server would refuse it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, overload

if TYPE_CHECKING:
    import grpc
    import grpc.aio

DEFAULT_TARGET = "127.0.0.1:50051"

# The server's limits (vision.runners.server `_grpc_options`): the send cap it sets, and the default of
# ServeSettings.max_request_bytes. Literal here because a client must not import the server's settings (that
# costs every command pydantic's import); tests/test_client_channel.py holds them equal to the server's.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
MAX_SEND_BYTES = 64 * 1024 * 1024

OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
    ("grpc.max_send_message_length", MAX_SEND_BYTES),
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
