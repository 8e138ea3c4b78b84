"""Media loading against real HTTP servers on loopback."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from PIL import Image

from backend.labelstudio.auth import LabelStudioAuth
from backend.labelstudio.media import ImageLoader, MediaError, MediaLimits, decode_image
from backend.labelstudio.regions import box_from_region, crop_box
from tests.conftest import png_bytes, token_guard
from tests.loopback import LoopbackServer, Reply, Seen

TOKEN = "f" * 40
IMAGE = Image.new("RGB", (8, 6), (10, 200, 30))


def loader(**limits) -> ImageLoader:
    defaults = dict(max_bytes=1_000_000, max_pixels=10_000_000, timeout=5.0, allowed_hosts=())
    return ImageLoader(MediaLimits(**{**defaults, **limits}), cache_bytes=1_000_000)


def site(server: LoopbackServer, key: str | None = TOKEN) -> LabelStudioAuth:
    return LabelStudioAuth(server.url, key)


@pytest.fixture
def ls():
    with LoopbackServer({"GET /data/upload/1/a.png": token_guard(TOKEN, png_bytes(IMAGE))}) as server:
        yield server


def test_label_studio_upload_is_fetched_with_the_token(ls):
    image = loader().load("/data/upload/1/a.png", site(ls))
    assert image.size == (8, 6) and image.getpixel((0, 0)) == (10, 200, 30)
    assert ls.seen[0].headers["Authorization"] == f"Token {TOKEN}"


def test_missing_or_wrong_token_fails_clearly_without_showing_it(ls):
    for key in (None, "wrong-token"):
        with pytest.raises(MediaError, match="HTTP 401.*LABEL_STUDIO_API_KEY") as error:
            loader().load("/data/upload/1/a.png", site(ls, key))
        assert TOKEN not in str(error.value) and "wrong-token" not in str(error.value)


def test_personal_access_token_is_refreshed_once_and_sent_as_bearer():
    header = base64.urlsafe_b64encode(b'{"alg":"HS256"}').decode().rstrip("=")
    payload = base64.urlsafe_b64encode(json.dumps({"token_type": "refresh"}).encode()).decode().rstrip("=")
    pat = f"{header}.{payload}.signature"

    def refresh(request: Seen) -> Reply:
        ok = json.loads(request.body) == {"refresh": pat}
        return Reply.json({"access": "short-lived"}) if ok else Reply(401)

    def image(request: Seen) -> Reply:
        ok = request.headers.get("Authorization") == "Bearer short-lived"
        return Reply(200, png_bytes(IMAGE)) if ok else Reply(401)

    routes = {"POST /api/token/refresh/": refresh, "GET /data/upload/1/a.png": image, "GET /data/upload/1/b.png": image}
    with LoopbackServer(routes) as server:
        auth = site(server, pat)
        media = loader()
        media.load("/data/upload/1/a.png", auth)
        media.load("/data/upload/1/b.png", auth)
        assert [s.path for s in server.seen].count("/api/token/refresh/") == 1


def test_other_hosts_are_refused_unless_allowed_and_never_get_the_token(ls):
    with LoopbackServer({"GET /cat.png": lambda _: Reply(200, png_bytes(IMAGE))}) as other:
        url = f"{other.url}/cat.png"
        with pytest.raises(MediaError, match="ALLOWED_MEDIA_HOSTS"):
            loader().load(url, site(ls))
        assert other.seen == []
        image = loader(allowed_hosts=(f"127.0.0.1:{other.port}",)).load(url, site(ls))
        assert image.size == (8, 6)
        assert "Authorization" not in other.seen[0].headers


def test_a_redirect_to_a_disallowed_host_is_refused(ls):
    with LoopbackServer({"GET /secret": lambda _: Reply(200, png_bytes(IMAGE))}) as internal:
        ls.routes["GET /data/upload/1/redirect.png"] = lambda _: Reply(
            302, headers={"Location": f"{internal.url}/secret"}
        )
        with pytest.raises(MediaError, match="refusing to fetch"):
            loader().load("/data/upload/1/redirect.png", site(ls))
        assert internal.seen == []


@pytest.mark.parametrize(
    "route, limits, message",
    [
        (lambda _: Reply(404), {}, "HTTP 404"),
        (lambda _: Reply(200, b"<html>not an image</html>"), {}, "not an image"),
        (lambda _: Reply(200, png_bytes(IMAGE)), {"max_bytes": 20}, "MEDIA_MAX_BYTES"),
        (lambda _: Reply(200, png_bytes(IMAGE)), {"max_pixels": 47}, "MEDIA_MAX_PIXELS"),
    ],
)
def test_bad_responses_fail_with_the_reason(ls, route, limits, message):
    ls.routes["GET /data/upload/1/bad"] = route
    with pytest.raises(MediaError, match=message):
        loader(**limits).load("/data/upload/1/bad", site(ls))


def test_label_studio_path_without_a_known_label_studio_says_what_to_set():
    with pytest.raises(MediaError, match="LABEL_STUDIO_URL"):
        loader().load("/data/upload/1/a.png", None)


def test_data_url_needs_no_network():
    url = "data:image/png;base64," + base64.b64encode(png_bytes(IMAGE)).decode()
    assert loader().load(url, None).size == (8, 6)
    with pytest.raises(MediaError, match="not an image"):
        loader().load("data:image/png;base64,AAAA", None)


def test_repeated_fetches_come_from_the_cache(ls):
    media = loader()
    for _ in range(3):
        media.load("/data/upload/1/a.png", site(ls))
    assert len(ls.seen) == 1


def test_exif_rotated_jpeg_crops_the_region_the_user_saw(ls):
    shown = Image.new("RGB", (40, 20), (0, 0, 255))
    shown.paste((255, 0, 0), (0, 0, 20, 20))  # left half red, as the browser shows it
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    stored = shown.transpose(Image.Transpose.ROTATE_90)
    ls.routes["GET /data/upload/1/phone.jpg"] = token_guard(TOKEN, png_bytes(stored, "JPEG", exif=exif, quality=95))
    image = loader().load("/data/upload/1/phone.jpg", site(ls))
    assert image.size == (40, 20)
    left = box_from_region({"id": "b", "value": {"x": 0, "y": 0, "width": 50, "height": 100}})
    red = np.asarray(crop_box(image, left)).astype(int).mean(axis=(0, 1))
    assert red[0] > 200 and red[2] < 60


@pytest.mark.parametrize(
    "image",
    [
        Image.new("CMYK", (4, 4), (0, 255, 255, 0)),
        Image.new("RGBA", (4, 4), (255, 0, 0, 0)),
        Image.new("P", (4, 4)),
        Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)),
        Image.new("L", (4, 4), 128),
    ],
    ids=["cmyk", "alpha", "palette", "16-bit", "grey"],
)
def test_unusual_image_modes_become_rgb(image):
    fmt = "JPEG" if image.mode == "CMYK" else "PNG"
    decoded = decode_image(png_bytes(image, fmt), 1_000)
    assert decoded.mode == "RGB" and decoded.size == (4, 4)
    if image.mode == "RGBA":
        assert decoded.getpixel((0, 0)) == (255, 255, 255)  # transparent over white
    if image.mode == "I;16":
        assert decoded.getpixel((0, 0)) == (255, 255, 255)
