"""Label Studio 1.23.2's own computer-vision templates: each connects, and what a person drew gets labels.

The configs in tests/data/label-studio-templates are copied verbatim from the label-studio package
(annotation_templates/computer-vision/*/config.yml); tests/e2e replays them in a real Label Studio.
"""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
from label_studio_sdk.converter.brush import encode_rle
from PIL import Image

from backend.labelstudio.config import UnsupportedConfig, parse_label_config
from backend.labelstudio.regions import box_from_region, crop_box, region_shape
from tests.conftest import noise_image, png_bytes

TEMPLATES = Path(__file__).resolve().parent / "data" / "label-studio-templates"
SERVED = sorted(p.stem for p in TEMPLATES.glob("*.xml") if p.stem != "pdf_ocr")
WIDTH, HEIGHT = 80, 60


def template(name: str) -> str:
    return (TEMPLATES / f"{name}.xml").read_text()


def image_url(seed: int = 0) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(WIDTH, HEIGHT, seed))).decode()


def brush_rle(left: int, top: int, right: int, bottom: int) -> list[int]:
    rgba = np.zeros((HEIGHT, WIDTH, 4), dtype=np.uint8)
    rgba[top:bottom, left:right] = 255
    return [int(b) for b in encode_rle(rgba.flatten())]


GEOMETRY = {
    "rectangle": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0},
    "polygon": {"points": [[10, 20], [40, 20], [25, 60]], "closed": True},
    "ellipse": {"x": 50, "y": 50, "radiusX": 10, "radiusY": 20, "rotation": 0},
    "keypoint": {"x": 30, "y": 40, "width": 1},
    "brush": {"format": "rle", "rle": brush_rle(8, 12, 40, 30)},
}
TOOLS = {"RectangleLabels": "rectangle", "PolygonLabels": "polygon", "EllipseLabels": "ellipse",
         "KeyPointLabels": "keypoint", "BrushLabels": "brush", "Rectangle": "rectangle",
         "Polygon": "polygon"}  # fmt: skip


def drawn_task(config: str, task_id: int = 1) -> dict:
    """A task for ``config`` as Label Studio sends it: its data, and one region per drawing tool, labelled."""
    from label_studio_sdk.label_interface import LabelInterface

    interface = LabelInterface(config)
    data: dict = {}
    for obj in interface.objects:
        key = str(obj.attr.get("valueList") or obj.value or "")[1:]
        if obj.tag == "Image":
            data[key] = [image_url(1), image_url(2)] if obj.attr.get("valueList") else image_url()
        elif obj.tag == "Text":
            data[key] = "What colour is the biggest shape?"
    result = []
    for control in interface.controls:
        value = str(control.attr.get("value") or "")
        if value.startswith("$"):
            data[value[1:]] = [{"value": "red thing"}, {"value": "blue thing"}]
        if control.tag not in TOOLS:
            continue
        shape = TOOLS[control.tag]
        kind = control.tag.lower()
        labels = {kind: [value and "red thing" or control.labels[0]]} if kind.endswith("labels") else {}
        region = {"id": f"{control.name}-1", "from_name": control.name, "to_name": control.to_name[0],
                  "type": kind, "original_width": WIDTH, "original_height": HEIGHT, "image_rotation": 0,
                  "value": {**GEOMETRY[shape], **labels}}  # fmt: skip
        if "valueList" in config:
            region["item_index"] = 1
        result.append(region)
    return {"id": task_id, "data": data, "annotations": [{"id": 1, "result": result}]}


@pytest.mark.parametrize("name", SERVED)
def test_each_image_template_connects(name):
    spec = parse_label_config(template(name))
    assert spec.region_labels or spec.image_choices or spec.image_texts


def test_a_pdf_template_is_refused_with_what_it_found():
    with pytest.raises(UnsupportedConfig, match=r"found <Pdf>, <OcrLabels>.*supports regions"):
        parse_label_config(template("pdf_ocr"))


@pytest.mark.parametrize(
    "shape, extent",
    [
        ("polygon", (10, 20, 30, 40)),
        ("ellipse", (40, 30, 20, 40)),
        ("brush", (10, 20, 40, 30)),  # columns 8-39 of 80, rows 12-29 of 60, in percent
    ],
)
def test_every_shape_is_cropped_at_its_extent(shape, extent):
    region = {"id": "r", "type": f"{shape}labels", "original_width": WIDTH, "original_height": HEIGHT,
              "value": {**GEOMETRY[shape], f"{shape}labels": ["a"]}}  # fmt: skip
    box = box_from_region(region)
    assert (box.x, box.y, box.width, box.height) == pytest.approx(extent)
    assert box.value() == GEOMETRY[shape]  # the region's own geometry, its labels left out


