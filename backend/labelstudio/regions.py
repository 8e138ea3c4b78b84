"""Label Studio regions: the shapes a person draws ⇄ pixel crops, and result JSON.

Every region is read into a :class:`Box`, the rectangle that is cropped for the model,
and keeps its own geometry so predictions attach to it unchanged:

- rectangle: ``x, y, width, height`` in percent of the image as displayed, rotated by
  ``rotation`` degrees clockwise about its top-left corner (the box is the rectangle);
- polygon: ``points`` ``[[x, y], ...]`` in percent (the box is their extent);
- ellipse: centre ``x, y`` and ``radiusX, radiusY`` in percent, rotated by ``rotation``
  (the box is the rotated ellipse's extent);
- keypoint: ``x, y`` in percent (the box is a square around it, ``KEYPOINT_CONTEXT`` of the
  image's shorter side);
- brush: a mask in Label Studio's RLE (``format: "rle"``, ``rle: [...]``) over
  ``original_width x original_height`` pixels (the box is the painted pixels' extent).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

SHAPES = ("rectangle", "polygon", "ellipse", "keypoint", "brush")
_SHAPE_TYPES = {*SHAPES, *(f"{shape}labels" for shape in SHAPES), "labels"}  # "labels": <Labels> on a shape tool
_LABEL_KEYS = (*(f"{shape}labels" for shape in SHAPES), "labels", "choices", "taxonomy")
KEYPOINT_CONTEXT = 0.1  # a keypoint's crop: this share of the image's shorter side, centred on the point
MAX_MASK_PIXELS = 50_000_000  # a brush mask larger than this is not decoded (4 bytes a pixel)
MAX_RLE_BYTES = 1_000_000  # label-studio-sdk decodes bit by bit in Python: this bounds its time (seconds)
MAX_POINTS = 10_000
MAX_PERCENT = 1000.0  # a box reaching ten image-widths away is not a region of this image
MODEL_IMAGE_MAX_PIXELS = 2048 * 2048  # more than most processors take in; larger crops and images shrink to it


class RegionError(ValueError):
    """A box cannot be cropped; the message says which and why."""


@dataclass(frozen=True)
class Box:
    """A region as the rectangle cropped for the model, with the region's own geometry to write results on."""

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
    shape: str = "rectangle"
    geometry: dict[str, Any] | None = field(default=None, compare=False)  # the region's value without labels
    item_index: int | None = None  # which image of a multi-image (<Image valueList>) task

    def value(self) -> dict[str, Any]:
        if self.geometry is not None:
            return dict(self.geometry)
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height, "rotation": self.rotation}


def region_shape(region: dict[str, Any]) -> str | None:
    """Which shape a result region is ("rectangle", "polygon", ...), or None when it is not a drawn region."""
    kind = str(region.get("type", ""))
    if kind not in _SHAPE_TYPES:
        return None
    if kind != "labels":
        return kind.removesuffix("labels")
    value = region.get("value") if isinstance(region.get("value"), dict) else {}
    if "rle" in value:
        return "brush"
    if "points" in value:
        return "polygon"
    if "radiusX" in value:
        return "ellipse"
    return "rectangle" if "height" in value else "keypoint"


def on_region(result: dict[str, Any] | None) -> bool:
    """Whether a result belongs to a drawn region (its value carries geometry), not to the whole image."""
    value = (result or {}).get("value")
    return isinstance(value, dict) and any(key in value for key in ("x", "points", "rle"))


def box_from_region(region: dict[str, Any]) -> Box:
    """Read a drawn region of a result list; raise :class:`RegionError` if it is not a usable one."""
    value = region.get("value")
    region_id = str(region.get("id") or "?")
    shape = region_shape(region) or "rectangle"
    if not isinstance(value, dict):
        raise RegionError(f"{shape} {region_id} has no value object")
    what = f"{shape} {region_id}"
    width_px, height_px = _size(region.get("original_width")), _size(region.get("original_height"))
    x, y, w, h, rotation = _EXTENTS[shape](value, what, width_px, height_px)
    if shape == "rectangle":
        rotation = _number(value.get("rotation") or 0.0, f"{what} rotation")
    image_rotation = _number(region.get("image_rotation") or 0.0, f"{what} image_rotation")
    if w <= 0 or h <= 0:
        raise RegionError(f"{what} has zero or negative size ({w:g}% x {h:g}%)")
    if max(abs(x), abs(y), w, h) > MAX_PERCENT:
        raise RegionError(f"{what} reaches {max(abs(x), abs(y), w, h):g}% of the image, past ±{MAX_PERCENT:g}%")
    geometry = None if shape == "rectangle" else {k: v for k, v in value.items() if k not in _LABEL_KEYS}
    return Box(
        id=region_id,
        from_name=str(region.get("from_name", "")),
        to_name=str(region.get("to_name", "")),
        x=x,
        y=y,
        width=w,
        height=h,
        rotation=rotation,
        original_width=width_px,
        original_height=height_px,
        image_rotation=image_rotation,
        shape=shape,
        geometry=geometry,
        item_index=_index(region.get("item_index"), what),
    )


