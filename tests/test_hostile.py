"""Hostile inputs and faults: each gets a clear error for its task or request; the rest succeeds; the process lives."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import uuid
import zlib

import pytest
import requests
from PIL import Image

from backend.labelstudio.media import ImageLoader, MediaError, MediaLimits
from backend.models.engine import EngineUnavailable
from backend.models.remote import OpenAIEngine
from tests.conftest import LEGACY_TOKEN, noise_image, png_bytes
from tests.loopback import LoopbackServer, Reply

CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="Chat, domestique"/><Label value="猫"/>
<Label value="Ünïcödé"/></RectangleLabels></View>"""
BOX = {"id": "b", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
       "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0, "rectanglelabels": ["猫"]}}  # fmt: skip


def data_url(content: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(content).decode()


def boxed(task_id: int, image: str, config_box: dict = BOX) -> dict:
    return {"id": task_id, "data": {"image": image}, "annotations": [{"result": [config_box]}]}


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header declaring 10^10 pixels, a few dozen bytes long."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 10))
        + chunk(b"IEND", b"")
    )


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((250, 0, 0), (0, 0, 250))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buffer.getvalue()


def test_one_request_full_of_hostile_images_answers_each_task(make_client, label_studio):
    slow = threading.Event()

    def slow_route(_):
        slow.wait(3)
        return Reply(200, png_bytes(noise_image(8, 8)))

    label_studio.routes["GET /data/upload/1/slow.png"] = slow_route
    label_studio.routes["GET /data/upload/1/to-metadata.png"] = lambda _: Reply(
        302, headers={"Location": "http://169.254.169.254/latest/meta-data/"}
    )
    label_studio.routes["GET /data/upload/1/page.html"] = lambda _: Reply(200, b"<html>hi</html>")
    client, _ = make_client(LABEL_STUDIO_URL=label_studio.url, LABEL_STUDIO_API_KEY=LEGACY_TOKEN, MEDIA_TIMEOUT="0.5",
                            MEDIA_MAX_PIXELS="1000000")  # fmt: skip
    truncated = png_bytes(noise_image(64, 64), "JPEG")[:300]
    tasks = [
        boxed(1, "/data/upload/1/slow.png"),
        boxed(2, "/data/upload/1/to-metadata.png"),
        boxed(3, "/data/upload/1/page.html"),
        boxed(4, data_url(truncated, "image/jpeg")),
        boxed(5, data_url(bomb_png())),
        boxed(6, data_url(animated_gif(), "image/gif")),
        boxed(7, data_url(png_bytes(Image.new("CMYK", (30, 30), (0, 255, 255, 0)), "JPEG"), "image/jpeg")),
        boxed(8, data_url(png_bytes(noise_image(40, 40)))),
    ]
    started = time.monotonic()
    results = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG}).get_json()["results"]
    slow.set()
    assert time.monotonic() - started < 30
    errors = {i + 1: r.get("error", "") for i, r in enumerate(results)}
    assert "timed out" in errors[1]
    assert "refusing to fetch" in errors[2] and "169.254.169.254" in errors[2]
    assert "not an image" in errors[3]
    assert "truncated or corrupt" in errors[4] or "not an image" in errors[4]
    assert "MEDIA_MAX_PIXELS" in errors[5]
    for ok in (6, 7, 8):  # GIF (first frame), CMYK JPEG, plain PNG
        assert results[ok - 1]["result"][0]["value"]["rectanglelabels"][0] in {"Chat, domestique", "猫", "Ünïcödé"}
    assert client.get("/health").status_code == 200


def test_an_allowed_name_that_resolves_to_an_internal_address_is_refused():
    with LoopbackServer({"GET /cat.png": lambda _: Reply(200, png_bytes(noise_image(8, 8)))}) as server:
        by_name = ImageLoader(MediaLimits(10**6, 10**6, 5, (f"localhost:{server.port}",)))
        with pytest.raises(MediaError, match="resolves to the internal address 127.0.0.1"):
            by_name.load(f"http://localhost:{server.port}/cat.png", None)
        assert server.seen == []
        by_address = ImageLoader(MediaLimits(10**6, 10**6, 5, (f"127.0.0.1:{server.port}",)))
        assert by_address.load(f"http://127.0.0.1:{server.port}/cat.png", None).size == (8, 8)  # meant, so allowed


