"""Fetching one URL for a download job, hardened against hostile URLs and servers.

- **http and https only**; a URL with credentials is refused.
- **SSRF.** The host is resolved first (getaddrinfo), and the request refused when *any* of its addresses is
  loopback, private, link-local, multicast, reserved, unspecified or otherwise not globally routable
  (IPv4-mapped IPv6 is unwrapped; decimal/hex/octal IPv4 spellings resolve to what they mean). The
  connection then goes to the checked address itself (the TLS handshake still verifies the host name), so
  a second DNS answer cannot swap in another address between the check and the connect (DNS rebinding).
  Redirects are followed by hand and every hop is checked the same way. TorchServe's CVE-2023-43654 was
  exactly this: its workflow and model downloads fetched any URL, including the cloud metadata address.
  Only the worker's operator can lift the refusal (`vision worker --allow-private-addresses [CIDR,...]`);
  nothing a submitter sends can. No proxy environment variable is honoured.
- **Limits.** A whole-request deadline per attempt (connect to last byte: a server that trickles bytes is
  cut off, not only one that stalls), a byte limit checked against Content-Length before the body and
  while reading it, a redirect limit (loops end there), bounded retries with backoff for transient
  failures only (timeouts, connection errors, 5xx, 429).
- **Content.** The Content-Type must be an image type (or application/octet-stream) and the first bytes
  must be a JPEG, PNG, GIF, WebP or BMP signature; the caller then decodes the image in full.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

ALL = "all"
REDIRECTS = (301, 302, 303, 307, 308)
USER_AGENT = "vision-serving-download/1"
CHUNK = 64 * 1024
# Magic numbers of the formats the platform decodes (vision.media.imaging.SUPPORTED_FORMATS).
SIGNATURES = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)
ALLOWED_TYPES = ("application/octet-stream", "binary/octet-stream")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FetchError(Exception):
    """Why a URL gave no image; `transient` failures may succeed when tried again."""

    def __init__(self, reason: str, *, transient: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


@dataclass(frozen=True)
class FetchPolicy:
    timeout_s: float = 15.0
    retries: int = 2
    max_bytes: int = 20 * 1024 * 1024
    max_redirects: int = 5
    # Networks the operator allows although they are not globally routable; ALL allows every address.
    allow_private: tuple[Network, ...] | str = ()
    backoff_s: float = 0.5


@dataclass
class Fetched:
    url: str
    data: bytes
    content_type: str
    redirects: int = 0
    attempts: int = 1
    chain: list[str] = field(default_factory=list)


def parse_allow(value: str | None) -> tuple[Network, ...] | str:
    """`--allow-private-addresses` / VISION_DOWNLOAD_ALLOW_PRIVATE_ADDRESSES: "" or "0" = none; "1", "true",
    "all" (or the flag alone) = every address; else comma-separated networks such as 127.0.0.0/8,10.1.0.0/16."""
    text = (value or "").strip().lower()
    if text in ("", "0", "false", "no", "off", "none"):
        return ()
    if text in ("1", "true", "yes", "on", "all"):
        return ALL
    try:
        return tuple(
            ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()
        )
    except ValueError as exc:
        raise ValueError(
            f"allow-private-addresses: {exc} (give 1/all, or networks like 127.0.0.0/8)"
        ) from None


def address_kind(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why an address may not be fetched by default (None: globally routable)."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "non-global"
    return None


def refusal(address: str, allow: tuple[Network, ...] | str) -> str | None:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    kind = address_kind(ip)
    if kind is None or allow == ALL or any(ip in net for net in allow):  # type: ignore[union-attr]
        return None
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{ip}, {article} {kind} address"


def resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        transient = exc.errno in (socket.EAI_AGAIN,)
        raise FetchError(f"cannot resolve host {host!r}: {exc.strerror}", transient=transient) from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise FetchError(f"host {host!r} has no address")
    return addresses


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to an address checked beforehand; Host header from the URL."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand; SNI and certificate checked against the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, port, timeout=timeout, context=context)
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


_TLS: ssl.SSLContext | None = None


def _tls() -> ssl.SSLContext:
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS


def sniff(data: bytes) -> str | None:
    """The image format its first bytes announce, or None."""
    for magic, name in SIGNATURES:
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def fetch(
    url: str,
    policy: FetchPolicy,
    *,
    cancelled: Callable[[], bool] = lambda: False,
    sleep: Callable[[float], None] = time.sleep,
) -> Fetched:
    """The body of `url` (an image by Content-Type and signature), or FetchError with the reason."""
    attempt = 0
    while True:
        attempt += 1
        try:
            got = _fetch_once(url, policy)
            got.attempts = attempt
            return got
        except FetchError as exc:
            if not exc.transient or attempt > policy.retries or cancelled():
                if attempt > 1:
                    exc.reason = f"{exc.reason} (after {attempt} attempts)"
                    exc.args = (exc.reason,)
                raise
        sleep(policy.backoff_s * 2 ** (attempt - 1))


def _fetch_once(url: str, policy: FetchPolicy) -> Fetched:
    deadline = time.monotonic() + policy.timeout_s
    current, chain = url, [url]
    while True:
        parts = _check_url(current)
        host = parts.hostname or ""
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise FetchError(f"bad port in {current!r}") from None
        addresses = resolve(host, port)
        for address in addresses:
            why = refusal(address, policy.allow_private)
            if why:
                raise FetchError(
                    f"refused: {host} resolves to {why}; private, loopback and link-local addresses are not fetched "
                    "(the worker's operator can allow them: vision worker --allow-private-addresses)"
                )
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout(policy)
        if parts.scheme == "https":
            conn: http.client.HTTPConnection = _PinnedHTTPS(host, port, addresses[0], remaining, _tls())
        else:
            conn = _PinnedHTTP(host, port, addresses[0], remaining)
        try:
            target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            try:
                conn.request(
                    "GET",
                    target,
                    headers={
                        "User-Agent": USER_AGENT,
                        "Accept": "image/*",
                        "Accept-Encoding": "identity",
                        "Connection": "close",
                    },
                )
                response = conn.getresponse()
            except (TimeoutError, socket.timeout):
                raise _timeout(policy) from None
            except ssl.SSLCertVerificationError as exc:
                raise FetchError(f"TLS certificate of {host!r} not valid: {exc.verify_message}") from None
            except (OSError, http.client.HTTPException) as exc:
                raise FetchError(f"connection failed: {_describe(exc)}", transient=True) from None
            status = response.status
            if status in REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise FetchError(f"HTTP {status} redirect without a Location")
                if len(chain) - 1 >= policy.max_redirects:
                    raise FetchError(f"too many redirects (more than {policy.max_redirects})")
                current = urljoin(current, location.strip())
                chain.append(current)
                continue
            if status != 200:
                transient = status >= 500 or status in (408, 429)
                raise FetchError(f"HTTP {status} {response.reason}".strip(), transient=transient)
            content_type = (response.getheader("Content-Type") or "").split(";")[0].strip().lower()
            if not (content_type.startswith("image/") or content_type in ALLOWED_TYPES):
                raise FetchError(f"content type {content_type or '(none)'!r} is not an image")
            length = response.getheader("Content-Length")
            if length and length.strip().isdigit() and int(length) > policy.max_bytes:
                raise FetchError(
                    f"too large: Content-Length {int(length)} bytes is over the {policy.max_bytes}-byte limit"
                )
            data = _read(conn, response, deadline, policy)
            if length and length.strip().isdigit() and len(data) != int(length):
                raise FetchError(f"truncated: {len(data)} of {int(length)} bytes arrived", transient=True)
            if not data:
                raise FetchError("empty response body")
            return Fetched(
                url=current, data=data, content_type=content_type, redirects=len(chain) - 1, chain=chain
            )
        finally:
            conn.close()


def _check_url(url: str):  # noqa: ANN202 - SplitResult
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise FetchError(f"malformed URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise FetchError(f"unsupported scheme {parts.scheme or '(none)'!r}: only http and https are fetched")
    if not parts.hostname:
        raise FetchError("URL has no host")
    if parts.username or parts.password:
        raise FetchError("URLs with credentials are not fetched")
    return parts


def _read(
    conn: http.client.HTTPConnection, response: http.client.HTTPResponse, deadline: float, policy: FetchPolicy
) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout(policy)
        if conn.sock is not None:
            conn.sock.settimeout(remaining)
        try:
            chunk = response.read1(CHUNK) if hasattr(response, "read1") else response.read(CHUNK)
        except (TimeoutError, socket.timeout):
            raise _timeout(policy) from None
        except http.client.IncompleteRead as exc:
            raise FetchError(
                f"truncated: the connection closed after {size + len(exc.partial)} bytes", transient=True
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise FetchError(f"connection failed while reading: {_describe(exc)}", transient=True) from None
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > policy.max_bytes:
            raise FetchError(f"too large: over the {policy.max_bytes}-byte limit")
        chunks.append(chunk)


def _timeout(policy: FetchPolicy) -> FetchError:
    return FetchError(f"timeout: no complete response within {policy.timeout_s:g} s", transient=True)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def networks_text(allow: tuple[Network, ...] | str) -> str:
    if allow == ALL:
        return "all"
    return ",".join(str(n) for n in allow) if allow else "none"
