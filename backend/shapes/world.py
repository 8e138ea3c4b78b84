"""A synthetic world of coloured shapes where every answer is known.

Each scene holds 1-6 shapes from eight classes in four super-categories, each with a
fine-grained variant (texture and colour, e.g. "striped red circle"), on a plain, dark,
gradient or noisy background, at varied sizes (some small), sometimes overlapping, some
drawn rotated (and boxed with Label Studio's rotated rectangles). The confusable pairs are
deliberate: circle/ellipse and square/rectangle differ only in aspect ratio, orange sits
between red and yellow, and small shapes lose their details, so a small model makes
honest mistakes.

``write_world`` writes the images, a Label Studio import file with the ground truth as
annotations and the matching label config for each kind of project, and ``truth.json``.
``WORLD_VERSION`` is written into all of them: change the generator, bump it, and old
figures are never compared with new ones silently.
"""

from __future__ import annotations

import base64
import io
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

WORLD_VERSION = "shapes-world-2"  # 2: polygon, ellipse, keypoint and mask projects (the scenes are unchanged)

GROUPS: dict[str, tuple[str, ...]] = {
    "round": ("circle", "ellipse"),
    "four-sided": ("square", "rectangle"),
    "pointed": ("triangle", "diamond"),
    "spiky": ("star", "cross"),
}
CLASSES: tuple[str, ...] = tuple(c for members in GROUPS.values() for c in members)
GROUP_OF = {c: group for group, members in GROUPS.items() for c in members}
DEFINITIONS = {
    "circle": "a round shape exactly as wide as it is tall",
    "ellipse": "an oval: round, but clearly longer in one direction than the other",
    "square": "four straight sides of equal length meeting at right angles",
    "rectangle": "four straight sides at right angles, clearly longer than it is wide",
    "triangle": "three straight sides and three corners",
    "diamond": "four equal sides standing on a corner, like a rhombus",
    "star": "five sharp points around a centre",
    "cross": "a plus sign: two bars crossing at right angles",
}
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 39, 40),
    "orange": (240, 128, 20),
    "yellow": (232, 206, 30),
    "green": (44, 160, 44),
    "blue": (31, 90, 220),
    "purple": (148, 60, 189),
}
TEXTURES = ("solid", "striped", "dotted")
ATTRIBUTES = {
    "Crowded": "four or more shapes",
    "Dark": "a dark background",
    "Overlapping": "at least two shapes overlap",
}
ROTATABLE = {"ellipse", "rectangle", "triangle", "star", "cross"}  # a rotated square would be a diamond
SIZES = ((160, 120), (128, 128), (144, 112))


@dataclass(frozen=True)
class Shape:
    """One object: its class, fine-grained variant and Label Studio box (percent, rotated about its corner)."""

    id: str
    cls: str
    colour: str
    texture: str
    x: float
    y: float
    width: float
    height: float
    rotation: float

    @property
    def group(self) -> str:
        return GROUP_OF[self.cls]

    @property
    def fine_name(self) -> str:
        return f"{self.texture} {self.colour} {self.cls}"

    def value(self) -> dict[str, float]:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height, "rotation": self.rotation}


@dataclass(frozen=True)
class Scene:
    name: str
    width: int
    height: int
    background: str  # plain, dark, gradient, noise
    shapes: tuple[Shape, ...]

    @property
    def tags(self) -> tuple[str, ...]:
        """The classes present, in the label set's order."""
        present = {s.cls for s in self.shapes}
        return tuple(c for c in CLASSES if c in present)

    @property
    def largest(self) -> str:
        return max(self.shapes, key=lambda s: s.width * self.width * s.height * self.height).cls

    @property
    def attributes(self) -> dict[str, bool]:
        return {"Crowded": len(self.shapes) >= 4, "Dark": self.background == "dark",
                "Overlapping": _any_overlap(self)}  # fmt: skip


