"""Where the server may send a notification (docs/subscriptions.md, "Endpoints").

A subscription makes the server send requests to a URL a client chose: without rules that is a
server-side request forgery tool (the cloud metadata service, the database port, an admin page on
the internal network). So an endpoint must be
- https (http only on the loopback interface, and only when the operator allows it for development),
- under one of the URL prefixes registered for the client (`fhirserver client register
  --subscription-endpoint`), checked when the subscription is written and again before each send,
- resolved, each time it is used, to public addresses only, unless the operator lists a private
  network (`subscription_private_networks`); the request then goes to the very address that was
  checked (no second lookup for DNS rebinding to change), and redirects are not followed.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class EndpointRefused(ValueError):
    """The endpoint breaks one of the rules above (the message says which, naming no address)."""


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str  # path and query
    address: str  # the checked address the request goes to


def _networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


def check_networks(text: str) -> None:
    """SettingsError for a malformed `subscription_private_networks` (checked when services start)."""
    from ..config import SettingsError

    for part in (p.strip() for p in text.split(",")):
        try:
            if part:
                ipaddress.ip_network(part, strict=False)
        except ValueError:
            raise SettingsError(f"setting subscription_private_networks: {part!r} is not a CIDR "
                                "such as 10.20.0.0/16") from None


def allowed_by_client(url: str, prefixes: list[str]) -> bool:
    """`url` is under one of the client's registered prefixes (a whole path segment: a prefix
    `https://a.example/hook` allows `.../hook` and `.../hook/x`, not `.../hooked`)."""
    for prefix in prefixes:
        if url == prefix or (url.startswith(prefix) and (prefix.endswith("/") or url[len(prefix)] in "/?")):
            return True
    return False


def resolve(url: str, prefixes: list[str], allow_http_loopback: bool, private_networks: str) -> Target:
    """The checked target of `url`; raises EndpointRefused."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise EndpointRefused("the endpoint is not a valid URL") from None
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise EndpointRefused("the endpoint must be an https:// URL")
    if parts.username or parts.password or parts.fragment:
        raise EndpointRefused("the endpoint may not carry credentials or a fragment (use channel.header)")
    if not allowed_by_client(url, prefixes):
        raise EndpointRefused("the endpoint is not under a URL registered for this client "
                              "(fhirserver client register ... --subscription-endpoint URL)")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise EndpointRefused("the endpoint's host name does not resolve") from None
    addresses: list[IPAddress] = []
    for info in infos:
        addr = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        addresses.append(addr)
    if parts.scheme == "http":
        if not allow_http_loopback or not all(a.is_loopback for a in addresses):
            raise EndpointRefused("the endpoint must be an https:// URL (http:// only for loopback when the "
                                  "server allows it: subscription_allow_http_loopback)")
    else:
        allowed = _networks(private_networks)
        for addr in addresses:
            if not addr.is_global and not any(addr in net for net in allowed):
                raise EndpointRefused("the endpoint resolves to a private, loopback or reserved address "
                                      "(allowed only for networks in subscription_private_networks)")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, parts.hostname, port, path, str(addresses[0]))


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, target: Target, timeout: float) -> None:
        self._ctx = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=self._ctx)
        self._address = target.address

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._ctx.wrap_socket(raw, server_hostname=self.host)


def post(target: Target, body: bytes, headers: dict[str, str], timeout: float) -> int:
    """POST `body` to the checked address; the HTTP status (redirects are not followed)."""
    conn: http.client.HTTPConnection = (_PinnedHTTPS(target, timeout) if target.scheme == "https"
                                        else _PinnedHTTP(target, timeout))
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(65536)
        return response.status
    finally:
        conn.close()
