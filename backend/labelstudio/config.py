"""Label config → what this backend annotates: which image, which control, which labels."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from label_studio_sdk.label_interface import LabelInterface

SUPPORTED = (
    "<RectangleLabels> on an <Image> (a label for each box a person drew), "
    '<Rectangle> plus <Choices perRegion="true"> on the same <Image>, '
    "and <Choices> on a whole <Image>"
)
_BOX_TAGS = {"RectangleLabels", "Rectangle"}


class UnsupportedConfig(ValueError):
    """The label config has nothing this backend can annotate; the message says what it supports."""


@dataclass(frozen=True)
class ImageField:
    """An <Image> tag and where its URL lives in a task."""

    name: str
    value: str  # "$image" reads task["data"]["image"]; anything else is a literal URL

    def url(self, task: dict) -> str:
        if not self.value.startswith("$"):
            return self.value
        key = self.value[1:]
        data = task.get("data") or {}
        url = data.get(key)
        if not isinstance(url, str) or not url.strip():
            raise KeyError(
                f"task data has no image URL under {key!r} (the <Image name={self.name!r}> reads {self.value})"
            )
        return url.strip()


@dataclass(frozen=True)
class BoxLabelTarget:
    """Label each box drawn with one of ``box_controls`` using ``control``'s labels."""

    control: str
    image: ImageField
    labels: tuple[str, ...]
    result_type: Literal["rectanglelabels", "choices"]
    box_controls: tuple[str, ...]


@dataclass(frozen=True)
class ImageChoiceTarget:
    """Choose one (or, with ``multiple``, several) of ``labels`` for the whole image."""

    control: str
    image: ImageField
    labels: tuple[str, ...]
    multiple: bool


@dataclass(frozen=True)
class ProjectSpec:
    boxes: tuple[BoxLabelTarget, ...]
    choices: tuple[ImageChoiceTarget, ...]
    ignored: tuple[str, ...]  # controls present but not annotated by this backend, for logs

    @property
    def images(self) -> tuple[ImageField, ...]:
        seen: dict[str, ImageField] = {}
        for target in (*self.boxes, *self.choices):
            seen.setdefault(target.image.name, target.image)
        return tuple(seen.values())


def _is_true(value: object) -> bool:
    return str(value).lower() in {"true", "1", "yes"}


@lru_cache(maxsize=64)
def parse_label_config(config: str) -> ProjectSpec:
    """Read a Label Studio label config; raise :class:`UnsupportedConfig` if nothing in it can be served."""
    if not isinstance(config, str) or not config.strip():
        raise UnsupportedConfig(f"the label config is empty; this backend supports {SUPPORTED}")
    try:
        interface = LabelInterface(config)
    except Exception as exc:
        raise UnsupportedConfig(
            f"the label config is not valid XML ({exc}); this backend supports {SUPPORTED}"
        ) from exc
    images = {o.name: ImageField(o.name, o.value) for o in interface.objects if o.tag == "Image"}
    if not images:
        raise UnsupportedConfig(f"the label config has no <Image>; this backend supports {SUPPORTED}")

    box_controls: dict[str, list[str]] = {}
    for control in interface.controls:
        if control.tag in _BOX_TAGS:
            for name in control.to_name:
                box_controls.setdefault(name, []).append(control.name)

    boxes, choices, ignored = [], [], []
    for control in interface.controls:
        targets = [images[name] for name in control.to_name if name in images]
        missing = [name for name in control.to_name if name not in images]
        if control.tag in {"RectangleLabels", "Choices"} and missing and not targets:
            raise UnsupportedConfig(
                f"<{control.tag} name={control.name!r}> points to {missing}, which is not an <Image> in the config; "
                "fix its toName"
            )
        labels = tuple(control.labels)
        if control.tag in {"RectangleLabels", "Choices"} and not labels:
            ignored.append(f"{control.tag} {control.name} (labels come from task data, not yet supported)")
            continue
        if control.tag == "RectangleLabels" and targets:
            boxes.append(BoxLabelTarget(control.name, targets[0], labels, "rectanglelabels", (control.name,)))
        elif control.tag == "Choices" and targets and _is_true(control.attr.get("perRegion")):
            image = targets[0]
            boxes.append(
                BoxLabelTarget(control.name, image, labels, "choices", tuple(box_controls.get(image.name, ())))
            )
        elif control.tag == "Choices" and targets:
            multiple = str(control.attr.get("choice", "single")).lower() == "multiple"
            choices.append(ImageChoiceTarget(control.name, targets[0], labels, multiple))
        elif control.tag not in _BOX_TAGS:
            ignored.append(f"{control.tag} {control.name}")

    if not boxes and not choices:
        found = ", ".join(ignored) or "no controls"
        raise UnsupportedConfig(
            f"nothing to annotate in this label config (found: {found}); this backend supports {SUPPORTED}"
        )
    return ProjectSpec(tuple(boxes), tuple(choices), tuple(ignored))
