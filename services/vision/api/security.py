"""Transport security and authorization of the gRPC services.

Transport and authorization are separate. TLS (and mutual TLS) is the server's port credentials, whose
certificate files are re-read at the next handshake after they change, so cert-manager can rotate them in
place with no restart and no failed request. Authorization is a server interceptor.

Which RPCs need authorization comes from the protos themselves: a method marked
`option idempotency_level = NO_SIDE_EFFECTS;` is read-only and open to any client that passed the transport;
every other method of a hosted service (Jobs submit and cancel, and any method added later without the mark)
needs an identity: a bearer token from `--auth-tokens`, or a client certificate on `--auth-allow`. Health
and reflection stay open.

No or invalid credentials are UNAUTHENTICATED; a known identity without the right (a client certificate not on
the allow-list) is PERMISSION_DENIED. Neither message says which tokens exist. Each refusal is counted by reason
(`vision_auth_refusals_total`); each accepted call that changes state writes one line to the `vision.audit`
logger: who, which RPC, which job.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool

from vision.core import metrics
from vision.core.errors import ConfigurationError

log = logging.getLogger(__name__)
audit_log = logging.getLogger("vision.audit")

# Services of gRPC itself whose methods read only: probes and grpcurl must work without credentials.
OPEN_SERVICES = frozenset({
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
})
# A token shorter than this is a password, not a secret: refused when the tokens are read.
MIN_TOKEN_CHARS = 16
_NO_SIDE_EFFECTS = descriptor_pb2.MethodOptions.IdempotencyLevel.NO_SIDE_EFFECTS


# --------------------------------------------------------------------------------------
# Which methods need authorization
# --------------------------------------------------------------------------------------


def methods_changing_state(service_names: Iterable[str]) -> frozenset[str]:
    """The full method names (`/vision.v1.Jobs/SubmitDownload`) of these services that are not marked
    NO_SIDE_EFFECTS in their protos. The services' generated modules must be imported (they are once their
    servicers are added to the server)."""
    pool = descriptor_pool.Default()
    found = set()
    for name in service_names:
        if name in OPEN_SERVICES:
            continue
        service = pool.FindServiceByName(name)
        for method in service.methods:
            if method.GetOptions().idempotency_level != _NO_SIDE_EFFECTS:
                found.add(f"/{service.full_name}/{method.name}")
    return frozenset(found)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------------------
# Files that may change under a running server
# --------------------------------------------------------------------------------------


def _signature(paths: Iterable[Path]) -> tuple[tuple[str, int, int, int], ...]:
    """What tells a changed file from an unchanged one without reading it. stat() follows symlinks, so a
    Kubernetes Secret volume's `..data` swap changes the inode of every key at once."""
    out = []
    for path in paths:
        st = path.stat()
        out.append((str(path), st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


@dataclass(frozen=True)
class Identity:
    """Who made a call: the token's name or the certificate's common name / SAN, and how it was shown."""

    name: str
    via: str  # "token", "certificate", "open" (--auth-open), "loopback" (nothing configured, loopback bind)


class TokenFile:
    """Bearer tokens from a file (`NAME TOKEN` or `TOKEN` per line; `#` comments) or a folder (one file per
    token, named by its holder: a mounted Secret, several keys during a rotation). Re-read when it changes;
    a change that leaves no valid token is logged and the tokens before it stay in force."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: tuple[tuple[str, int, int, int], ...] = ()
        try:
            self._seen = self._files_signature()
            self._tokens = self._read()
        except (OSError, ValueError) as exc:
            raise ConfigurationError(f"auth tokens {path}: {exc}") from None

    def _files(self) -> list[Path]:
        if self.path.is_dir():
            # Hidden entries are the Secret volume's own (`..data`, `..2026_...`); the keys are symlinks into them.
            return sorted(p for p in self.path.iterdir() if not p.name.startswith(".") and p.is_file())
        return [self.path]

    def _files_signature(self) -> tuple[tuple[str, int, int, int], ...]:
        return _signature(self._files())

    def _read(self) -> dict[bytes, str]:
        """sha256 of each token -> its holder's name."""
        pairs: list[tuple[str, str]] = []
        if self.path.is_dir():
            pairs = [(p.name, p.read_text().strip()) for p in self._files()]
        else:
            for number, line in enumerate(self.path.read_text().splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                if len(parts) > 2:
                    raise ValueError(f"line {number}: expected 'NAME TOKEN' or 'TOKEN'")
                token = parts[-1]
                name = parts[0] if len(parts) == 2 else "token-" + hashlib.sha256(token.encode()).hexdigest()[:8]
                pairs.append((name, token))
        tokens: dict[bytes, str] = {}
        for name, token in pairs:
            if len(token) < MIN_TOKEN_CHARS:
                raise ValueError(f"the token of {name!r} is shorter than {MIN_TOKEN_CHARS} characters")
            tokens[hashlib.sha256(token.encode()).digest()] = name
        if not tokens:
            raise ValueError("no tokens in it")
        return tokens

    def _refresh(self) -> None:
        try:
            seen = self._files_signature()
        except OSError as exc:
            log.error("auth tokens %s: cannot read them (%s); the tokens read before stay in force", self.path, exc)
            return
        if seen == self._seen:
            return
        with self._lock:
            try:
                tokens = self._read()
            except (OSError, ValueError) as exc:
                log.error("auth tokens %s: %s; the tokens read before stay in force", self.path, exc)
                return
            self._tokens, self._seen = tokens, seen
        log.info("auth tokens %s re-read: %d token(s)", self.path, len(tokens))

    def holder(self, token: str) -> str | None:
        """The name of who holds `token`, or None. Every stored token is compared, in constant time, so the
        time taken says nothing about which tokens exist."""
        self._refresh()
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for known, name in self._tokens.items():
            if hmac.compare_digest(known, digest):
                found = name
        return found


class ServerCertificates:
    """The server's TLS credentials from PEM files, re-read at the first handshake after they change.

    A change is taken only once the certificate and key load together (and the client CA parses): a rotation
    that writes the two files one after the other would otherwise fail handshakes in between, so until both
    fit, the old pair keeps serving."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self._paths = [cert, key] + ([client_ca] if client_ca else [])
        self._cert, self._key, self._client_ca = cert, key, client_ca
        try:
            self._seen = _signature(self._paths)
            self._config = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ConfigurationError(f"TLS certificate {cert} / key {key}: {exc}") from None
        self.reloads = 0

    def _load(self) -> Any:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self._cert, self._key)  # raises unless the key belongs to the certificate
        ca = None
        if self._client_ca is not None:
            ca = self._client_ca.read_bytes()
            context.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
        return grpc.ssl_server_certificate_configuration(
            [(self._key.read_bytes(), self._cert.read_bytes())], root_certificates=ca
        )

    def _fetch(self) -> Any:
        """grpc calls this before each handshake: None keeps the configuration it has."""
        try:
            seen = _signature(self._paths)
            if seen == self._seen:
                return None
            config = self._load()
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.warning("TLS files changed but do not load yet (%s); the certificate before stays in use", exc)
            return None
        self._seen = seen
        self.reloads += 1
        log.info("TLS certificate %s re-read (reload %d)", self._cert, self.reloads)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config, self._fetch, require_client_authentication=self._client_ca is not None
        )


# --------------------------------------------------------------------------------------
# Authorization
# --------------------------------------------------------------------------------------


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message


class Authorizer:
    """Decides who may call the RPCs that change state. `open_to` is the identity given to every caller when
    nothing is configured and the server is on loopback, or with --auth-open."""

    def __init__(self, tokens: TokenFile | None, allowed: Iterable[str], open_to: Identity | None = None) -> None:
        self.tokens, self.allowed, self.open_to = tokens, frozenset(allowed), open_to

    def identify(self, metadata: Iterable[tuple[str, Any]], auth_context: dict[str, list[bytes]]) -> Identity:
        if self.open_to is not None:
            return self.open_to
        presented = [v for k, v in metadata if k == "authorization"]
        names = [n.decode(errors="replace") for n in auth_context.get("x509_subject_alternative_name", [])]
        names += [n.decode(errors="replace") for n in auth_context.get("x509_common_name", [])]
        if names and self.allowed:
            allowed = [n for n in names if n in self.allowed]
            if allowed:
                return Identity(allowed[0], "certificate")
        if presented:
            if self.tokens is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid_token", "bearer tokens are not accepted here")
            value = presented[0] if isinstance(presented[0], str) else presented[0].decode(errors="replace")
            scheme, _, token = value.partition(" ")
            holder = self.tokens.holder(token.strip()) if len(presented) == 1 and scheme.lower() == "bearer" else None
            if holder is None:
                raise Refused(grpc.StatusCode.UNAUTHENTICATED, "invalid_token", "the bearer token is not valid")
            return Identity(holder, "token")
        if names:
            raise Refused(
                grpc.StatusCode.PERMISSION_DENIED, "not_allowed",
                f"the client certificate {names[0]!r} may not call this RPC: it changes state and needs an identity "
                "on the server's allow-list, or a bearer token",
            )
        raise Refused(
            grpc.StatusCode.UNAUTHENTICATED, "no_credentials",
            "this RPC changes state and needs credentials: a bearer token (metadata 'authorization: Bearer ...') "
            "or a client certificate on the server's allow-list",
        )


def _audit_target(request: Any, response: Any) -> str:
    """Which job or collection a call acted on: a submitted job's id is in the response (`job.id`), a
    cancelled one's in the request (`id`); a collection's name is `collection`."""
    for message in (response, request):
        if message is None:
            continue
        job = getattr(message, "job", None)
        for label, value in (("job", getattr(job, "id", None)), ("job", getattr(message, "id", None)),
                             ("collection", getattr(message, "collection", None))):
            if isinstance(value, str) and value:
                return f"{label}={value}"
    return "-"


class AuthorizationInterceptor(grpc.aio.ServerInterceptor):
    """Runs the `Authorizer` in front of the methods in `guarded`; every other method passes untouched."""

    def __init__(self, authorizer: Authorizer, guarded: frozenset[str]) -> None:
        self._authorizer, self._guarded = authorizer, guarded

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method not in self._guarded:
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guard_unary(method, handler.unary_unary),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guard_stream(method, handler.unary_stream),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer,
            )
        # Client-streaming methods would need the identity before the first message; none change state yet.
        raise ConfigurationError(f"{method}: authorization of client-streaming methods is not implemented")

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> Identity:
        try:
            return self._authorizer.identify(context.invocation_metadata() or (), context.auth_context())
        except Refused as refusal:
            service, _, name = method.strip("/").rpartition("/")
            metrics.AUTH_REFUSALS.labels(service=service, method=name, reason=refusal.reason).inc()
            metrics.REQUESTS.labels(service=service, method=name, code=refusal.code.name).inc()
            log.info("refused %s from %s: %s", method, context.peer(), refusal.reason)
            await context.abort(refusal.code, refusal.message)
            raise  # abort() raises; this keeps type checkers certain

    def _audit(self, identity: Identity, method: str, context: grpc.aio.ServicerContext, request: Any,
               response: Any, outcome: str) -> None:
        audit_log.info(
            "identity=%s via=%s rpc=%s %s peer=%s outcome=%s",
            identity.name, identity.via, method, _audit_target(request, response), context.peer(), outcome,
        )

    def _guard_unary(self, method: str, inner: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            identity = await self._admit(method, context)
            response = None
            try:
                response = await inner(request, context)
                return response
            finally:
                code = context.code() if hasattr(context, "code") else None
                outcome = (code.name if isinstance(code, grpc.StatusCode) else None) or ("OK" if response is not None else "ERROR")
                self._audit(identity, method, context, request, response, outcome)

        return guarded

    def _guard_stream(self, method: str, inner: Callable[..., Any]) -> Callable[..., Any]:
        async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
            identity = await self._admit(method, context)
            self._audit(identity, method, context, request, None, "STREAM")
            async for item in inner(request, context):
                yield item

        return guarded


def authorization_for(
    *, host: str, tokens: Path | None, allowed: list[str], open_all: bool, guarded: frozenset[str]
) -> AuthorizationInterceptor | None:
    """The interceptor for these settings, or None when no hosted method changes state. Raises
    ConfigurationError for a server off loopback that would let anyone change state without being told to."""
    if not guarded:
        return None
    if open_all:
        log.warning("--auth-open: any client may call %s", ", ".join(sorted(guarded)))
        return AuthorizationInterceptor(Authorizer(None, (), Identity("anyone", "open")), guarded)
    if tokens is None and not allowed:
        if not is_loopback(host):
            raise ConfigurationError(
                f"{', '.join(sorted(guarded))} change state, and a server on {host} would let any client call them: "
                "give --auth-tokens FILE and/or --auth-allow NAMES (with --tls-client-ca), or --auth-open when a mesh "
                "in front authorizes"
            )
        return AuthorizationInterceptor(Authorizer(None, (), Identity("local", "loopback")), guarded)
    return AuthorizationInterceptor(Authorizer(TokenFile(tokens) if tokens else None, allowed), guarded)
