"""A checkpoint that cannot serve is refused when it loads, with the reason and the fix; non-finite scores never
reach a response. Real tiny checkpoints through ``from_pretrained``, altered the way real ones differ."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import noise_image, png_bytes

CONFIG = ('<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="cat"/>'
          '<Choice value="dog"/></Choices></View>')  # fmt: skip


def _variant(tiny_llava: Path, tmp_path: Path, change) -> Path:
    checkpoint = tmp_path / "variant"
    shutil.copytree(tiny_llava, checkpoint)
    change(checkpoint)
    return checkpoint


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _service(checkpoint: Path, tmp_path: Path, **env: str):
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    settings = Settings.from_env({"MLLM_MODEL": str(checkpoint), "MODEL_DIR": str(tmp_path / "md"), **env})
    service = build_service(settings)
    return create_app(service).test_client(), service


def _health_after_load(client, service) -> tuple[int, dict]:
    service.slot.start()
    service.slot._ready.wait(120)
    response = client.get("/health")
    return response.status_code, response.get_json()


def _without_template(checkpoint: Path) -> None:
    (checkpoint / "chat_template.jinja").unlink()
    for name in ("tokenizer_config.json", "processor_config.json"):
        config = json.loads((checkpoint / name).read_text())
        config.pop("chat_template", None)
        (checkpoint / name).write_text(json.dumps(config))


def test_a_checkpoint_without_a_chat_template_is_down_with_the_fix_and_serves_with_one(tiny_llava, tmp_path):
    checkpoint = _variant(tiny_llava, tmp_path, _without_template)
    status, health = _health_after_load(*_service(checkpoint, tmp_path))
    assert status == 503 and health["status"] == "DOWN", health
    assert "has no chat template" in health["error"] and "MLLM_CHAT_TEMPLATE" in health["error"]
    client, service = _service(checkpoint, tmp_path, MLLM_CHAT_TEMPLATE=str(tiny_llava / "chat_template.jinja"))
    assert _health_after_load(client, service)[0] == 200
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(32, 32))).decode()
    [result] = client.post("/predict", json={"tasks": [{"id": 1, "data": {"image": image}}],
                                             "label_config": CONFIG}).get_json()["results"]  # fmt: skip
    assert result["result"][0]["value"]["choices"][0] in {"cat", "dog"}, result


def test_an_encoder_decoder_checkpoint_is_refused_at_load(tiny_llava, tmp_path):
    checkpoint = _variant(tiny_llava, tmp_path, lambda c: _edit_json(c / "config.json", is_encoder_decoder=True))
    status, health = _health_after_load(*_service(checkpoint, tmp_path))
    assert status == 503 and "encoder-decoder" in health["error"], health


def test_a_chat_template_that_is_not_a_file_is_a_settings_error():
    from backend.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="MLLM_CHAT_TEMPLATE='/nowhere.jinja' is not a file"):
        Settings.from_env({"MLLM_MODEL": "m", "MLLM_CHAT_TEMPLATE": "/nowhere.jinja"})


def test_infinite_logits_give_the_tasks_an_error_never_a_nan_score_or_a_500(tiny_llava, tmp_path):
    """What float16 overflow does on a GPU without bf16, injected: the model's logits become infinite."""
    client, service = _service(tiny_llava, tmp_path, CRITIC="off")
    engine = service.slot.get(timeout=120)
    engine.model.lm_head.register_forward_hook(lambda module, args, output: torch.full_like(output, float("inf")))
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(32, 32))).decode()
    tasks = [{"id": n, "data": {"image": image}} for n in (1, 2)]
    response = client.post("/predict", json={"tasks": tasks, "label_config": CONFIG})
    assert response.status_code == 200
    body = json.loads(response.get_data(as_text=True), parse_constant=lambda c: pytest.fail(f"{c} in the answer"))
    assert [("non-finite scores" in r.get("error", "")) for r in body["results"]] == [True, True], body


def test_health_says_when_the_image_prefix_store_is_smaller_than_one_prefix(make_client):
    client, service = make_client(MLLM_IMAGE_CACHE_MB="1")
    engine = service.slot.loaded
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(32, 32))).decode()
    ask = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": CONFIG}
    assert client.post("/predict", json=ask).status_code == 200
    assert len(engine.image_prefixes) == 1 and not client.get("/health").get_json()["warnings"]
    engine.image_prefixes.clear()
    engine.image_prefixes.budget_bytes = 64  # a tiny model's prefix is kilobytes; a 7B model's is ~290 MiB
    ask["tasks"][0]["data"]["image"] = (
        "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(32, 32, 1))).decode()
    )
    assert client.post("/predict", json=ask).status_code == 200
    [warning] = client.get("/health").get_json()["warnings"]
    assert len(engine.image_prefixes) == 0
    assert "the annotator: the image prefix store" in warning and "stores nothing" in warning
    assert "MLLM_IMAGE_CACHE_MB to at least 8" in warning  # 1 MiB (rounded up) a prefix, 8 images
