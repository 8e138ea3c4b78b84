"""Task data → PIL image, the way Label Studio's editor shows it.

Fetches only from Label Studio's own host (with its auth), ``data:`` URLs, and
hosts listed in ``ALLOWED_MEDIA_HOSTS`` — checked again on every redirect, so a
task author cannot make the backend fetch an internal address. A URL is read once,
by the parser that connects (:func:`parse_target`), and one that two parsers could
read differently is refused, so the host that is checked is the host that is reached;
a listed host's name is resolved once, checked, and that address is the one connected
to. Bytes, pixels and the whole download's time are bounded, EXIF orientation is
applied as browsers do, and repeated fetches come from a byte-bounded cache.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from urllib3.exceptions import HTTPError, LocationParseError, ReadTimeoutError
from urllib3.util import parse_url

from backend import deadline
from backend.labelstudio.auth import LabelStudioAuth, LabelStudioAuthError
from backend.labelstudio.redirects import redact

MAX_REDIRECTS = 3
_CLOUD_SCHEMES = {"s3", "gs", "azure-blob", "azure-spi"}


class MediaError(ValueError):
    """A task's image could not be loaded; the message says why and never contains a secret."""


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int
    max_pixels: int
    timeout: float  # for one whole download, redirects included
    allowed_hosts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Target:
    """An http(s) URL as the connection will read it: ``url`` is what is sent, the rest is where it goes."""

    url: str
    scheme: str
    host: str  # lower case; an IPv6 address without brackets
    port: int

    @property
    def origin(self) -> tuple[str, str, int]:
        return self.scheme, self.host, self.port


def parse_target(url: str) -> Target:
    """Read ``url`` once, with the parser that connects (requests over urllib3), or raise :class:`MediaError`.

    Refused: what two URL parsers could read as different hosts (a backslash, credentials
    before an ``@``, control characters), schemes other than http(s), and ports
    outside 1-65535. What is left reads the same to every parser, so a check of the host
    and the connection agree.
    """
    shown = redact(url)
    if "\\" in url or any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise MediaError(f"refusing the image URL {shown}: it has a backslash or a control character")
    try:
        sent = requests.Request("GET", url).prepare().url or ""
        parsed = parse_url(sent)
        split = urlsplit(sent)
        split_port = split.port
    except (requests.RequestException, LocationParseError, ValueError):
        raise MediaError(f"refusing the image URL {shown}: its host or port cannot be read") from None
    scheme = (parsed.scheme or "").lower()
    if scheme not in {"http", "https"}:
        raise MediaError(f"unsupported image URL {shown}: use http(s), a Label Studio path or a data: URL")
    if parsed.auth is not None or "@" in split.netloc:
        raise MediaError(f"refusing the image URL {shown}: it carries credentials before the host")
    host = (parsed.host or "").lower().strip("[]")
    port = parsed.port or (443 if scheme == "https" else 80)
    if not host or host != (split.hostname or "") or (split_port or port) != port or not 0 < port < 65536:
        raise MediaError(f"refusing the image URL {shown}: its host or port is ambiguous")
    return Target(sent, scheme, host, port)


class _PinnedAddress(HTTPAdapter):
    """Connects to an address checked in advance instead of resolving the URL's host again.

    The URL (and so the Host header, TLS server name and certificate check) keeps the name;
    only the TCP connection goes to ``address``.
    """

    def __init__(self, host: str, address: str) -> None:
        self._host, self._address = host, address
        super().__init__(max_retries=0)

    def build_connection_pool_key_attributes(self, request, verify, cert=None):  # noqa: ANN001, ANN201
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(request, verify, cert)
        host_params["host"] = self._address
        if host_params.get("scheme") == "https":
            pool_kwargs.update(server_hostname=self._host, assert_hostname=self._host)
        return host_params, pool_kwargs

    def send(self, request, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
        request.headers.setdefault("Host", urlsplit(request.url).netloc)
        return super().send(request, *args, **kwargs)


@lru_cache(maxsize=16)
def _site_origin(base_url: str) -> tuple[str, str, int]:
    """Label Studio's origin, parsed once per configured URL rather than once per download."""
    return parse_target(base_url).origin


def pinned_session(host: str, address: str) -> requests.Session:
    """A session whose connections for ``host`` go to ``address`` (and no proxy, which would resolve again)."""
    session = requests.Session()
    session.trust_env = False
    adapter = _PinnedAddress(host, address)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class _ByteCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._size = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: str, data: bytes) -> None:
        if len(data) > self.capacity:
            return
        with self._lock:
            if key in self._items:
                self._size -= len(self._items.pop(key))
            self._items[key] = data
            self._size += len(data)
            while self._size > self.capacity:
                _, evicted = self._items.popitem(last=False)
                self._size -= len(evicted)


