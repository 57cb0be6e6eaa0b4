"""The one way clients open a channel to a vision server: the same message sizes, TLS and credentials for all.

gRPC's default of 4 MiB received does not fit this API: a DELF answer carries up to 1000 keypoints and
descriptors per image, and a Tag answer at threshold 0 every label's score, so answers of a few images pass
4 MiB. A client accepts what a server may send (vision.core.wire). What it sends is the server's to judge: a
server started with a larger `--max-request-bytes`, or Ray's proxy, accepts more than the default, so the
client sets no cap of its own and an oversized request gets the server's RESOURCE_EXHAUSTED.

A target is an address (`host:port`) or an `Endpoint`: the address plus what the server asks for, TLS (the CA
to trust, a client certificate for mutual TLS, a name override) and a bearer token for the RPCs that change
state. A token travels as gRPC call credentials, which gRPC sends only over TLS or to a loopback address.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

from vision.core.errors import ConfigurationError
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


@dataclass(frozen=True)
class Endpoint:
    """A server address and how to reach it. Prints as its address (error messages name the server)."""

    address: str
    tls_ca: bytes | None = field(default=None, repr=False)  # PEM; with TLS but no CA, the system's roots
    tls_cert: bytes | None = field(default=None, repr=False)
    tls_key: bytes | None = field(default=None, repr=False)
    tls: bool = False
    server_name: str | None = None
    token: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.address


# What client functions take: an address, or an Endpoint with TLS and a token.
Target = str | Endpoint


def _is_loopback_address(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _options(endpoint: Endpoint) -> list[tuple[str, int | str]]:
    options: list[tuple[str, int | str]] = list(OPTIONS)
    if endpoint.server_name:
        # The name the server's certificate is checked against, when the address is not that name
        # (an IP, a port-forward to a Service).
        options.append(("grpc.ssl_target_name_override", endpoint.server_name))
    return options


def _credentials(endpoint: Endpoint):  # noqa: ANN202 - grpc.ChannelCredentials | None
    import grpc

    if endpoint.tls:
        creds = grpc.ssl_channel_credentials(endpoint.tls_ca, endpoint.tls_key, endpoint.tls_cert)
    elif endpoint.token:
        if not _is_loopback_address(endpoint.address):
            raise ConfigurationError(
                f"a bearer token to {endpoint.address} would cross the network in plaintext: use TLS (--tls-ca)"
            )
        # Plaintext, but gRPC sends call credentials over it because the peer is on this host.
        creds = grpc.local_channel_credentials(grpc.LocalConnectionType.LOCAL_TCP)
    else:
        return None
    if endpoint.token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(endpoint.token))
    return creds


@overload
def open_channel(target: str | Endpoint, *, aio: Literal[False] = False) -> grpc.Channel: ...
@overload
def open_channel(target: str | Endpoint, *, aio: Literal[True]) -> grpc.aio.Channel: ...
def open_channel(target: str | Endpoint, *, aio: bool = False) -> grpc.Channel | grpc.aio.Channel:
    """A channel to `target` with the API's message limits, TLS and token; `aio` for asyncio code. Both
    kinds are context managers (`with` / `async with`) that close the channel."""
    import grpc  # here, not above: `vision --help` and the offline commands import this module too

    endpoint = target if isinstance(target, Endpoint) else Endpoint(target)
    credentials = _credentials(endpoint)
    options = _options(endpoint)
    if credentials is None:
        return (grpc.aio.insecure_channel if aio else grpc.insecure_channel)(endpoint.address, options=options)
    return (grpc.aio.secure_channel if aio else grpc.secure_channel)(endpoint.address, credentials, options=options)


# --------------------------------------------------------------------------------------
# Command-line flags shared by every client command
# --------------------------------------------------------------------------------------


def add_connection_flags(parser: argparse.ArgumentParser, *, what: str = "server") -> None:
    """--target and the TLS and token flags; each also reads a VISION_* environment variable."""
    env = os.environ.get
    parser.add_argument(
        "--target", default=env("VISION_TARGET", DEFAULT_TARGET), help=f"{what} address (default {DEFAULT_TARGET}) [env VISION_TARGET]"
    )
    group = parser.add_argument_group("transport security (README: Securing the platform)")
    group.add_argument("--tls", action="store_true", default=bool(env("VISION_TLS")),
                       help="speak TLS, trusting the system's CAs (implied by --tls-ca) [env VISION_TLS=1]")
    group.add_argument("--tls-ca", type=Path, default=env("VISION_TLS_CA"), metavar="PEM",
                       help="trust this CA bundle for the server's certificate [env VISION_TLS_CA]")
    group.add_argument("--tls-cert", type=Path, default=env("VISION_TLS_CERT"), metavar="PEM",
                       help="client certificate, for servers that ask for one (mutual TLS) [env VISION_TLS_CERT]")
    group.add_argument("--tls-key", type=Path, default=env("VISION_TLS_KEY"), metavar="PEM",
                       help="private key of --tls-cert [env VISION_TLS_KEY]")
    group.add_argument("--tls-server-name", default=env("VISION_TLS_SERVER_NAME"), metavar="NAME",
                       help="check the server's certificate against NAME instead of the target's host [env VISION_TLS_SERVER_NAME]")
    group.add_argument("--token-file", type=Path, default=env("VISION_TOKEN_FILE"), metavar="FILE",
                       help="bearer token for the RPCs that change state (Jobs submit, cancel): the file's first "
                       "token ('TOKEN' or 'NAME TOKEN' per line) [env VISION_TOKEN_FILE, or the token itself in VISION_TOKEN]")


def endpoint_from_args(args: argparse.Namespace) -> Endpoint:
    """The Endpoint the connection flags describe; ConfigurationError naming a file that cannot be read."""

    def read(path: Path | str | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise ConfigurationError(f"cannot read {what} {path}: {exc.strerror or exc}") from None

    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigurationError("--tls-cert and --tls-key go together")
    token = os.environ.get("VISION_TOKEN") or None
    if args.token_file is not None:
        text = (read(args.token_file, "token file") or b"").decode()
        tokens = [line.split()[-1] for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not tokens:
            raise ConfigurationError(f"no token in {args.token_file}")
        token = tokens[0]
    ca, cert, key = read(args.tls_ca, "CA"), read(args.tls_cert, "certificate"), read(args.tls_key, "key")
    tls = bool(args.tls or ca or cert)
    return Endpoint(str(args.target), ca, cert, key, tls, args.tls_server_name or None, token)


def resolve_target(args: argparse.Namespace, prog: str) -> bool:
    """Replaces `args.target` (an address) by its Endpoint when the parser has the connection flags; False
    (after printing `PROG: reason`) when a file they name cannot be used."""
    if not hasattr(args, "tls_ca"):
        return True
    try:
        args.target = endpoint_from_args(args)
    except ConfigurationError as exc:
        import sys

        print(f"{prog}: {exc}", file=sys.stderr)
        return False
    return True