def _corners(shape: Shape, width: int, height: int) -> np.ndarray:
    x0, y0 = shape.x / 100 * width, shape.y / 100 * height
    w, h = shape.width / 100 * width, shape.height / 100 * height
    theta = math.radians(shape.rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    return np.array([(x0 + u * cos - v * sin, y0 + u * sin + v * cos) for u, v in ((0, 0), (w, 0), (w, h), (0, h))])


def _extent(shape: Shape, width: int, height: int) -> tuple[float, float, float, float]:
    corners = _corners(shape, width, height)
    return corners[:, 0].min(), corners[:, 1].min(), corners[:, 0].max(), corners[:, 1].max()


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Intersection over the smaller area of two axis-aligned extents."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _any_overlap(scene: Scene) -> bool:
    extents = [_extent(s, scene.width, scene.height) for s in scene.shapes]
    return any(_overlap(a, b) > 0 for i, a in enumerate(extents) for b in extents[i + 1 :])


def generate_scene(rng: np.random.Generator, *, name: str) -> Scene:
    """One random scene; the same generator state gives the same scene."""
    width, height = SIZES[rng.integers(len(SIZES))]
    background = str(rng.choice(["plain", "plain", "dark", "gradient", "noise"]))
    count = int(rng.integers(1, 7))
    shapes: list[Shape] = []
    extents: list[tuple[float, float, float, float]] = []
    for _ in range(count * 20):  # bounded attempts; a crowded scene may end with fewer shapes
        if len(shapes) == count:
            break
        shape = _random_shape(rng, f"{name}-o{len(shapes) + 1}", width, height)
        extent = _extent(shape, width, height)
        if extent[0] < 1 or extent[1] < 1 or extent[2] > width - 1 or extent[3] > height - 1:
            continue
        if any(_overlap(extent, other) > 0.3 for other in extents):  # overlaps happen, hiding does not
            continue
        shapes.append(shape)
        extents.append(extent)
    return Scene(name, int(width), int(height), background, tuple(shapes))


def _random_shape(rng: np.random.Generator, shape_id: str, width: int, height: int) -> Shape:
    cls = str(rng.choice(CLASSES))
    side = float(rng.choice([rng.uniform(0.09, 0.16), rng.uniform(0.16, 0.38)], p=[0.3, 0.7]))  # some small
    base = side * min(width, height)
    aspect = rng.uniform(1.5, 2.2) if cls in {"ellipse", "rectangle"} else 1.0
    if cls in {"ellipse", "rectangle"} and rng.random() < 0.5:
        aspect = 1 / aspect  # tall, not wide
    w_px, h_px = base * math.sqrt(aspect), base / math.sqrt(aspect)
    rotation = float(rng.uniform(15, 75)) if cls in ROTATABLE and rng.random() < 0.3 else 0.0
    cx, cy = rng.uniform(0, width), rng.uniform(0, height)
    theta = math.radians(rotation)
    cos, sin = math.cos(theta), math.sin(theta)
    x0 = cx - (w_px / 2 * cos - h_px / 2 * sin)  # the box's corner, which Label Studio rotates about
    y0 = cy - (w_px / 2 * sin + h_px / 2 * cos)
    return Shape(
        id=shape_id, cls=cls, colour=str(rng.choice(list(COLOURS))), texture=str(rng.choice(TEXTURES)),
        x=round(x0 / width * 100, 4), y=round(y0 / height * 100, 4), width=round(w_px / width * 100, 4),
        height=round(h_px / height * 100, 4), rotation=round(rotation, 2),
    )  # fmt: skip


# --- drawing -----------------------------------------------------------------------------------------


def render(scene: Scene, rng: np.random.Generator) -> Image.Image:
    image = _background(scene, rng)
    for shape in scene.shapes:
        _draw(image, shape)
    return image


def _background(scene: Scene, rng: np.random.Generator) -> Image.Image:
    size = (scene.width, scene.height)
    if scene.background == "dark":
        return Image.new("RGB", size, tuple(int(v) for v in rng.integers(10, 60, 3)))
    light = rng.integers(175, 250, 3)
    if scene.background == "plain":
        return Image.new("RGB", size, tuple(int(v) for v in light))
    if scene.background == "gradient":
        other = rng.integers(150, 250, 3)
        t = np.linspace(0, 1, scene.height)[:, None, None]
        rows = (light[None, None, :] * (1 - t) + other[None, None, :] * t).astype(np.uint8)
        return Image.fromarray(np.repeat(rows, scene.width, axis=1), "RGB")
    noise = rng.normal(0, 18, (scene.height, scene.width, 3)) + light[None, None, :]
    return Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8), "RGB")