class ImageLoader:
    def __init__(self, limits: MediaLimits, cache_bytes: int = 0, session: requests.Session | None = None) -> None:
        self.limits = limits
        self.session = session or requests.Session()
        self._cache = _ByteCache(cache_bytes)

    def load(self, url: str, site: LabelStudioAuth | None, task_id: int | None = None) -> Image.Image:
        return decode_image(self.fetch(url, site, task_id), self.limits.max_pixels)

    def fetch(self, url: str, site: LabelStudioAuth | None, task_id: int | None = None) -> bytes:
        if url.startswith("data:"):
            return decode_data_url(url, self.limits.max_bytes)
        absolute = self._absolute(url, site, task_id)
        cached = self._cache.get(absolute)
        if cached is not None:
            return cached
        data = self._download(absolute, site)
        self._cache.put(absolute, data)
        return data

    def _absolute(self, url: str, site: LabelStudioAuth | None, task_id: int | None) -> str:
        scheme = urlsplit(url).scheme.lower()
        if scheme in _CLOUD_SCHEMES:
            if site is None or task_id is None:
                raise MediaError(f"cannot resolve {redact(url)} without Label Studio; set LABEL_STUDIO_URL")
            encoded = base64.b64encode(url.encode()).decode()
            return f"{site.base_url}/tasks/{task_id}/resolve/?fileuri={quote(encoded)}"
        if scheme in {"http", "https"}:
            return url
        if scheme == "" and url.startswith("/"):
            if site is None:
                raise MediaError(
                    f"the image {redact(url)} is a Label Studio path but Label Studio's URL is unknown; "
                    "set LABEL_STUDIO_URL"
                )
            return urljoin(site.base_url + "/", url.lstrip("/"))
        raise MediaError(f"unsupported image URL {redact(url)}: use http(s), a Label Studio path or a data: URL")

    def _allowed(self, target: Target) -> bool:
        allowed = self.limits.allowed_hosts
        return target.host in allowed or f"{target.host}:{target.port}" in allowed

    @staticmethod
    def _checked_address(target: Target) -> str:
        """The address to connect to for an allowed host: an IP as written is taken as meant; a *name* is
        resolved once here, and every address it resolves to must be public (DNS rebinding)."""
        try:
            ipaddress.ip_address(target.host)
            return target.host
        except ValueError:
            pass
        try:
            addresses = [info[4][0] for info in socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)]
        except (OSError, UnicodeError):
            raise MediaError(f"cannot resolve the image host {target.host}") from None
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
                raise MediaError(
                    f"refusing to fetch {redact(target.url)}: {target.host} resolves to the internal address {ip}; "
                    "list that address itself in ALLOWED_MEDIA_HOSTS if it is meant"
                )
        if not addresses:
            raise MediaError(f"cannot resolve the image host {target.host}")
        return addresses[0]

    def _is_label_studio(self, target: Target, site: LabelStudioAuth | None) -> bool:
        return site is not None and target.origin == _site_origin(site.base_url)

    def _timed_out(self, shown: str) -> MediaError:
        return MediaError(f"timed out after {self.limits.timeout:g} s fetching {shown}")

    def _download(self, url: str, site: LabelStudioAuth | None) -> bytes:
        ends = time.monotonic() + deadline.bounded(self.limits.timeout)  # the whole download, redirects included
        for _ in range(MAX_REDIRECTS + 1):
            target = parse_target(url)
            from_label_studio = self._is_label_studio(target, site)
            if not from_label_studio and not self._allowed(target):
                raise MediaError(
                    f"refusing to fetch {redact(target.url)}: {target.host} is neither Label Studio's host nor listed "
                    "in ALLOWED_MEDIA_HOSTS"
                )
            try:
                headers = site.headers() if (from_label_studio and site is not None) else {}
            except LabelStudioAuthError as exc:
                raise MediaError(str(exc)) from None
            if from_label_studio:
                data, location = self._get(self.session, target, headers, ends, from_label_studio)
            else:
                with pinned_session(target.host, self._checked_address(target)) as session:
                    data, location = self._get(session, target, headers, ends, from_label_studio)
            if location is None:
                return data
            url = urljoin(target.url, location)
        raise MediaError(f"too many redirects fetching {redact(url)}")

    def _get(
        self, session: requests.Session, target: Target, headers: dict[str, str], ends: float, from_label_studio: bool
    ) -> tuple[bytes, str | None]:
        """(body, None), or (b"", where it redirects to)."""
        left = ends - time.monotonic()
        if left <= 0:
            raise self._timed_out(redact(target.url))
        try:
            response = session.get(target.url, headers=headers, timeout=left, stream=True, allow_redirects=False)
        except requests.Timeout:
            raise self._timed_out(redact(target.url)) from None
        except requests.RequestException as exc:
            raise MediaError(f"could not fetch {redact(target.url)} ({type(exc).__name__})") from None
        shown = redact(target.url, keep_query=from_label_studio)
        with response:
            if response.is_redirect:
                return b"", response.headers.get("Location", "")
            self._check_status(response.status_code, shown, from_label_studio)
            return self._read_bounded(response, shown, ends), None

    @staticmethod
    def _check_status(status: int, shown: str, from_label_studio: bool) -> None:
        if status in (401, 403) and from_label_studio:
            raise MediaError(
                f"Label Studio refused access to {shown} (HTTP {status}); set LABEL_STUDIO_API_KEY to a "
                "legacy token or personal access token of a user who can see the project"
            )
        if status >= 400:
            raise MediaError(f"fetching {shown} answered HTTP {status}")

    def _read_bounded(self, response: requests.Response, shown: str, ends: float) -> bytes:
        """The body, refused past MEDIA_MAX_BYTES or past ``ends``: a trickle cannot stretch the download."""
        limit = self.limits.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise MediaError(f"{shown} is {int(declared)} bytes, over MEDIA_MAX_BYTES={limit}")
        buffer = io.BytesIO()
        try:
            while chunk := response.raw.read1(64 * 1024, decode_content=True):  # returns whatever has arrived
                buffer.write(chunk)
                if buffer.tell() > limit:
                    raise MediaError(f"{shown} is over MEDIA_MAX_BYTES={limit} bytes")
                if time.monotonic() > ends:
                    raise self._timed_out(shown)
        except (requests.RequestException, HTTPError, OSError) as exc:
            if isinstance(exc, (ReadTimeoutError, TimeoutError, requests.Timeout)):
                raise self._timed_out(shown) from None
            raise MediaError(f"the download of {shown} broke off ({type(exc).__name__})") from None
        return buffer.getvalue()


