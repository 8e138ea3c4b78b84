"""Every request that carries a Label Studio credential stays on Label Studio's origin, redirects included.

Credentials ride in headers (a legacy token, an access token) and in bodies (the personal access
token POSTed to ``/api/token/refresh/``; basic auth and the webhook secret PATCHed into a
project's webhook). On a redirect to another host, requests and httpx drop the Authorization
header, but a 307 or 308 sends the body again, and that body can be the credential. So no
library default is relied on: each hop is checked before anything is sent, with the parser the
connection then uses, and is sent only to Label Studio's own scheme, host and port (an https
Label Studio redirecting to http is refused too). Any other hop fails that call with
:class:`RedirectRefused`, which names where Label Studio sent it.

Both HTTP clients are built here: :func:`same_origin_session` (requests: token refresh, key
check) and :func:`same_origin_httpx_client` (httpx, under label-studio-sdk: everything else).
"""

from __future__ import annotations

from urllib.parse import urlsplit

import httpx
import requests
from requests.adapters import HTTPAdapter

MAX_REDIRECTS = 5
_DEFAULT_PORTS = {"http": 80, "https": 443}
Origin = tuple[str, str, int]


class RedirectRefused(RuntimeError):
    """A request to Label Studio was redirected off its origin; nothing was sent there. The message holds no
    secret: the target is shown without credentials or query string."""


def origin(url: str) -> Origin | None:
    """(scheme, host, port) of ``url`` as requests connects to it (``urllib.parse``), or None for anything but a
    plain http(s) URL: credentials before the host, a backslash or control character, an unreadable port."""
    if "\\" in url or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or "@" in parts.netloc or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or _DEFAULT_PORTS[scheme]


class SameOrigin:
    """The rule for one Label Studio: a URL off ``base_url``'s origin raises :class:`RedirectRefused`."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.origin = origin(self.base_url)

    def check(self, url: str) -> None:
        if self.origin is None:
            raise RedirectRefused(f"Label Studio's address {redact(self.base_url)} is not a plain http(s) URL; set "
                                  "LABEL_STUDIO_URL to one like http://localhost:8080")  # fmt: skip
        if origin(url) != self.origin:
            raise RedirectRefused(
                f"Label Studio at {self.base_url} redirects to {redact(url)}; set LABEL_STUDIO_URL to "
                f"{self._suggested_base(url)} if that is your Label Studio"
            )

    def check_httpx_request(self, request: httpx.Request) -> None:
        """httpx's "request" event hook: called for the first request and again for every redirect it follows."""
        self.check(str(request.url))

    def _suggested_base(self, url: str) -> str:
        """Where LABEL_STUDIO_URL would point if ``url`` is the real Label Studio: its origin, plus the base's path
        when the redirect kept it (Label Studio served under a path prefix)."""
        shown = urlsplit(redact(url))
        prefix = urlsplit(self.base_url).path.rstrip("/")
        kept = prefix and (shown.path == prefix or shown.path.startswith(prefix + "/"))
        return f"{shown.scheme}://{shown.netloc}{prefix if kept else ''}"


def redact(url: str, keep_query: bool = False) -> str:
    """The URL as a message may show it: no credentials or fragment, and no query string (it may hold signatures)
    unless ``keep_query``: Label Studio's own URLs carry only file names there."""
    if url.startswith("data:"):
        return url[: url.find(",")] + ",…" if "," in url else "data:…"
    try:
        parts = urlsplit(url)
        host, port = parts.hostname or "", f":{parts.port}" if parts.port else ""
    except ValueError:  # an unreadable port or host: show no authority at all
        return "(an unreadable URL)"
    host = f"[{host}]" if ":" in host else host  # an IPv6 address keeps its brackets, so the URL reads back
    query = (f"?{parts.query}" if keep_query else "?…") if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


class _SameOriginAdapter(HTTPAdapter):
    """requests calls ``send`` for the first request and for every redirect it follows: each is checked first."""

    def __init__(self, guard: SameOrigin) -> None:
        self._guard = guard
        super().__init__(max_retries=0)

    def send(self, request, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        self._guard.check(request.url or "")
        return super().send(request, *args, **kwargs)


def same_origin_session(base_url: str) -> requests.Session:
    """A requests session that follows redirects only on ``base_url``'s origin (see the module's docstring)."""
    session = requests.Session()
    session.max_redirects = MAX_REDIRECTS
    adapter = _SameOriginAdapter(SameOrigin(base_url))
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def same_origin_httpx_client(base_url: str, timeout: float) -> httpx.Client:
    """An httpx client (for label-studio-sdk) that follows redirects only on ``base_url``'s origin. A hook, not a
    transport, so that a proxy from the environment, which httpx mounts as a transport of its own, is covered."""
    guard = SameOrigin(base_url)
    return httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=MAX_REDIRECTS,
                        event_hooks={"request": [guard.check_httpx_request]})  # fmt: skip