def test_a_gif_gives_its_first_frame():
    from backend.labelstudio.media import decode_image

    assert decode_image(animated_gif(), 10_000).getpixel((5, 5))[0] > 200


def test_a_selection_over_the_limit_is_answered_task_by_task_and_says_why_the_rest_cannot_follow(make_client):
    """Label Studio stores nothing when a request fails, so a big selection is never refused: the tasks that fit
    are predicted; without a Label Studio key no job can post the rest, and each of them says so."""
    client, _ = make_client(MAX_TASKS_PER_REQUEST="3")
    image = data_url(png_bytes(noise_image(40, 30)))
    tasks = [boxed(i, image) for i in range(1, 41)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG, "project": "5.1"})
    assert response.status_code == 200
    results = response.get_json()["results"]
    assert len(results) == 40 and all("result" in r for r in results[:3])
    for task_id, result in enumerate(results[3:], start=4):
        assert result["error"].startswith(f"task {task_id}: not predicted within this request's limits")
        assert "LABEL_STUDIO_API_KEY" in result["error"]
    assert "job" not in response.get_json()


def test_two_images_each_box_is_cut_from_its_own_image(make_client):
    config = """<View><Image name="left" value="$left"/><Image name="right" value="$right"/>
    <RectangleLabels name="l" toName="left"><Label value="red"/><Label value="blue"/></RectangleLabels>
    <RectangleLabels name="r" toName="right"><Label value="red"/><Label value="blue"/></RectangleLabels></View>"""
    client, _ = make_client()
    red = data_url(png_bytes(Image.new("RGB", (20, 20), (255, 0, 0))))
    blue = data_url(png_bytes(Image.new("RGB", (30, 10), (0, 0, 255))))
    boxes = [{**BOX, "id": "on-left", "from_name": "l", "to_name": "left"},
             {**BOX, "id": "on-right", "from_name": "r", "to_name": "right"}]  # fmt: skip
    task = {"id": 1, "data": {"left": red, "right": blue}, "annotations": [{"result": boxes}]}
    [prediction] = client.post("/predict", json={"tasks": [task], "label_config": config}).get_json()["results"]
    assert {(r["id"], r["from_name"], r["to_name"]) for r in prediction["result"]} == {
        ("on-left", "l", "left"),
        ("on-right", "r", "right"),
    }


def test_webhook_secret_is_required_when_configured(make_client):
    client, _ = make_client(WEBHOOK_SECRET="s3cret-hook", BASIC_AUTH_USER="u", BASIC_AUTH_PASS="p")
    body = {"action": "PROJECT_UPDATED", "project": {"id": 1}}
    assert client.post("/webhook", json=body).status_code == 401
    assert client.post("/webhook", json=body, headers={"X-Webhook-Secret": "wrong"}).status_code == 401
    assert client.post("/webhook", json=body, headers={"X-Webhook-Secret": "s3cret-hook"}).status_code == 200


def test_overload_gets_a_fast_503_with_retry_after(tiny_llava, tmp_path):
    from backend.models.local import TransformersEngine
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    release = threading.Event()
    engine = TransformersEngine.load(str(tiny_llava), "cpu")

    class Held:  # the real engine, held until released, so one request occupies the only slot
        name = engine.name

        def score_options(self, *args, **kwargs):
            release.wait(30)
            return engine.score_options(*args, **kwargs)

        def __getattr__(self, name: str):  # the usage counters: the real engine's
            return getattr(engine, name)

    settings = Settings.from_env({"MLLM_MODEL": str(tiny_llava), "MODEL_DIR": str(tmp_path),
                                  "MAX_PREDICTS_IN_FLIGHT": "1", "CRITIC": "off"})  # fmt: skip
    app = create_app(build_service(settings, lambda: Held()))
    body = {"tasks": [boxed(1, data_url(png_bytes(noise_image(20, 20))))], "label_config": CONFIG}
    first: dict = {}
    worker = threading.Thread(target=lambda: first.update(r=app.test_client().post("/predict", json=body)))
    worker.start()
    time.sleep(0.5)
    started = time.monotonic()
    refused = app.test_client().post("/predict", json=body)
    assert refused.status_code == 503 and refused.headers["Retry-After"] and time.monotonic() - started < 1
    release.set()
    worker.join(30)
    assert first["r"].status_code == 200