def decode_data_url(url: str, max_bytes: int) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep:
        raise MediaError("malformed data: URL (no comma)")
    if len(payload) > max_bytes * 4 // 3 + 4:
        raise MediaError(f"data: URL is over MEDIA_MAX_BYTES={max_bytes} bytes")
    try:
        data = base64.b64decode(payload, validate=False) if header.endswith(";base64") else unquote_to_bytes(payload)
    except (binascii.Error, ValueError):
        raise MediaError("malformed data: URL (bad base64)") from None
    if len(data) > max_bytes:
        raise MediaError(f"data: URL is over MEDIA_MAX_BYTES={max_bytes} bytes")
    return data


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """Decode bytes to an upright RGB image, refusing what is not an image or is too large."""
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise MediaError(f"the image declares more pixels than MEDIA_MAX_PIXELS={max_pixels} allows") from None
    except (UnidentifiedImageError, OSError):
        raise MediaError(f"the content is not an image this backend can read ({len(data)} bytes)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise MediaError(f"the image is {width}x{height} = {width * height} pixels, over MEDIA_MAX_PIXELS={max_pixels}")
    try:
        image.seek(0)
        image.load()
        upright = ImageOps.exif_transpose(image, in_place=True) or image  # in place: no second copy of the pixels
    except (OSError, SyntaxError, ValueError) as exc:
        raise MediaError(f"the image data is truncated or corrupt ({exc})") from None
    return to_rgb(upright)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as a browser would paint it: transparency over white, 16-bit scaled to 8-bit."""
    if image.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in {"RGBA", "LA", "PA", "RGBa", "La"}:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image
