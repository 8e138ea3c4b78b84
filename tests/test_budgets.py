"""Safety limits, tested as bounds with wide margins (never as speed claims): memory per request, the request
deadline, the whole-download deadline, and the label count."""

from __future__ import annotations

import base64
import re
import socket
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from backend.labelstudio.regions import MODEL_IMAGE_MAX_PIXELS, Box, crop_box
from tests.conftest import noise_image, png_bytes

BOXES = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels></View>"""
BOXES_AND_CLASS = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"><Label value="cat"/><Label value="dog"/></RectangleLabels>
<Choices name="scene" toName="image"><Choice value="indoor"/><Choice value="outdoor"/></Choices></View>"""
MEMORY_BUDGET_KB = 1024 * 1024  # the README's budget: one request's peak RSS growth stays under 1 GB


def data_url(content: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(content).decode()


def boxed(task_id: int, image: str, **value: float) -> dict:
    box = {"id": f"b{task_id}", "from_name": "label", "to_name": "image", "type": "rectanglelabels",
           "value": {"x": 10, "y": 10, "width": 50, "height": 50, "rotation": 0, "rectanglelabels": ["cat"],
                     **value}}  # fmt: skip
    return {"id": task_id, "data": {"image": image}, "annotations": [{"result": [box]}]}


def _status_kb(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def peak_growth_kb(action) -> tuple[int, object]:
    """Peak RSS growth of this process while ``action`` runs (Linux: the high-water mark is reset first)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    result = action()
    return _status_kb("VmHWM") - before, result


def test_a_rotated_box_far_larger_than_its_image_is_cropped_within_the_model_image_bound():
    image = Image.new("RGB", (4000, 3000), (40, 90, 200))
    box = Box("b", "label", "image", x=-400, y=-400, width=900, height=900, rotation=30)
    crop = crop_box(image, box)
    assert crop.width * crop.height <= MODEL_IMAGE_MAX_PIXELS
    assert crop.width / crop.height == pytest.approx(4 / 3, abs=0.01)  # scaled, not clipped: the shape is kept


def test_hostile_sizes_keep_one_requests_peak_memory_under_the_budget(make_client):
    client, _ = make_client(CRITIC="off")
    huge = data_url(png_bytes(Image.new("RGB", (7999, 7999), (120, 30, 30))))  # ~190 KB, 64 M pixels decoded
    small = data_url(png_bytes(noise_image(96, 64)))
    cases = {
        "rotated boxes of 999% on small and huge images": (
            BOXES, [boxed(1, small, rotation=30, width=999, height=999), boxed(2, huge, rotation=45, width=999,
                                                                               height=999)]),
        "four tasks on a 7999x7999 image, boxes and a whole-image class": (  # measured: ~500 MB
            BOXES_AND_CLASS, [boxed(i, huge) for i in range(1, 5)]),
    }  # fmt: skip
    for name, (config, tasks) in cases.items():
        growth, response = peak_growth_kb(lambda c=config, t=tasks: client.post("/predict", json={
            "tasks": t, "label_config": c}))  # fmt: skip
        assert response.status_code == 200
        assert all("result" in r for r in response.get_json()["results"]), (name, response.get_json())
        assert growth < MEMORY_BUDGET_KB, f"{name}: peak RSS grew {growth // 1024} MB"


def test_a_request_is_annotated_in_pixel_bounded_chunks_with_the_same_answers(make_client):
    tasks = [boxed(i, data_url(png_bytes(noise_image(40, 40, i)))) for i in range(1, 8)]
    whole, _ = make_client(CRITIC="off")
    chunked, _ = make_client(CRITIC="off", PREDICT_MAX_PIXELS="2048", BOX_MIN_SIDE="1")  # 20x20 crops: 5 a chunk
    reference, _ = make_client(CRITIC="off", BOX_MIN_SIDE="1")
    expected = reference.post("/predict", json={"tasks": tasks, "label_config": BOXES}).get_json()["results"]
    got = chunked.post("/predict", json={"tasks": tasks, "label_config": BOXES}).get_json()["results"]
    for a, b in zip(expected, got, strict=True):
        assert a["result"][0]["value"] == b["result"][0]["value"]
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)
    alone = whole.post("/predict", json={"tasks": tasks[:1], "label_config": BOXES}).get_json()["results"]
    assert "result" in alone[0]
    too_big, _ = make_client(CRITIC="off", PREDICT_MAX_PIXELS="1024")  # a 50x50 crop alone is over it
    big = boxed(9, data_url(png_bytes(noise_image(100, 100))))
    error = too_big.post("/predict", json={"tasks": [big], "label_config": BOXES}).get_json()["results"][0]
    assert "PREDICT_MAX_PIXELS=1024" in error["error"]


def test_a_task_with_many_large_regions_is_refused_before_it_holds_them_all(make_client):
    """500 whole-image boxes on a 2000x2000 image would hold 2 G pixels; the task stops at the budget."""
    client, _ = make_client(CRITIC="off", PREDICT_MAX_PIXELS="10000000")
    image = data_url(png_bytes(Image.new("RGB", (2000, 2000), (10, 200, 10))))
    many = boxed(1, image, x=0, y=0, width=100, height=100)
    [box] = many["annotations"][0]["result"]
    many["annotations"][0]["result"] = [{**box, "id": f"b{i}"} for i in range(500)]
    growth, response = peak_growth_kb(lambda: client.post("/predict", json={"tasks": [many], "label_config": BOXES}))
    assert "PREDICT_MAX_PIXELS=10000000" in response.get_json()["results"][0]["error"]
    assert growth < 300 * 1024, f"peak RSS grew {growth // 1024} MB"


def labels_config(count: int) -> str:
    labels = "".join(f'<Label value="label number {i}"/>' for i in range(count))
    return f'<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">{labels}' \
           "</RectangleLabels></View>"  # fmt: skip


def test_a_label_set_over_max_labels_is_refused_with_the_setting_to_change(make_client):
    client, _ = make_client()
    config = labels_config(1001)
    setup = client.post("/setup", json={"schema": config, "project": "1.1"})
    predict = client.post("/predict", json={"tasks": [boxed(1, data_url(png_bytes(noise_image(40, 40))))],
                                            "label_config": config})  # fmt: skip
    for response in (setup, predict):
        assert response.status_code == 400 and "MAX_LABELS=1000" in response.get_json()["error"]


def test_a_request_stops_at_its_deadline_and_its_work_stops_with_it(make_client):
    """1,500 labels on three boxes take the tiny model over 80 s here without a deadline; with one, 2 s."""
    client, service = make_client(PREDICT_DEADLINE_SECONDS="2", MAX_LABELS="5000", CRITIC="off")
    engine = service.slot.get(1)
    tasks = [boxed(i, data_url(png_bytes(noise_image(40, 40, i)))) for i in range(1, 4)]
    started = time.monotonic()
    response = client.post("/predict", json={"tasks": tasks, "label_config": labels_config(1500)})
    elapsed = time.monotonic() - started
    assert response.status_code == 200 and elapsed < 2 + 8, elapsed
    for result in response.get_json()["results"]:
        assert "PREDICT_DEADLINE_SECONDS=2" in result["error"]
    passes = engine.forward_passes
    time.sleep(1.0)
    assert engine.forward_passes == passes, "the model kept working after the request had answered"


class Trickle:
    """A loopback HTTP server that sends a 40-byte body one byte a second (bounded: 40 s, then it closes)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by close()
                return
            threading.Thread(target=self._trickle, args=(connection,), daemon=True).start()

    def _trickle(self, connection: socket.socket) -> None:
        with connection:
            connection.recv(65536)
            connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 40\r\n\r\n")
            for _ in range(40):
                if self.stop.wait(1.0):
                    return
                try:
                    connection.sendall(b"x")
                except OSError:
                    return

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@pytest.fixture
def trickle():
    server = Trickle()
    yield server
    server.close()


def test_a_trickling_download_is_cut_at_the_media_timeout_and_the_good_task_survives(make_client, trickle):
    client, _ = make_client(MEDIA_TIMEOUT="1.5", ALLOWED_MEDIA_HOSTS=f"127.0.0.1:{trickle.port}", CRITIC="off")
    slow = f"http://127.0.0.1:{trickle.port}/slow.png"
    tasks = [boxed(1, slow), boxed(2, slow), boxed(3, slow), boxed(4, data_url(png_bytes(noise_image(40, 40))))]
    started = time.monotonic()
    results = client.post("/predict", json={"tasks": tasks, "label_config": BOXES}).get_json()["results"]
    assert time.monotonic() - started < 3 * 1.5 + 8  # each download is cut at 1.5 s (a 40 s trickle before)
    assert all("timed out after 1.5 s" in r["error"] for r in results[:3]), results[:3]
    assert "result" in results[3]


def test_a_trickling_download_is_cut_at_the_request_deadline(make_client, trickle):
    client, _ = make_client(MEDIA_TIMEOUT="30", PREDICT_DEADLINE_SECONDS="2",
                            ALLOWED_MEDIA_HOSTS=f"127.0.0.1:{trickle.port}")  # fmt: skip
    started = time.monotonic()
    tasks = [boxed(1, f"http://127.0.0.1:{trickle.port}/slow.png")]
    result = client.post("/predict", json={"tasks": tasks, "label_config": BOXES}).get_json()["results"][0]
    assert time.monotonic() - started < 2 + 4
    assert "timed out" in result["error"]


@pytest.mark.parametrize(("cache_mb", "passes_per_crop"), [("256", 1), ("0", 2)])
def test_label_and_critic_share_one_vision_pass_per_crop_unless_the_store_is_off(make_client, cache_mb,
                                                                                  passes_per_crop):  # fmt: skip
    client, service = make_client(CRITIC="on", MLLM_IMAGE_CACHE_MB=cache_mb)
    engine = service.slot.get(1)
    tasks = [boxed(i, data_url(png_bytes(noise_image(64, 48, i)))) for i in range(1, 5)]
    before = engine.vision_passes
    results = client.post("/predict", json={"tasks": tasks, "label_config": labels_config(3)}).get_json()["results"]
    assert all(r["result"] and 0 < r["score"] < 1 for r in results)
    assert engine.vision_passes - before == passes_per_crop * len(tasks)
