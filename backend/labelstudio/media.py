"""Task data → PIL image, the way Label Studio's editor shows it.

Fetches only from Label Studio's own host (with its auth), ``data:`` URLs, and
hosts listed in ``ALLOWED_MEDIA_HOSTS`` — checked again on every redirect, so a
task author cannot make the backend fetch an internal address. Bytes and pixels
are bounded, EXIF orientation is applied as browsers do, and repeated fetches
come from a byte-bounded cache.
"""

from __future__ import annotations

import base64
import binascii
import io
import ipaddress
import socket
import threading
from collections import OrderedDict
from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes, urljoin, urlsplit

import numpy as np
import requests
from PIL import Image, ImageOps, UnidentifiedImageError

from backend.labelstudio.auth import LabelStudioAuth, LabelStudioAuthError

MAX_REDIRECTS = 3
_CLOUD_SCHEMES = {"s3", "gs", "azure-blob", "azure-spi"}


class MediaError(ValueError):
    """A task's image could not be loaded; the message says why and never contains a secret."""


@dataclass(frozen=True)
class MediaLimits:
    max_bytes: int
    max_pixels: int
    timeout: float
    allowed_hosts: tuple[str, ...] = ()


def redact(url: str, keep_query: bool = False) -> str:
    """The URL without credentials or fragment, and without query string (it may hold signatures)
    unless ``keep_query``: Label Studio's own URLs carry only file names there."""
    if url.startswith("data:"):
        return url[: url.find(",")] + ",…" if "," in url else "data:…"
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    query = (f"?{parts.query}" if keep_query else "?…") if parts.query else ""
    return f"{parts.scheme}://{host}{port}{parts.path}{query}"


def _origin(url: str) -> tuple[str, str, int]:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


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

    def _allowed(self, url: str) -> bool:
        scheme, host, port = _origin(url)
        if scheme not in {"http", "https"}:
            return False
        allowed = self.limits.allowed_hosts
        return host in allowed or f"{host}:{port}" in allowed

    @staticmethod
    def _check_resolution(url: str) -> None:
        """An allowed *name* must not resolve to an internal address (DNS rebinding); allowed IPs are taken as meant."""
        host = urlsplit(url).hostname or ""
        try:
            ipaddress.ip_address(host)
            return
        except ValueError:
            pass
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
        except OSError:
            raise MediaError(f"cannot resolve the image host {host}") from None
        for address in addresses:
            ip = ipaddress.ip_address(address.split("%")[0])
            if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved or ip.is_multicast:
                raise MediaError(
                    f"refusing to fetch {redact(url)}: {host} resolves to the internal address {ip}; "
                    "list that address itself in ALLOWED_MEDIA_HOSTS if it is meant"
                )

    def _is_label_studio(self, url: str, site: LabelStudioAuth | None) -> bool:
        return site is not None and _origin(url) == _origin(site.base_url)

    def _download(self, url: str, site: LabelStudioAuth | None) -> bytes:
        for _ in range(MAX_REDIRECTS + 1):
            from_label_studio = self._is_label_studio(url, site)
            if not from_label_studio and not self._allowed(url):
                host = urlsplit(url).hostname
                raise MediaError(
                    f"refusing to fetch {redact(url)}: {host} is neither Label Studio's host nor listed in "
                    "ALLOWED_MEDIA_HOSTS"
                )
            if not from_label_studio:
                self._check_resolution(url)
            try:
                headers = site.headers() if (from_label_studio and site is not None) else {}
            except LabelStudioAuthError as exc:
                raise MediaError(str(exc)) from None
            try:
                response = self.session.get(
                    url, headers=headers, timeout=self.limits.timeout, stream=True, allow_redirects=False
                )
            except requests.Timeout:
                raise MediaError(f"timed out after {self.limits.timeout:g} s fetching {redact(url)}") from None
            except requests.RequestException as exc:
                raise MediaError(f"could not fetch {redact(url)} ({type(exc).__name__})") from None
            shown = redact(url, keep_query=from_label_studio)
            with response:
                if response.is_redirect:
                    url = urljoin(url, response.headers.get("Location", ""))
                    continue
                self._check_status(response.status_code, shown, from_label_studio)
                return self._read_bounded(response, shown)
        raise MediaError(f"too many redirects fetching {redact(url)}")

    @staticmethod
    def _check_status(status: int, shown: str, from_label_studio: bool) -> None:
        if status in (401, 403) and from_label_studio:
            raise MediaError(
                f"Label Studio refused access to {shown} (HTTP {status}); set LABEL_STUDIO_API_KEY to a "
                "legacy token or personal access token of a user who can see the project"
            )
        if status >= 400:
            raise MediaError(f"fetching {shown} answered HTTP {status}")

    def _read_bounded(self, response: requests.Response, shown: str) -> bytes:
        limit = self.limits.max_bytes
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise MediaError(f"{shown} is {int(declared)} bytes, over MEDIA_MAX_BYTES={limit}")
        buffer = io.BytesIO()
        try:
            for chunk in response.iter_content(64 * 1024):
                buffer.write(chunk)
                if buffer.tell() > limit:
                    raise MediaError(f"{shown} is over MEDIA_MAX_BYTES={limit} bytes")
        except requests.RequestException as exc:
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
        upright = ImageOps.exif_transpose(image)
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