def test_a_rotated_ellipse_is_cropped_at_its_rotated_extent():
    square = {"id": "e", "type": "ellipse", "original_width": 100, "original_height": 100,
              "value": {"x": 50, "y": 50, "radiusX": 20, "radiusY": 5, "rotation": 90}}  # fmt: skip
    box = box_from_region(square)
    assert (box.width, box.height) == pytest.approx((10, 40))


def test_a_keypoint_crop_is_a_square_around_the_point():
    image = Image.new("RGB", (WIDTH, HEIGHT))
    region = {"id": "k", "type": "keypointlabels", "original_width": WIDTH, "original_height": HEIGHT,
              "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["nose"]}}  # fmt: skip
    crop = crop_box(image, box_from_region(region))
    assert crop.size == (6, 6)  # 10% of the shorter side (60 px)


@pytest.mark.parametrize(
    "value, message",
    [
        ({"points": []}, "points"),
        ({"points": [[1, "x"]]}, "not a number"),
        ({"format": "rle", "rle": [1, 2, 300]}, "not a byte"),
        ({"format": "rle", "rle": [0, 0, 0, 1]}, "declares 1 values"),
        ({"format": "rle", "rle": [255, 255, 255, 255, 0]}, "declares 4294967295 values"),  # never allocated
        ({"format": "rle", "rle": [0] * 1_000_001}, "over 1000000"),
        ({"format": "rle", "rle": brush_rle(8, 12, 40, 30)[:6]}, "unreadable|decodes to"),
        ({"format": "rle", "rle": brush_rle(0, 0, 0, 0)}, "empty mask"),
    ],
)
def test_a_broken_region_says_why(value, message):
    from backend.labelstudio.regions import RegionError

    kind = "brushlabels" if "rle" in value else "polygonlabels"
    with pytest.raises(RegionError, match=message):
        box_from_region({"id": "r", "type": kind, "original_width": WIDTH, "original_height": HEIGHT, "value": value})


def test_labels_on_a_shape_tool_are_read_as_that_shape():
    region = {"type": "labels", "value": {"points": [[1, 1], [5, 5], [1, 5]], "labels": ["Text"]}}
    assert region_shape(region) == "polygon"


@pytest.fixture(scope="module")
def client(tiny_llava, tmp_path_factory):
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    settings = Settings.from_env({"MLLM_MODEL": str(tiny_llava), "MODEL_DIR": str(tmp_path_factory.mktemp("md")),
                                  "CRITIC": "off"})  # fmt: skip
    service = build_service(settings)
    service.slot.get(timeout=120)
    return create_app(service).test_client()


@pytest.mark.parametrize("name", SERVED)
def test_each_image_template_predicts_what_a_person_drew(client, name):
    config = template(name)
    task = drawn_task(config)
    setup = client.post("/setup", json={"schema": config, "project": "1"})
    assert setup.status_code == 200, setup.get_json()
    response = client.post("/predict", json={"tasks": [task], "label_config": config, "project": "1"})
    assert response.status_code == 200
    [prediction] = response.get_json()["results"]
    assert "error" not in prediction, prediction
    results = prediction["result"]
    drawn = task["annotations"][0]["result"]
    spec = parse_label_config(config)
    for region in drawn:  # every drawn region keeps its id and geometry and gets a label from each of its controls
        mine = [r for r in results if r["id"] == region["id"]]
        label_controls = [t for t in spec.region_labels if region["from_name"] in t.region_controls]
        assert len([r for r in mine if r["type"] != "textarea"]) == len(label_controls), (region, results)
        for result in mine:
            geometry = {k: v for k, v in result["value"].items() if k not in {result["type"], "text"}}
            assert geometry == {k: v for k, v in region["value"].items() if not k.endswith("labels")}
            assert result.get("item_index") == region.get("item_index")
    for target in spec.image_choices:
        [result] = [r for r in results if r["from_name"] == target.control]
        assert set(result["value"]["choices"]) <= set(target.labels)
    for text in spec.image_texts:
        [result] = [r for r in results if r["from_name"] == text.control]
        assert result["to_name"] == text.to_name and result["type"] == "textarea"
        assert isinstance(result["value"]["text"][0], str) and 0 < result["score"] <= 1
    assert 0 <= prediction["score"] <= 1


def test_labels_read_from_task_data_are_the_ones_chosen_from(client):
    config = template("inventory-tracking")
    task = drawn_task(config)
    task["data"]["objects"] = [{"value": "only choice"}]
    response = client.post("/predict", json={"tasks": [task], "label_config": config, "project": "1"})
    [prediction] = response.get_json()["results"]
    assert [r["value"]["polygonlabels"] for r in prediction["result"]] == [["only choice"]]
    del task["data"]["objects"]
    response = client.post("/predict", json={"tasks": [task], "label_config": config, "project": "1"})
    assert "no label list under 'objects'" in response.get_json()["results"][0]["error"]
    task["data"]["objects"] = [{"value": f"thing {i}"} for i in range(1001)]  # past the default MAX_LABELS
    response = client.post("/predict", json={"tasks": [task], "label_config": config, "project": "1"})
    assert "1001 labels under 'objects', over MAX_LABELS=1000" in response.get_json()["results"][0]["error"]


def test_a_refused_config_says_why_in_the_status_line(client):
    """Label Studio shows str(HTTPError), which carries the reason phrase and never the body."""
    from backend.server import reason_phrase

    response = client.post("/setup", json={"schema": template("pdf_ocr"), "project": "1"})
    assert response.status_code == 400
    assert "this backend labels images only (found <Pdf>, <OcrLabels>)" in response.get_json()["error"]
    assert "this backend labels images only (found Pdf, OcrLabels)" in response.status  # the dialog renders HTML
    assert response.status == f"400 {reason_phrase(response.get_json()['error'])}"


def test_a_reason_phrase_is_one_line_of_printable_ascii():
    from backend.server import REASON_MAX_CHARS, reason_phrase

    assert reason_phrase("bad\r\nSet-Cookie: x=1\tgo") == "bad Set-Cookie: x=1 go"  # no response splitting
    assert reason_phrase("猫 label") == "? label"
    # Label Studio's connect dialog renders it as HTML: a tag name in brackets would vanish
    assert reason_phrase("found <Audio>, <Image/> and x<y") == "found Audio, Image/ and x y"
    assert len(reason_phrase("x" * 5000)) == REASON_MAX_CHARS


TAXONOMY = """<View><Image name="image" value="$image"/>
  <Rectangle name="box" toName="image"/>
  <Taxonomy name="kind" toName="image"><Choice value="Animal"><Choice value="Cat"/><Choice value="Dog"/></Choice>
    <Choice value="Plant"/></Taxonomy>
  <Taxonomy name="part" toName="image" perRegion="true"><Choice value="Head"/><Choice value="Body">
    <Choice value="Leg"/></Choice></Taxonomy>
</View>"""


def test_taxonomy_answers_a_path_for_the_image_and_for_each_region(client):
    task = {
        "id": 1,
        "data": {"image": image_url()},
        "annotations": [
            {
                "result": [
                    {
                        "id": "r1",
                        "from_name": "box",
                        "to_name": "image",
                        "type": "rectangle",
                        "value": GEOMETRY["rectangle"],
                    }
                ]
            }
        ],
    }
    response = client.post("/predict", json={"tasks": [task], "label_config": TAXONOMY, "project": "1"})
    [prediction] = response.get_json()["results"]
    by_control = {r["from_name"]: r for r in prediction["result"]}
    assert by_control["kind"]["type"] == "taxonomy"
    assert by_control["kind"]["value"]["taxonomy"][0] in [["Animal", "Cat"], ["Animal", "Dog"], ["Plant"]]
    assert by_control["part"]["id"] == "r1" and by_control["part"]["value"]["x"] == 10
    assert by_control["part"]["value"]["taxonomy"][0] in [["Head"], ["Body", "Leg"]]


def test_a_multi_page_region_trains_on_its_own_page():
    from backend.labelstudio.export import labelled_items

    config = template("multipage-documents")
    task = drawn_task(config)
    [item] = labelled_items(task, parse_label_config(config))
    assert item.image_url == task["data"]["pages"][1] and item.box.item_index == 1