def test_the_model_server_recovers_after_it_comes_back():
    state = {"down": True}

    def route(_):
        if state["down"]:
            return Reply(503)
        return Reply.json(
            {
                "choices": [
                    {
                        "message": {"content": "A"},
                        "logprobs": {
                            "content": [
                                {"token": "A", "logprob": -0.1, "top_logprobs": [{"token": "A", "logprob": -0.1}]}
                            ]
                        },
                    }
                ]
            }
        )

    with LoopbackServer({"POST /v1/chat/completions": route}) as server:
        engine = OpenAIEngine(f"{server.url}/v1", "m", max_retries=0, cooldown=0.3)
        with pytest.raises(EngineUnavailable, match="HTTP 503"):
            engine.score_options([noise_image(8, 8)], "?", ["a", "b"])
        state["down"] = False
        with pytest.raises(EngineUnavailable, match="pause"):
            engine.score_options([noise_image(8, 8)], "?", ["a", "b"])
        time.sleep(0.35)
        assert engine.score_options([noise_image(8, 8)], "?", ["a", "b"]).probabilities.shape == (1, 2)


def test_health_says_degraded_when_redis_is_down_and_training_retries_with_backoff(make_client):
    client, _ = make_client(REDIS_URL="redis://127.0.0.1:1/0")
    health = client.get("/health").get_json()
    assert any("Redis" in warning for warning in health["warnings"])
    from redis import Redis

    from backend.jobs import RedisJobs
    from backend.settings import Settings

    name = f"test-{uuid.uuid4().hex[:8]}"  # a queue of its own: no worker takes this job
    jobs = RedisJobs(Settings.from_env({"MLLM_MODEL": "m", "REDIS_URL": "redis://127.0.0.1:6379/13",
                                        "JOB_QUEUE": name}))  # fmt: skip
    job = jobs.queue.fetch_job(jobs.train_now(1))
    assert job.retries_left == 3 and job.retry_intervals == [10, 60, 300]
    for key in Redis.from_url("redis://127.0.0.1:6379/13").scan_iter(f"*{name}*"):
        Redis.from_url("redis://127.0.0.1:6379/13").delete(key)


def test_training_against_an_unreachable_label_studio_fails_with_where(tmp_path):
    from backend.settings import Settings
    from backend.training.run import train_project

    settings = Settings.from_env({"MLLM_MODEL": "m", "MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL":
                                  "http://127.0.0.1:1", "LABEL_STUDIO_API_KEY": "secret-key-123"})  # fmt: skip
    with pytest.raises(RuntimeError, match="cannot export project 4 from Label Studio at http://127.0.0.1:1") as error:
        train_project(settings, 4)
    assert "secret-key-123" not in str(error.value)
    assert not any(tmp_path.glob("4/*")), "no version was started"


def test_a_healthy_process_after_everything(make_client):
    client, _ = make_client()
    for body in (b"{", b"[]", b'{"tasks": "nope"}', b'{"tasks": [42, null, "x"]}'):
        client.post("/predict", data=body, content_type="application/json")
    odd = client.post("/predict", json={"tasks": [42, None], "label_config": CONFIG}).get_json()
    assert [r["error"] for r in odd["results"]] == [
        "task None: the task is a number, not a JSON object",
        "task None: the task is null, not a JSON object",
    ]
    assert requests.codes.ok == client.get("/health").status_code


def test_a_label_studio_still_starting_does_not_stop_the_rest_of_a_big_selection(make_client):
    """The backend may start before Label Studio: an unreachable Label Studio at the key check is passing trouble
    (the next /predict comes from it), so the tasks that do not fit still go to a background job."""
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{unused.getsockname()[1]}"
    client, service = make_client(MAX_TASKS_PER_REQUEST="2", LABEL_STUDIO_URL=nobody, LABEL_STUDIO_API_KEY="k" * 40)
    ends = time.monotonic() + 30
    while service.key_check.problem is None and time.monotonic() < ends:
        time.sleep(0.1)
    assert "cannot reach Label Studio" in service.key_check.problem and service.key_check.refused is None
    image = data_url(png_bytes(noise_image(40, 30)))
    body = {"tasks": [boxed(i, image) for i in range(1, 6)], "label_config": CONFIG, "project": "9.1"}
    answer = client.post("/predict", json=body).get_json()
    assert answer["results"][2:] == [[], [], []] and answer["job"].startswith("preannotate-9-")
    assert client.get("/health").get_json()["warnings"] == [service.key_check.problem]
