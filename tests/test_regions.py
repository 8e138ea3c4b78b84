from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from backend.labelstudio.protocol import project_id
from backend.labelstudio.regions import (
    RegionError,
    box_from_region,
    box_result,
    crop_box,
    pixel_corners,
)
from backend.labelstudio.tasks import user_regions


def region(x=10.0, y=20.0, width=30.0, height=40.0, rotation=0.0, **extra):
    return {
        "id": "r1",
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": 100,
        "original_height": 50,
        "image_rotation": 0,
        "value": {"x": x, "y": y, "width": width, "height": height, "rotation": rotation, "rectanglelabels": ["Cat"]},
        **extra,
    }


def painted(size, box, colour=(255, 0, 0)):
    image = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(image).rectangle(box, fill=colour)
    return image


def test_percent_box_crops_exactly_the_pixels_it_covers():
    image = painted((100, 50), (10, 10, 39, 29))  # inclusive corners: 30 x 20 pixels
    crop = crop_box(image, box_from_region(region()))
    assert crop.size == (30, 20)
    assert (np.asarray(crop) == [255, 0, 0]).all()


def test_rotated_box_is_cut_out_upright():
    # 90° clockwise about the top-left corner (50, 10): width runs down, height runs left.
    image = painted((100, 100), (40, 10, 49, 39))
    box = box_from_region(region(x=50, y=10, width=30, height=10, rotation=90))
    corners = pixel_corners(box, 100, 100)
    assert corners[0] == pytest.approx((50, 10))
    assert corners[2] == pytest.approx((40, 40))
    crop = np.asarray(crop_box(image, box)).astype(int)
    assert crop.shape[:2] == (10, 30)  # upright: width 30, height 10
    assert (crop[1:-1, 1:-1, 0] > 200).mean() > 0.95


def test_box_partly_outside_is_clipped_and_box_fully_outside_is_refused():
    image = Image.new("RGB", (100, 50))
    assert crop_box(image, box_from_region(region(x=90, y=0, width=30, height=10))).size == (10, 5)
    with pytest.raises(RegionError, match="outside"):
        crop_box(image, box_from_region(region(x=150, y=0, width=10, height=10)))


@pytest.mark.parametrize(
    "value, message",
    [
        ({"width": 0}, "zero or negative size"),
        ({"height": -5}, "zero or negative size"),
        ({"x": float("nan")}, "x is not a finite number"),
        ({"rotation": float("inf")}, "rotation is not a finite number"),
        ({"x": "left"}, "x is not a number"),
        ({"y": [1]}, "y is not a number"),
        ({"width": 1e4}, "past ±1000%"),
    ],
)
def test_degenerate_boxes_are_refused_with_the_reason(value, message):
    bad = region()
    bad["value"].update(value)
    with pytest.raises(RegionError, match=message):
        box_from_region(bad)


def test_tiny_box_still_gives_one_pixel():
    image = Image.new("RGB", (100, 50))
    assert crop_box(image, box_from_region(region(width=0.2, height=0.2))).size == (1, 1)


def test_result_keeps_the_users_region_id_and_geometry():
    box = box_from_region(region(rotation=15))
    result = box_result(box, "label", "image", "rectanglelabels", {"rectanglelabels": ["Dog"]}, 0.75)
    assert result["id"] == "r1"
    assert result["value"] == {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 15, "rectanglelabels": ["Dog"]}
    assert (result["original_width"], result["original_height"], result["score"]) == (100, 50, 0.75)
    per_region = box_result(box, "kind", "image", "choices", {"choices": ["A"]}, 0.5)
    assert per_region["value"]["choices"] == ["A"] and per_region["type"] == "choices"


def test_boxes_come_from_context_first_then_the_latest_annotation_or_draft():
    old = {"updated_at": "2026-01-01", "result": [region(id="old")]}
    new = {"updated_at": "2026-02-01", "result": [region(id="new")]}
    cancelled = {"updated_at": "2026-03-01", "was_cancelled": True, "result": [region(id="skip")]}
    task = {"annotations": [old, cancelled], "drafts": [new]}
    assert [r["id"] for r in user_regions(task, None)] == ["new"]
    assert [r["id"] for r in user_regions(task, {"result": [region(id="drawn")]})] == ["drawn"]
    assert user_regions({"annotations": [{"result": [{"type": "choices", "value": {}}]}]}, None) == []


def test_project_id_reads_label_studios_project_string():
    assert project_id("12.1795311428") == 12
    assert project_id(None) is None and project_id("abc") is None


def test_context_padding_and_minimum_side_are_added_around_the_box():
    image = Image.new("RGB", (100, 50))
    box = box_from_region(region(x=40, y=40, width=10, height=10))  # 10 x 5 pixels
    assert crop_box(image, box, padding=0.5).size == (20, 10)
    assert crop_box(image, box, min_side=16).size == (16, 16)
    at_edge = box_from_region(region(x=90, y=40, width=10, height=10))  # pixels 90-100 wide
    assert crop_box(image, at_edge, min_side=40).size == (25, 40)  # clipped at the image's right edge
    rotated = box_from_region(region(x=40, y=20, width=10, height=10, rotation=30))
    assert crop_box(image, rotated, min_side=16).size == (16, 16)


def test_rotated_crop_with_padding_keeps_the_box_centred():
    image = painted((100, 100), (40, 10, 49, 39))
    box = box_from_region(region(x=50, y=10, width=30, height=10, rotation=90))
    crop = np.asarray(crop_box(image, box, padding=0.2)).astype(int)
    assert crop.shape[:2] == (14, 42)
    assert (crop[3:-3, 7:-7, 0] > 200).mean() > 0.9  # the box itself, inside the context
    assert (crop[0, :, 0] < 50).all()  # the context row above it is background
