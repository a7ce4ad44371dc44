"""Which host a URL really reaches, decided the way the HTTP client reads it.

Python's ``urllib.parse.urlsplit`` and urllib3's ``parse_url`` (what ``requests`` connects
with) disagree on some URLs: ``http://foreign\\@label-studio/x`` is Label Studio to the
first and ``foreign`` to the second. Every host decision (allow-list, credentials) goes
through ``origin_of``, which prepares the URL as ``requests`` will send it and refuses any
URL on whose host the two parsers disagree. The fetcher then requests exactly the
prepared URL it checked.
"""

from __future__ import annotations

from typing import NamedTuple
from urllib.parse import urlsplit

from requests.exceptions import RequestException
from requests.models import PreparedRequest
from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url

__all__ = ["DEFAULT_PORTS", "HostPort", "Origin", "UnsafeURL", "origin_of", "parse_host_port"]

DEFAULT_PORTS = {"http": 80, "https": 443}


class UnsafeURL(ValueError):
    """A URL that is not http(s), has no host, or that parsers read differently."""


class Origin(NamedTuple):
    scheme: str
    host: str
    port: int  # the scheme's default port filled in
    userinfo: str | None  # ``user:password`` as written, None when absent
    url: str  # the URL as the HTTP client sends it

    @property
    def netloc(self) -> str:
        """``host:port`` (brackets around IPv6), without user information."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


class HostPort(NamedTuple):
    host: str
    port: int | None  # None: the URL scheme's default port

    def matches(self, origin: Origin) -> bool:
        if origin.host != self.host:
            return False
        return origin.port == (self.port or DEFAULT_PORTS[origin.scheme])


def origin_of(url: str) -> Origin:
    """The origin ``requests`` would connect to for ``url``; ``UnsafeURL`` when the URL is
    not a plain http(s) URL or when urlsplit and urllib3 name different hosts or ports."""
    prepared = PreparedRequest()
    try:
        prepared.prepare_url(url, None)
        sent = prepared.url or ""
        client = parse_url(sent)
    except (RequestException, LocationParseError, ValueError, UnicodeError):
        raise UnsafeURL("not a well-formed http(s) URL") from None
    scheme = (client.scheme or "").lower()
    if scheme not in DEFAULT_PORTS or not client.host:
        raise UnsafeURL("not an http(s) URL with a host")
    port = client.port or DEFAULT_PORTS[scheme]
    host = client.host.lower().strip("[]")
    for text in (url, sent):  # what a reader of either string would decide on
        if _split_host_port(text, scheme) != (host, port):
            raise UnsafeURL("the URL names its host ambiguously (parsers disagree)")
    return Origin(scheme, host, port, client.auth, sent)


def _split_host_port(url: str, scheme: str) -> tuple[str, int] | None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    return parts.hostname.lower(), port or DEFAULT_PORTS[scheme]


def parse_host_port(text: str) -> HostPort:
    """``host``, ``host:port`` or ``[v6]:port`` (lower-cased) as a ``HostPort``."""
    parts = urlsplit(f"//{text.strip().lower()}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"malformed port in {text!r}") from None
    if not parts.hostname or parts.username is not None:
        raise ValueError(f"expected host or host:port, got {text!r}")
    return HostPort(parts.hostname, port)
