"""Which webhook URLs we are willing to call.

A webhook makes our servers send requests to an address a client typed, so it is the classic
server-side request forgery hole: ``http://169.254.169.254/`` (a cloud metadata service),
``http://localhost:5432/``, an address of the private network. Every URL must be ``https``,
and every address its host resolves to must be a public one. The check runs when an endpoint
is registered and again before every delivery, and a delivery connects only to the very
addresses that were checked (no second DNS lookup), so a DNS record changed after registration
cannot point an endpoint at the internal network. ``WEBHOOKS_ALLOW_PRIVATE`` (development and
tests) lifts both rules.

A refusal tells the client what it sent, never what we found: a ``private_address`` answer
names the host, not the internal address it resolves to (that would map our network for
whoever registers names); staff find it in the log (``webhooks.url_refused``) and in a
refused delivery's error.
``unresolvable_host`` stays a code of its own: a client still learns whether a name resolves
from here at all, but not where to, and "your DNS record is missing" is the commonest mistake
a client needs told apart from "it points inside".
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import re
import socket
import unicodedata
from dataclasses import dataclass
from urllib.parse import urlsplit

import idna
import structlog
from django.conf import settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

log = structlog.get_logger("webhooks.security")


class UrlRefused(Exception):
    """The URL may not be called; ``code`` is machine-readable, ``detail`` may be shown to the
    client. ``address``, the internal address a host resolved to, is for staff only."""

    def __init__(self, code: str, detail: str, address: str = "") -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.address = address


@dataclass(frozen=True)
class Target:
    """Where a delivery goes: the checked addresses to connect to, each once, in the
    resolver's order (a delivery tries the next when one does not take the connection), and
    the name to present (ASCII: an internationalised name in its IDNA form, see
    :func:`_ascii_host`)."""

    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]


#: IPv6 prefixes that carry an IPv4 address in their last 32 bits and reach it: NAT64's
#: well-known prefix (RFC 6052), the IPv4-translated (SIIT, RFC 2765) and the deprecated
#: IPv4-compatible forms. ``is_global`` judges the IPv6 address, not the IPv4 one it reaches,
#: so ``64:ff9b::a9fe:a9fe`` passed for public while a NAT64 gateway sends it to 169.254.169.254.
_CARRY_IPV4 = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "::ffff:0:0:0/96", "::/96")
)
#: NAT64 prefix for local use (RFC 8215): its IPv4 addresses are wherever the operator maps them.
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")


def _public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        # Site-local fec0::/10 (deprecated by RFC 3879, still routed inside some networks) is
        # not in is_global's list of special ranges on Python 3.11: fec0::1 passed as public.
        if ip in _LOCAL_NAT64 or ip.is_site_local:
            return False
        # ::ffff:a.b.c.d (mapped) and 2002:aabb:ccdd:: (6to4) are judged by their IPv4 address.
        carried = ip.ipv4_mapped or ip.sixtofour
        if carried is None and any(ip in net for net in _CARRY_IPV4):
            carried = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if carried is not None:
            ip = carried
    # is_global is False for loopback, private (RFC 1918, fc00::/7), link-local (the metadata
    # address 169.254.169.254 among them), shared (100.64/10), reserved and unspecified ones,
    # and Teredo's 2001::/32.
    return ip.is_global and not ip.is_multicast


def _ascii_host(hostname: str) -> str:
    """The host as DNS, TLS and the ``Host`` header spell it.

    An internationalised name (``bücher.example``) is resolved, sent as the TLS server name,
    matched against the certificate and named in ``Host`` in its ASCII form
    (``xn--bcher-kva.example``): certificates carry that form, so the name as typed failed
    every delivery's host name check. IDNA 2008 with UTS 46 mapping, as browsers read a URL:
    Python's own codec is IDNA 2003, which turns ``faß.de`` into ``fass.de``, another domain.
    An ASCII name is left as it is: IDNA 2008 refuses some names DNS serves (an underscore),
    and those endpoints have always been called.
    """
    if hostname.isascii():
        return hostname
    try:
        return idna.encode(hostname, uts46=True).decode("ascii")
    except UnicodeError as exc:  # idna.IDNAError among them
        raise UrlRefused(
            "invalid_url", f"{hostname} is not a valid internationalised host name: {exc}."
        ) from None


def _unprintable(url: str) -> int | None:
    """Where the first character a URL must not hold as typed is: a control character (a CR
    or LF would be a header in a request line), a space, or an invisible format character (a
    right-to-left override shows the ops console another URL than the one called)."""
    for at, ch in enumerate(url):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zs", "Zl", "Zp"):
            return at
    return None


#: What the URL is told when it is not one at all ("not a url", "example.com/hook").
NOT_A_URL = "Not a URL: give it as https://host/path."
#: A URL's start: a scheme, then ``://`` (RFC 3986's scheme characters).
_SCHEME_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _past_host(url: str, at: int) -> bool:
    """Whether ``url[at]`` lies past its scheme and host, in the path, query or fragment."""
    start = _SCHEME_START.match(url)
    if start is None:
        return False
    ends = [i for i in (url.find(c, start.end()) for c in "/?#") if i >= 0]
    return bool(ends) and at > min(ends)


#: Seconds a name may take to resolve. The system resolver has no deadline of its own a caller
#: can set (a name server that never answers costs its retries, 10 to 30 s and more), and a
#: registration resolves in a web thread: a client naming hosts under a silent name server
#: held a thread per request for that long.
RESOLVE_TIMEOUT = 3.0
#: Lookups run here, so that the caller can stop waiting; a lookup still hung when its caller
#: gave up ends on the resolver's own time, holding one of these threads, never a web thread.
_RESOLVER = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="webhook-dns")


def _resolve(host: str, port: int) -> list:
    """``socket.getaddrinfo`` with a deadline (:data:`RESOLVE_TIMEOUT`): raises
    ``concurrent.futures.TimeoutError`` past it."""
    lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return lookup.result(timeout=RESOLVE_TIMEOUT)
    finally:
        lookup.cancel()  # still queued behind hung lookups: never run it


def check_new_url(url: str) -> Target:
    """:func:`check_url` for a URL being registered, which must also be written as it is
    sent. Only at registration: an endpoint registered before this rule, with a space in its
    path, is still called (urllib3 percent-encodes the path it sends).

    Percent-encoding is the advice only for a character in the path, query or fragment of
    what is a URL: "not a url" was told to percent-encode its SPACE, as if it were one, while
    "example.com/hook" was told what a URL looks like; a space in a host name is no more
    mended by encoding it."""
    at = _unprintable(url)
    if at is None:
        return check_url(url)
    what = unicodedata.name(url[at], f"U+{ord(url[at]):04X}")
    if _SCHEME_START.match(url) is None:
        raise UrlRefused("invalid_url", NOT_A_URL)
    if not _past_host(url, at):
        raise UrlRefused(
            "invalid_url", f"The URL's host holds {what}: give it as https://host/path."
        )
    raise UrlRefused("invalid_url", f"The URL holds {what}: percent-encode it.")


def check_url(url: str) -> Target:
    """Parse, resolve and vet ``url``; raise :class:`UrlRefused` with the reason."""
    allow_private = settings.WEBHOOKS_ALLOW_PRIVATE
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlRefused("invalid_url", f"Not a valid URL: {exc}.") from None
    if not parts.scheme or not parts.netloc:
        raise UrlRefused("invalid_url", NOT_A_URL)
    schemes = ("https", "http") if allow_private else ("https",)
    if parts.scheme not in schemes:
        raise UrlRefused(
            "https_required",
            "Webhook URLs must use https (or http, while WEBHOOKS_ALLOW_PRIVATE is on)."
            if allow_private
            else "Webhook URLs must use https.",
        )
    if not parts.hostname:
        raise UrlRefused("invalid_url", "The URL has no host.")
    if parts.username or parts.password:
        raise UrlRefused("invalid_url", "Put no user name or password in the URL.")
    if parts.fragment:
        raise UrlRefused("invalid_url", "A webhook URL has no #fragment.")
    if port == 0:
        # urlsplit accepts it, and "or default" would quietly deliver to 443 or 80 instead.
        raise UrlRefused("invalid_url", "Port 0 is not a port a server listens on.")
    port = port if port is not None else (443 if parts.scheme == "https" else 80)
    host = _ascii_host(parts.hostname)
    try:
        infos = _resolve(host, port)
    except concurrent.futures.TimeoutError:
        raise UrlRefused(
            "unresolvable_host",
            f"{parts.hostname} did not resolve within {RESOLVE_TIMEOUT:g} seconds.",
        ) from None
    except (OSError, UnicodeError):
        raise UrlRefused("unresolvable_host", f"{parts.hostname} does not resolve.") from None
    addresses = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])  # an IP text for INET/INET6
        if not allow_private and not _public(ip):
            log.warning(
                "webhooks.url_refused",
                code="private_address",
                host=parts.hostname,
                address=str(ip),
            )
            raise UrlRefused(
                "private_address",
                f"{parts.hostname} is or resolves to an address webhooks are not sent to "
                "(loopback, private, link-local or otherwise internal).",
                address=str(ip),
            )
        if str(ip) not in addresses:  # an address the resolver lists twice is tried once
            addresses.append(str(ip))
    if not addresses:
        raise UrlRefused("unresolvable_host", f"{parts.hostname} does not resolve.")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port, path, tuple(addresses))
