"""Label Studio regions: percent (and rotated) boxes ⇄ pixel crops, and result JSON.

Label Studio stores a rectangle as ``x, y, width, height`` in percent of the image
as displayed, rotated by ``rotation`` degrees clockwise about its top-left corner.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from PIL import Image

_BOX_TYPES = {"rectanglelabels", "rectangle"}
MAX_PERCENT = 1000.0  # a box reaching ten image-widths away is not a region of this image
MODEL_IMAGE_MAX_PIXELS = 2048 * 2048  # more than most processors take in; larger crops and images shrink to it


class RegionError(ValueError):
    """A box cannot be cropped; the message says which and why."""


@dataclass(frozen=True)
class Box:
    id: str
    from_name: str
    to_name: str
    x: float
    y: float
    width: float
    height: float
    rotation: float = 0.0
    original_width: int | None = None
    original_height: int | None = None
    image_rotation: float = 0.0

    def value(self) -> dict[str, float]:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height, "rotation": self.rotation}


def box_from_region(region: dict[str, Any]) -> Box:
    """Read a rectangle region of a result list; raise :class:`RegionError` if it is not a usable box."""
    value = region.get("value")
    region_id = str(region.get("id") or "?")
    if not isinstance(value, dict):
        raise RegionError(f"box {region_id} has no value object with x/y/width/height")
    x, y, w, h = (_number(value.get(k), f"box {region_id} {k}") for k in ("x", "y", "width", "height"))
    rotation = _number(value.get("rotation") or 0.0, f"box {region_id} rotation")
    image_rotation = _number(region.get("image_rotation") or 0.0, f"box {region_id} image_rotation")
    if w <= 0 or h <= 0:
        raise RegionError(f"box {region_id} has zero or negative size ({w:g}% x {h:g}%)")
    if max(abs(x), abs(y), w, h) > MAX_PERCENT:
        raise RegionError(
            f"box {region_id} reaches {max(abs(x), abs(y), w, h):g}% of the image, past ±{MAX_PERCENT:g}%"
        )
    return Box(
        id=region_id,
        from_name=str(region.get("from_name", "")),
        to_name=str(region.get("to_name", "")),
        x=x,
        y=y,
        width=w,
        height=h,
        rotation=rotation,
        original_width=_size(region.get("original_width")),
        original_height=_size(region.get("original_height")),
        image_rotation=image_rotation,
    )


def _number(raw: object, what: str) -> float:
    """A finite number (Label Studio sends numbers; a string of digits is taken too)."""
    if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
        raise RegionError(f"{what} is not a number")
    try:
        number = float(raw)
    except (ValueError, OverflowError):
        raise RegionError(f"{what} is not a number ({str(raw)[:40]!r})") from None
    if not math.isfinite(number):
        raise RegionError(f"{what} is not a finite number")
    return number


def _size(raw: object) -> int | None:
    """An image dimension as Label Studio records it, or None when it is not a plausible one."""
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 < raw <= 10**6:
        return None
    return raw


def rectangle_regions(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rectangle regions among a result list (other result types are skipped)."""
    return [r for r in results if isinstance(r, dict) and str(r.get("type")) in _BOX_TYPES]


