"""The shapes world: reproducible from its seed, versioned, and its files are what Label Studio and the backend read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from backend.labelstudio.config import parse_label_config
from backend.labelstudio.regions import box_from_region, crop_box
from backend.shapes.world import CLASSES, COLOURS, KINDS, WORLD_VERSION, generate_world, write_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("world"), tasks=30, seed=2000)


def test_the_same_seed_gives_the_same_world_and_another_seed_another(tmp_path):
    a = generate_world(tasks=5, seed=2001)
    b = generate_world(tasks=5, seed=2001)
    c = generate_world(tasks=5, seed=2002)
    assert [s for s, _ in a] == [s for s, _ in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for (_, x), (_, y) in zip(a, b, strict=True))
    assert [s for s, _ in a] != [s for s, _ in c]


def test_every_file_carries_the_generator_version(world):
    truth = json.loads((world.root / "truth.json").read_text())
    assert truth["world_version"] == WORLD_VERSION and truth["seed"] == 2000 and len(truth["scenes"]) == 30
    for kind in KINDS:
        tasks = json.loads(world.projects[kind][1].read_text())
        assert {t["data"]["world_version"] for t in tasks} == {WORLD_VERSION}


def test_the_world_has_what_measuring_needs(world):
    scenes = world.scenes
    shapes = [s for scene in scenes for s in scene.shapes]
    counts = [len(scene.shapes) for scene in scenes]
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) >= 4
    assert {s.cls for s in shapes} == set(CLASSES) and len({s.colour for s in shapes}) == len(COLOURS)
    assert any(s.rotation for s in shapes) and any(not s.rotation for s in shapes)
    assert any(s.width < 12 for s in shapes), "some shapes are small"
    assert any(scene.attributes["Overlapping"] for scene in scenes)
    assert len({scene.background for scene in scenes}) >= 3


def test_every_project_kind_is_one_the_backend_serves(world):
    for kind in KINDS:
        spec = parse_label_config(world.projects[kind][0].read_text())
        assert spec.region_labels or spec.image_choices, kind
    tags = parse_label_config(world.projects["tags"][0].read_text()).image_choices[0]
    assert tags.multiple and len(dict(tags.groups)) == len(CLASSES) and len(dict(tags.hints)) == len(CLASSES)


def test_a_ground_truth_box_crops_its_own_shape(world):
    """Read back through the backend's own region reader: the crop's commonest colour is the shape's."""
    from PIL import Image

    from backend.shapes.world import COLOURS as RGB

    tasks = json.loads(world.projects["boxes"][1].read_text())
    checked = 0
    for task, scene in zip(tasks, world.scenes, strict=True):
        image = Image.open(world.root / "images" / f"{scene.name}.png").convert("RGB")
        for region, shape in zip(task["annotations"][0]["result"], scene.shapes, strict=True):
            if shape.texture != "solid" or scene.attributes["Overlapping"]:
                continue
            crop = np.asarray(crop_box(image, box_from_region(region))).reshape(-1, 3).astype(int)
            distance = np.abs(crop - np.array(RGB[shape.colour])).sum(axis=1)
            assert (distance < 60).mean() > 0.3, (scene.name, shape)
            checked += 1
    assert checked >= 10


@pytest.mark.parametrize("kind", ["polygons", "ellipses", "keypoints", "masks"])
def test_every_region_kind_draws_around_the_same_shape(world, kind):
    """Each shape drawn as a polygon, ellipse, keypoint or mask sits where its box is: the extents agree."""
    from backend.labelstudio.regions import pixel_corners

    boxes = json.loads(world.projects["boxes"][1].read_text())
    regions = json.loads(world.projects[kind][1].read_text())
    for boxed, drawn, scene in zip(boxes, regions, world.scenes, strict=True):
        pairs = zip(boxed["annotations"][0]["result"], drawn["annotations"][0]["result"], scene.shapes, strict=True)
        for box_region, region, shape in pairs:
            assert region["id"] == box_region["id"] and region["type"].endswith("labels")
            size = np.array([scene.width, scene.height])
            corners = np.array(pixel_corners(box_from_region(box_region), scene.width, scene.height)) / size * 100
            (left, top), (right, bottom) = corners.min(axis=0), corners.max(axis=0)
            got = box_from_region(region)
            if kind in {"polygons", "masks"}:  # a traced outline or painted pixels: inside the object's box
                assert left - 3 <= got.x and got.x + got.width <= right + 3, (kind, region["id"])
                assert top - 3 <= got.y and got.y + got.height <= bottom + 3, (kind, region["id"])
                assert got.width >= (right - left) / 3 and got.height >= (bottom - top) / 3
            else:  # a keypoint on the object's centre; an ellipse around it
                centre = (got.x + got.width / 2, got.y + got.height / 2)
                assert centre == pytest.approx(((left + right) / 2, (top + bottom) / 2), abs=2), (kind, region["id"])
            if kind == "ellipses" and shape.cls not in {"circle", "ellipse"}:  # around the object, not inside it
                assert got.width >= right - left - 3 and got.height >= bottom - top - 3


def test_the_backend_predicts_world_tasks_as_label_studio_sends_them(world, make_client):
    client, _ = make_client(CRITIC="off")
    for kind in ("boxes", "tags", "attributes"):
        config = world.projects[kind][0].read_text()
        tasks = [{"id": i + 1, **task} for i, task in enumerate(json.loads(world.projects[kind][1].read_text())[:3])]
        results = client.post("/predict", json={"tasks": tasks, "label_config": config}).get_json()["results"]
        assert all("result" in r for r in results), (kind, results)  # random weights: tags may be none
