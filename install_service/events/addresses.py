"""Where webhooks may be sent: http(s) URLs whose host is a public address.

Loopback, private, link-local, unique-local, shared (CGNAT), multicast, reserved and
unspecified addresses are refused, in IPv4 and IPv6, in any spelling: legacy IPv4 forms
(`127.1`, `0x7f.0.0.1`, `2130706433`, octal) are read the way the system resolver reads them
(`inet_aton`), IPv6 forms carrying an IPv4 address (mapped, 6to4, NAT64) are judged by that
address, and `localhost` names never leave the machine. Classification is the standard
library's `ipaddress`.

A URL is checked when the endpoint is created, and every delivery checks the addresses its
host resolves to at that moment and connects to the address it checked (so a DNS answer that
changes between the check and the connection cannot redirect it).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

import httpx

from install_service.config import ALLOW_PRIVATE_WEBHOOKS
from install_service.errors import Invalid

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
RESOLVE_TIMEOUT_SECONDS = 3


class AddressRefused(Invalid):
    """A local or private address; the detail says how a local runner or a test allows it."""

    code = "webhook_address_not_allowed"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(
            f"{detail} (to send webhooks to local and private addresses, as local runners "
            f"and tests do, start the service with {ALLOW_PRIVATE_WEBHOOKS}=true)",
            **extra,
        )


def parse_url(url: str) -> httpx.URL:
    """An http(s) URL with a host, or `Invalid`."""
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise Invalid("the URL contains spaces or control characters", code="invalid_webhook_url")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise Invalid(f"not a valid URL: {exc}", code="invalid_webhook_url") from exc
    if parsed.scheme not in ("http", "https"):
        raise Invalid(
            f"webhook URLs must be http or https, not {parsed.scheme or 'relative'!r}",
            code="invalid_webhook_url",
        )
    if not parsed.host:
        raise Invalid("the webhook URL has no host", code="invalid_webhook_url")
    return parsed


def literal_address(host: str) -> IPAddress | None:
    """The address a host names literally, in any spelling the resolver accepts; None for a
    name."""
    candidate = host.strip("[]").replace("%25", "%")
    try:
        return ipaddress.ip_address(candidate)
    except ValueError:
        pass
    try:
        return ipaddress.IPv4Address(socket.inet_aton(candidate))
    except (OSError, UnicodeError):
        return None


def refusal(address: IPAddress) -> str | None:
    """Why delivering to `address` is not allowed, or None when it is a public address."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            reason = refusal(embedded)
            return f"{reason} (inside {address})" if reason else None
        if address.is_site_local:
            return f"{address} is a site-local address"
    checks = (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    )
    for attribute, name in checks:
        if getattr(address, attribute):
            return f"{address} is a {name} address"
    if isinstance(address, ipaddress.IPv4Address) and address in _SHARED:
        return f"{address} is a shared (carrier-grade NAT) address"
    if not address.is_global:
        return f"{address} is not a public address"
    return None


def _is_localhost(host: str) -> bool:
    name = host.rstrip(".").lower()
    return name == "localhost" or name.endswith(".localhost")


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to now (a literal address resolves to itself)."""
    literal = literal_address(host)
    if literal is not None:
        return [literal]
    loop = asyncio.get_running_loop()
    infos = await asyncio.wait_for(
        loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), RESOLVE_TIMEOUT_SECONDS
    )
    found: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        if address not in found:
            found.append(address)
    return found


async def check_new(url: str, *, allow_private: bool) -> httpx.URL:
    """Check a URL given for a new endpoint: http(s), and (unless `allow_private`) not naming
    a local or private address, literally or through what its name resolves to now. A name
    that does not resolve yet is accepted: every delivery checks it again."""
    parsed = parse_url(url)
    if allow_private:
        return parsed
    host = parsed.host
    if _is_localhost(host):
        raise AddressRefused(f"{host!r} is this machine", code="webhook_address_not_allowed")
    try:
        addresses = await resolve(host, parsed.port or (443 if parsed.scheme == "https" else 80))
    except (OSError, TimeoutError, UnicodeError):
        addresses = []
    for address in addresses:
        reason = refusal(address)
        if reason:
            raise AddressRefused(
                f"webhooks may not be sent to {host!r}: {reason}",
                code="webhook_address_not_allowed",
            )
    return parsed


async def pinned_address(url: httpx.URL, *, allow_private: bool) -> IPAddress:
    """The address to connect to for a delivery: the first the host resolves to, after every
    address it resolves to was checked. Raises `AddressRefused` or `OSError`."""
    host = url.host
    if not allow_private and _is_localhost(host):
        raise AddressRefused(f"{host!r} is this machine")
    addresses = await resolve(host, url.port or (443 if url.scheme == "https" else 80))
    if not addresses:
        raise OSError(f"{host!r} did not resolve")
    if not allow_private:
        for address in addresses:
            reason = refusal(address)
            if reason:
                raise AddressRefused(f"{host!r} resolves to {address}: {reason}")
    return addresses[0]