def pixel_corners(box: Box, image_width: int, image_height: int) -> list[tuple[float, float]]:
    """The box's four corners in image pixels: top-left, top-right, bottom-right, bottom-left."""
    x0, y0 = box.x / 100 * image_width, box.y / 100 * image_height
    w, h = box.width / 100 * image_width, box.height / 100 * image_height
    theta = math.radians(box.rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    local = [(0.0, 0.0), (w, 0.0), (w, h), (0.0, h)]
    return [(x0 + u * cos - v * sin, y0 + u * sin + v * cos) for u, v in local]


def crop_box(
    image: Image.Image, box: Box, padding: float = 0.0, min_side: int = 1, max_pixels: int = MODEL_IMAGE_MAX_PIXELS
) -> Image.Image:
    """The pixels inside ``box``, upright, with context around it.

    ``padding`` adds that fraction of the box's width/height on each side; a box smaller than
    ``min_side`` pixels grows to it. Context outside the image is clipped (unrotated boxes)
    or black (rotated boxes). A crop over ``max_pixels`` is scaled down to it, so the memory
    a box costs is bounded whatever its coordinates.
    """
    width, height = image.size
    corners = pixel_corners(box, width, height)
    xs, ys = [c[0] for c in corners], [c[1] for c in corners]
    if max(xs) <= 0 or max(ys) <= 0 or min(xs) >= width or min(ys) >= height:
        raise RegionError(f"box {box.id} lies outside the {width}x{height} image")
    box_w, box_h = box.width / 100 * width, box.height / 100 * height
    pad_x = max(padding * box_w, (min_side - box_w) / 2, 0.0)
    pad_y = max(padding * box_h, (min_side - box_h) / 2, 0.0)
    if box.rotation % 360 == 0:
        left, top = max(0, round(min(xs) - pad_x)), max(0, round(min(ys) - pad_y))
        right, bottom = min(width, round(max(xs) + pad_x)), min(height, round(max(ys) + pad_y))
        right, bottom = max(right, left + 1), max(bottom, top + 1)
        return shrink_to(image.crop((left, top, right, bottom)), max_pixels)
    full_w, full_h = box_w + 2 * pad_x, box_h + 2 * pad_y
    scale = min(1.0, math.sqrt(max_pixels / max(full_w * full_h, 1.0)))  # < 1: sample the box sparser, not bigger
    out_w, out_h = (max(1, round(side)) if scale == 1.0 else max(1, int(side * scale)) for side in (full_w, full_h))
    theta = math.radians(box.rotation)
    cos, sin = math.cos(theta) / scale, math.sin(theta) / scale
    x0, y0 = corners[0]
    # PIL maps each output pixel (u, v) to input (a*u + b*v + c, d*u + e*v + f); (pad_x, pad_y) is the box corner.
    px, py = pad_x * scale, pad_y * scale
    affine = (cos, -sin, x0 - px * cos + py * sin, sin, cos, y0 - px * sin - py * cos)
    return image.transform((out_w, out_h), Image.Transform.AFFINE, affine, Image.Resampling.BILINEAR)


def shrink_to(image: Image.Image, max_pixels: int) -> Image.Image:
    """``image`` scaled down (aspect kept) to at most ``max_pixels``, or itself when it is within."""
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    return image.resize((max(1, int(width * scale)), max(1, int(height * scale))), Image.Resampling.BILINEAR)


def box_result(box: Box, control: str, to_name: str, result_type: str, payload: dict, score: float | None) -> dict:
    """A prediction region on the user's box, keeping its id so it attaches to that box.

    ``payload`` is the control's part of the value: ``{"rectanglelabels": [...]}``,
    ``{"choices": [...]}`` or ``{"text": [...]}``.
    """
    region: dict[str, Any] = {
        "id": box.id,
        "from_name": control,
        "to_name": to_name,
        "type": result_type,
        "value": {**box.value(), **payload},
        "image_rotation": box.image_rotation,
    }
    if score is not None:
        region["score"] = score
    if box.original_width and box.original_height:
        region["original_width"] = box.original_width
        region["original_height"] = box.original_height
    return region


_LABEL_KEYS = ("rectanglelabels", "labels", "choices", "polygonlabels", "keypointlabels")


def region_labels(region: dict[str, Any] | None) -> tuple[str, ...]:
    """The labels or choices a result region carries, whatever its control type."""
    value = (region or {}).get("value")
    if not isinstance(value, dict):
        return ()
    return tuple(str(label) for key in _LABEL_KEYS if isinstance(value.get(key), list) for label in value[key])


def box_label(region: dict[str, Any]) -> str | None:
    """The label a person gave a box region, if any."""
    labels = region_labels(region)
    return labels[0] if labels else None


def choices_result(region_id: str, control: str, to_name: str, labels: list[str], score: float) -> dict:
    return {
        "id": region_id,
        "from_name": control,
        "to_name": to_name,
        "type": "choices",
        "value": {"choices": labels},
        "score": score,
    }