Extent = tuple[float, float, float, float, float]  # x, y, width, height (percent), rotation


def _rectangle_extent(value: dict, what: str, _w: int | None, _h: int | None) -> Extent:
    x, y, w, h = (_number(value.get(k), f"{what} {k}") for k in ("x", "y", "width", "height"))
    return x, y, w, h, 0.0


def _polygon_extent(value: dict, what: str, _w: int | None, _h: int | None) -> Extent:
    points = value.get("points")
    if not isinstance(points, list) or not points or len(points) > MAX_POINTS:
        raise RegionError(f"{what} needs points: a list of 1 to {MAX_POINTS} [x, y] pairs in percent")
    if not all(isinstance(p, list) and len(p) == 2 for p in points):
        raise RegionError(f"{what} has a point that is not an [x, y] pair")
    xs = [_number(p[0], f"{what} point x") for p in points]
    ys = [_number(p[1], f"{what} point y") for p in points]
    return min(xs), min(ys), max(max(xs) - min(xs), 1e-3), max(max(ys) - min(ys), 1e-3), 0.0


def _ellipse_extent(value: dict, what: str, width_px: int | None, height_px: int | None) -> Extent:
    cx, cy, rx, ry = (_number(value.get(k), f"{what} {k}") for k in ("x", "y", "radiusX", "radiusY"))
    theta = math.radians(_number(value.get("rotation") or 0.0, f"{what} rotation"))
    # Rotation happens in pixels, so the radii are taken to pixels (by the image's aspect) and back.
    aspect = (width_px / height_px) if width_px and height_px else 1.0
    rx_px, ry_px = rx * aspect, ry  # in units of the image height's percent
    half_x = math.hypot(rx_px * math.cos(theta), ry_px * math.sin(theta)) / aspect
    half_y = math.hypot(rx_px * math.sin(theta), ry_px * math.cos(theta))
    return cx - half_x, cy - half_y, 2 * half_x, 2 * half_y, 0.0


def _keypoint_extent(value: dict, what: str, width_px: int | None, height_px: int | None) -> Extent:
    x, y = (_number(value.get(k), f"{what} {k}") for k in ("x", "y"))
    aspect = (width_px / height_px) if width_px and height_px else 1.0
    side_x = 100 * KEYPOINT_CONTEXT * min(1.0, 1 / aspect)  # a square in pixels: the shorter side sets it
    side_y = 100 * KEYPOINT_CONTEXT * min(1.0, aspect)
    return x - side_x / 2, y - side_y / 2, side_x, side_y, 0.0


def _brush_extent(value: dict, what: str, width_px: int | None, height_px: int | None) -> Extent:
    if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
        raise RegionError(f"{what} has no mask: Label Studio brush regions carry format 'rle' and an rle list")
    if not width_px or not height_px:
        raise RegionError(f"{what} has no original_width/original_height, which its mask needs")
    if width_px * height_px > MAX_MASK_PIXELS:
        raise RegionError(f"{what} is a {width_px}x{height_px} mask, over {MAX_MASK_PIXELS} pixels")
    alpha = decode_mask(value["rle"], width_px, height_px, what)
    rows, cols = np.nonzero(alpha)
    if rows.size == 0:
        raise RegionError(f"{what} is an empty mask")
    left, top, right, bottom = int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1
    return (100 * left / width_px, 100 * top / height_px, 100 * (right - left) / width_px,
            100 * (bottom - top) / height_px, 0.0)  # fmt: skip


_EXTENTS = {"rectangle": _rectangle_extent, "polygon": _polygon_extent, "ellipse": _ellipse_extent,
            "keypoint": _keypoint_extent, "brush": _brush_extent}  # fmt: skip


