"""Keeping a local Ray instance off the network.

Ray 2.60 cannot be bound to loopback: GCS, raylet, every worker's core gRPC server and Serve's gRPC proxy
(`[::]:port`, no host option) listen on all interfaces whatever the node IP. So `--ray-network netns` puts
Ray in a network namespace of its own whose only interface is `lo`: this process opens its public
listeners (gRPC and metrics, on `--host`) first, then moves itself into a fresh namespace, so everything it
starts afterwards (Ray's processes, their sockets) lives there, while the listeners it already holds stay
in the original namespace. `Forwarder` relays the public gRPC port to Serve's proxy inside.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import socket
import struct

from vision.core.errors import ConfigurationError

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_CHUNK = 1 << 18


def listen(host: str, port: int, backlog: int = 512) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), created in the current namespace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise OSError(exc.errno, f"cannot bind {where}: {exc.strerror} (is another server using it? port 0 picks a free one)") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def enter_private_netns() -> None:
    """Move the calling thread (call it from the main thread, before starting others) into a new network
    namespace with only `lo`, and bring `lo` up. Processes started afterwards inherit it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        reason = "it needs root (CAP_SYS_ADMIN)" if code in (errno.EPERM, errno.EACCES) else os.strerror(code)
        raise ConfigurationError(
            f"cannot create a private network namespace for Ray: {reason}. Run as root, or pass "
            "--ray-network host and firewall the machine (Ray then listens on all interfaces)"
        )
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(s, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))
    log.info("Ray runs in a private network namespace (loopback only)")


def interfaces() -> list[str]:
    """Network interfaces of the current namespace."""
    return sorted(name for _, name in socket.if_nameindex())


class Forwarder:
    """Relays TCP connections from a listening socket to host:port (gRPC's HTTP/2 passes through untouched)."""

    def __init__(self, listener: socket.socket, host: str, port: int) -> None:
        self._listener = listener
        self._target = (host, port)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, sock=self._listener, limit=_CHUNK)

    def stop_accepting(self) -> None:
        """New connections are refused from now on; open ones keep relaying (graceful shutdown)."""
        if self._server is not None:
            self._server.close()

    async def close(self) -> None:
        self.stop_accepting()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target, limit=_CHUNK)
        except OSError as exc:
            log.warning("cannot reach Serve's gRPC proxy at %s:%d: %s", *self._target, exc)
            client_writer.close()
            return
        writers = (client_writer, upstream_writer)
        self._writers.update(writers)
        try:
            await asyncio.gather(_pipe(client_reader, upstream_writer), _pipe(upstream_reader, client_writer))
        finally:
            for writer in writers:
                self._writers.discard(writer)
                writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.close()