def _outline(cls: str, w: int, h: int) -> list[tuple[float, float]] | None:
    """The polygon of a class in a w x h tile (None: drawn as an ellipse or as bars)."""
    if cls == "triangle":
        return [(w / 2, 0), (w - 1, h - 1), (0, h - 1)]
    if cls == "diamond":
        return [(w / 2, 0), (w - 1, h / 2), (w / 2, h - 1), (0, h / 2)]
    if cls == "star":
        points = []
        for k in range(10):
            radius = 0.5 if k % 2 == 0 else 0.2
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((w / 2 + radius * w * math.cos(angle), h / 2 + radius * h * math.sin(angle)))
        return points
    return None


def _mask(cls: str, w: int, h: int) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if cls in {"circle", "ellipse"}:
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif cls in {"square", "rectangle"}:
        draw.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif cls == "cross":
        draw.rectangle([w / 3, 0, 2 * w / 3, h - 1], fill=255)
        draw.rectangle([0, h / 3, w - 1, 2 * h / 3], fill=255)
    else:
        draw.polygon(_outline(cls, w, h), fill=255)
    return mask


def _pattern(shape: Shape, w: int, h: int) -> Image.Image:
    colour = np.array(COLOURS[shape.colour])
    tile = np.broadcast_to(colour, (h, w, 3)).astype(np.float64).copy()
    if shape.texture == "striped":
        tile[(np.arange(h)[:, None] + np.arange(w)[None, :]) // 3 % 2 == 1] = colour * 0.45 + 255 * 0.55
    elif shape.texture == "dotted":
        yy, xx = np.mgrid[0:h, 0:w]
        tile[((yy % 5) < 2) & ((xx % 5) < 2)] = 255
    return Image.fromarray(tile.astype(np.uint8), "RGB")


def _tile(shape: Shape, width: int, height: int) -> tuple[int, int, float, float]:
    """The shape's drawing tile in pixels (w, h) and the image point (cx, cy) its centre lands on."""
    w = max(2, round(shape.width / 100 * width))
    h = max(2, round(shape.height / 100 * height))
    cx, cy = _corners(shape, width, height).mean(axis=0)
    return w, h, float(cx), float(cy)


def _draw(image: Image.Image, shape: Shape) -> None:
    w, h, cx, cy = _tile(shape, image.width, image.height)
    tile = _pattern(shape, w, h).convert("RGBA")
    tile.putalpha(_mask(shape.cls, w, h))
    if shape.rotation:
        tile = tile.rotate(-shape.rotation, resample=Image.Resampling.BICUBIC, expand=True)
    image.paste(tile, (round(cx - tile.width / 2), round(cy - tile.height / 2)), tile)


# --- the regions a person would draw around a shape, in every Label Studio shape ---------------------


def _tile_polygon(cls: str, w: int, h: int) -> list[tuple[float, float]]:
    if cls in {"circle", "ellipse"}:
        return [(w / 2 + w / 2 * math.cos(a), h / 2 + h / 2 * math.sin(a)) for a in np.linspace(0, 2 * math.pi, 24,
                                                                                           endpoint=False)]  # fmt: skip
    if cls in {"square", "rectangle"}:
        return [(0, 0), (w, 0), (w, h), (0, h)]
    if cls == "cross":
        a, b = w / 3, 2 * w / 3
        c, d = h / 3, 2 * h / 3
        return [(a, 0), (b, 0), (b, c), (w, c), (w, d), (b, d), (b, h), (a, h), (a, d), (0, d), (0, c), (a, c)]
    return _outline(cls, w, h) or []


def polygon_value(shape: Shape, width: int, height: int) -> dict:
    """The shape's outline as a Label Studio polygon (percent points), as a person would trace it."""
    w, h, cx, cy = _tile(shape, width, height)
    theta = math.radians(shape.rotation)
    points = []
    for u, v in _tile_polygon(shape.cls, w, h):
        u, v = u - w / 2, v - h / 2
        x, y = cx + u * math.cos(theta) - v * math.sin(theta), cy + u * math.sin(theta) + v * math.cos(theta)
        points.append([round(x / width * 100, 3), round(y / height * 100, 3)])
    return {"points": points, "closed": True}


def ellipse_value(shape: Shape, width: int, height: int) -> dict:
    """An ellipse around the shape (the shape's own ellipse for round ones), rotated with it."""
    w, h, cx, cy = _tile(shape, width, height)
    grow = 1.0 if shape.cls in {"circle", "ellipse"} else math.sqrt(2)  # an ellipse through a box's corners
    return {"x": round(cx / width * 100, 3), "y": round(cy / height * 100, 3),
            "radiusX": round(w / 2 * grow / width * 100, 3), "radiusY": round(h / 2 * grow / height * 100, 3),
            "rotation": shape.rotation}  # fmt: skip


def keypoint_value(shape: Shape, width: int, height: int) -> dict:
    """The shape's centre, clicked."""
    _, _, cx, cy = _tile(shape, width, height)
    return {"x": round(cx / width * 100, 3), "y": round(cy / height * 100, 3), "width": 1.0}


def mask_value(shape: Shape, width: int, height: int) -> dict:
    """The shape's pixels painted with the brush, in Label Studio's RLE."""
    from label_studio_sdk.converter.brush import encode_rle

    w, h, cx, cy = _tile(shape, width, height)
    tile = _mask(shape.cls, w, h)
    if shape.rotation:
        tile = tile.rotate(-shape.rotation, resample=Image.Resampling.BICUBIC, expand=True)
    canvas = Image.new("L", (width, height), 0)
    canvas.paste(tile, (round(cx - tile.width / 2), round(cy - tile.height / 2)), tile)
    rgba = np.zeros((height, width, 4), dtype=np.uint8)
    rgba[np.asarray(canvas) >= 128] = 255
    return {"format": "rle", "rle": [int(b) for b in encode_rle(rgba.flatten())]}


# --- Label Studio files ------------------------------------------------------------------------------

KINDS = ("boxes", "boxes_fine", "tags", "boxes_and_tags", "image_class", "attributes", "polygons", "ellipses",
         "keypoints", "masks")  # fmt: skip
# The region kinds: each shape drawn as that kind of Label Studio region, labelled with its class.
REGION_KINDS = {"polygons": ("PolygonLabels", polygon_value), "ellipses": ("EllipseLabels", ellipse_value),
                "keypoints": ("KeyPointLabels", keypoint_value), "masks": ("BrushLabels", mask_value)}  # fmt: skip


def label_config(kind: str) -> str:
    """The label config of one kind of project over the world (as a user would write it)."""
    labels = "".join(f'\n    <Label value="{c}"/>' for c in CLASSES)
    boxes = f'  <RectangleLabels name="label" toName="image">{labels}\n  </RectangleLabels>\n'
    fine = '  <TextArea name="fine" toName="image" perRegion="true" editable="true" displayMode="region-list"/>\n'
    choices = "".join(f'\n    <Choice value="{c}" group="{GROUP_OF[c]}" hint="{DEFINITIONS[c]}"/>' for c in CLASSES)
    tags = f'  <Choices name="tags" toName="image" choice="multiple" showInline="true">{choices}\n  </Choices>\n'
    single = "".join(f'\n    <Choice value="{c}"/>' for c in CLASSES)
    largest = (
        f'  <Header value="The largest shape"/>\n  <Choices name="largest" toName="image">{single}\n  </Choices>\n'
    )
    attributes = "".join(
        f'  <Header value="{name}: {hint}?"/>\n'
        f'  <Choices name="{name}" toName="image" showInline="true" hint="{hint}">\n'
        f'    <Choice value="yes"/>\n    <Choice value="no"/>\n  </Choices>\n'
        for name, hint in ATTRIBUTES.items()
    )
    bodies = {"boxes": boxes, "boxes_fine": boxes + fine, "tags": tags, "boxes_and_tags": boxes + tags,
              "image_class": largest, "attributes": attributes}  # fmt: skip
    for region_kind, (tag, _) in REGION_KINDS.items():
        bodies[region_kind] = f'  <{tag} name="label" toName="image">{labels}\n  </{tag}>\n'
    body = bodies[kind]
    return f'<View>\n  <Image name="image" value="$image"/>\n{body}</View>\n'


def annotation(scene: Scene, kind: str) -> list[dict]:
    """The ground truth as a Label Studio annotation result for a project of ``kind``."""
    result: list[dict] = []
    if kind in {"boxes", "boxes_fine", "boxes_and_tags"}:
        for shape in scene.shapes:
            result.append(_region(scene, shape, "label", "rectanglelabels", {"rectanglelabels": [shape.cls]}))
            if kind == "boxes_fine":
                result.append(_region(scene, shape, "fine", "textarea", {"text": [shape.fine_name]}))
    if kind in {"tags", "boxes_and_tags"}:
        result.append(_choices("tags", list(scene.tags)))
    if kind == "image_class":
        result.append(_choices("largest", [scene.largest]))
    if kind == "attributes":
        result += [_choices(name, ["yes" if present else "no"]) for name, present in scene.attributes.items()]
    if kind in REGION_KINDS:
        tag, value = REGION_KINDS[kind]
        for shape in scene.shapes:
            result.append({**_region(scene, shape, "label", tag.lower(), {tag.lower(): [shape.cls]}),
                           "value": {**value(shape, scene.width, scene.height), tag.lower(): [shape.cls]}})  # fmt: skip
    return result


def _region(scene: Scene, shape: Shape, control: str, result_type: str, payload: dict) -> dict:
    return {"id": shape.id, "from_name": control, "to_name": "image", "type": result_type,
            "original_width": scene.width, "original_height": scene.height, "image_rotation": 0,
            "value": {**shape.value(), **payload}}  # fmt: skip


def _choices(control: str, labels: list[str]) -> dict:
    return {"id": f"{control}-truth", "from_name": control, "to_name": "image", "type": "choices",
            "value": {"choices": labels}}  # fmt: skip


def _data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@dataclass(frozen=True)
class World:
    """What ``write_world`` wrote: the folder, the scenes, and per kind its (config, import file)."""

    root: Path
    seed: int
    scenes: tuple[Scene, ...]
    projects: dict[str, tuple[Path, Path]]


def generate_world(*, tasks: int, seed: int) -> list[tuple[Scene, Image.Image]]:
    """``tasks`` scenes and their images from ``seed`` alone (the same seed, the same world)."""
    rng = np.random.default_rng([seed, 0x5A])
    scenes = []
    for index in range(tasks):
        scene = generate_scene(rng, name=f"s{seed}-{index:05d}")
        scenes.append((scene, render(scene, rng)))
    return scenes


def write_world(out: Path, *, tasks: int, seed: int, image_url_prefix: str | None = None) -> World:
    """Write the world to ``out``; images are embedded as data: URLs unless ``image_url_prefix`` is given
    (then ``data.image`` is that prefix plus ``images/<name>.png``, e.g. a Label Studio local-files URL)."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    scenes = generate_world(tasks=tasks, seed=seed)
    urls = []
    for scene, image in scenes:
        image.save(out / "images" / f"{scene.name}.png")
        urls.append(_data_url(image) if image_url_prefix is None else f"{image_url_prefix}images/{scene.name}.png")
    projects = {}
    for kind in KINDS:
        folder = out / kind
        folder.mkdir(exist_ok=True)
        config = folder / "config.xml"
        config.write_text(label_config(kind))
        imports = [
            {"data": {"image": url, "scene": scene.name, "world_version": WORLD_VERSION},
             "annotations": [{"result": annotation(scene, kind), "ground_truth": True}]}
            for (scene, _), url in zip(scenes, urls, strict=True)
        ]  # fmt: skip
        (folder / "tasks.json").write_text(json.dumps(imports))
        projects[kind] = (config, folder / "tasks.json")
    truth = {
        "world_version": WORLD_VERSION, "seed": seed, "classes": list(CLASSES), "groups": GROUPS,
        "definitions": DEFINITIONS, "attributes": ATTRIBUTES,
        "scenes": [{**asdict(scene), "tags": list(scene.tags), "largest": scene.largest,
                    "attribute_values": scene.attributes,
                    "fine_names": {s.id: s.fine_name for s in scene.shapes}} for scene, _ in scenes],
    }  # fmt: skip
    (out / "truth.json").write_text(json.dumps(truth, indent=1))
    return World(out, seed, tuple(scene for scene, _ in scenes), projects)