def decode_mask(rle: list, width: int, height: int, what: str = "mask") -> np.ndarray:
    """A Label Studio brush RLE → its painted-ness (the RGBA alpha channel), shape (height, width)."""
    from label_studio_sdk.converter.brush import decode_rle

    if len(rle) > MAX_RLE_BYTES:
        raise RegionError(f"{what} has an rle of {len(rle)} bytes, over {MAX_RLE_BYTES}")
    if not all(isinstance(b, int) and not isinstance(b, bool) and 0 <= b <= 255 for b in rle):
        raise RegionError(f"{what} has an rle entry that is not a byte (0-255)")
    declared = int.from_bytes(bytes(rle[:4]), "big")  # the value count the decoder allocates before reading on
    if declared != width * height * 4:
        raise RegionError(f"{what} declares {declared} values, not {width}x{height}x4 (RGBA)")
    try:
        flat = decode_rle(rle)
    except Exception as exc:  # a truncated or forged bit stream
        raise RegionError(f"{what} has an unreadable rle ({type(exc).__name__})") from None
    if flat.size != width * height * 4:
        raise RegionError(f"{what} decodes to {flat.size} values, not {width}x{height}x4 (RGBA)")
    return flat.reshape(height, width, 4)[:, :, 3]


def _index(raw: object, what: str) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw < 10_000:
        raise RegionError(f"{what} has item_index {str(raw)[:20]}, not an image number from 0")
    return raw


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


def drawn_regions(results: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The drawn regions among a result list, one per region id (a region's labels and shape can be two results)."""
    regions: dict[str, dict[str, Any]] = {}
    for result in results:
        if not isinstance(result, dict) or region_shape(result) is None:
            continue
        key = str(result.get("id"))
        if key not in regions or (not region_labels(regions[key]) and region_labels(result)):
            regions[key] = result  # the entry with the person's label wins
    return list(regions.values())


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


REGION_VIEWS = ("crop", "context")  # a region shown as its crop, or as the whole image with its box outlined
OUTLINE_COLOUR = (255, 0, 0)  # "the red box": the mark vision-language models are commonly asked about


def outline_box(image: Image.Image, box: Box, *, colour: tuple[int, int, int] = OUTLINE_COLOUR) -> Image.Image:
    """A copy of the whole ``image`` with ``box`` drawn on it (rotated boxes as rotated), for asking about a
    region in its context. The line is about 1/50 of the image's longer side (at least 2 px), so it survives the
    downscaling a vision tower applies."""
    from PIL import ImageDraw

    outlined = image.convert("RGB")  # a copy: the caller's image stays as it is
    line = max(2, round(max(image.size) / 50))
    corners = pixel_corners(box, *image.size)
    cx, cy = (corners[0][0] + corners[2][0]) / 2, (corners[0][1] + corners[2][1]) / 2
    # the line runs just outside the box, so a small object is not painted over
    corners = [(x + line * _unit(x - cx), y + line * _unit(y - cy)) for x, y in corners]
    ImageDraw.Draw(outlined).polygon(corners, outline=colour, width=line)
    return outlined


def _unit(delta: float) -> float:
    return math.copysign(1.0, delta) if delta else 0.0


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
    if box.item_index is not None:
        region["item_index"] = box.item_index
    return region


def region_labels(region: dict[str, Any] | None) -> tuple[str, ...]:
    """The labels or choices a result region carries, whatever its control type."""
    value = (region or {}).get("value")
    if not isinstance(value, dict):
        return ()
    labels = (label for key in _LABEL_KEYS if isinstance(value.get(key), list) for label in value[key])
    return tuple(" / ".join(map(str, label)) if isinstance(label, list) else str(label) for label in labels)


def box_label(region: dict[str, Any]) -> str | None:
    """The label a person gave a box region, if any."""
    labels = region_labels(region)
    return labels[0] if labels else None


LABEL_SCORES = "label_scores"  # a result's key for every label's probability (multiple-choice tags), kept or not
OUT_OF_SET = "out_of_set"  # a result's key for an open-world answer outside the label set (a candidate new class)


def label_scores(result: dict[str, Any]) -> dict[str, float] | None:
    """A result's per-label probabilities, if it carries well-formed ones."""
    scores = result.get(LABEL_SCORES)
    if not isinstance(scores, dict):
        return None
    kept = {str(k): float(v) for k, v in scores.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return kept or None


def image_result(control: str, to_name: str, result_type: str, value: dict, score: float | None = None) -> dict:
    """A prediction for a whole image (or a question object), not a region: the control's name is its id."""
    result = {"id": control, "from_name": control, "to_name": to_name, "type": result_type, "value": value}
    if score is not None:
        result["score"] = score
    return result


def text_result(control: str, to_name: str, text: str, score: float | None) -> dict:
    return image_result(control, to_name, "textarea", {"text": [text]}, score)
