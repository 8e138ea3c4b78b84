"""Label config → what this backend annotates: which image, which control, which labels."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.protocol import TaskError, json_type

SUPPORTED = (
    "<RectangleLabels> on an <Image> (a label for each box a person drew), "
    '<Rectangle> plus <Choices perRegion="true"> on the same <Image>, '
    '<TextArea perRegion="true"> (a fine-grained name for each box), '
    "and <Choices> on a whole <Image>"
)
_BOX_TAGS = {"RectangleLabels", "Rectangle"}
# Per-control settings, as attributes on the <Choices> tag (namespaced so they never clash with Label Studio's).
THRESHOLD_ATTR = "mllmThreshold"  # P(yes) a multiple-choice tag needs to be kept
CANDIDATE_ATTR = "mllmCandidateThreshold"  # group-stage probability a label needs to become a candidate
GROUP_SIZE_ATTR = "mllmGroupSize"  # labels per group-wise question


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
        data = task.get("data")
        if not isinstance(data, dict):
            raise TaskError(f"the task's data is {json_type(data)}, not an object like {{{key!r}: <image URL>}}")
        url = data.get(key)
        if not isinstance(url, str) or not url.strip():
            raise TaskError(
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
    hints: tuple[tuple[str, str], ...] = ()  # (label, definition) from <Choice hint="..."> or alias
    groups: tuple[tuple[str, str], ...] = ()  # (label, group) from <Choice group="...">
    threshold: float | None = None
    candidate_threshold: float | None = None
    group_size: int | None = None


@dataclass(frozen=True)
class BoxTextTarget:
    """Write a fine-grained free-text name into ``control`` for each box drawn with ``box_controls``."""

    control: str
    image: ImageField
    box_controls: tuple[str, ...]


@dataclass(frozen=True)
class ProjectSpec:
    boxes: tuple[BoxLabelTarget, ...]
    choices: tuple[ImageChoiceTarget, ...]
    ignored: tuple[str, ...]  # controls present but not annotated by this backend, for logs
    texts: tuple[BoxTextTarget, ...] = ()

    @property
    def images(self) -> tuple[ImageField, ...]:
        seen: dict[str, ImageField] = {}
        for target in (*self.boxes, *self.choices, *self.texts):
            seen.setdefault(target.image.name, target.image)
        return tuple(seen.values())


def _is_true(value: object) -> bool:
    return str(value).lower() in {"true", "1", "yes"}


def _number_attr(control, name: str, low: float, high: float, integer: bool = False) -> float | None:
    raw = control.attr.get(name)
    if raw is None:
        return None
    try:
        value = int(raw) if integer else float(raw)
    except ValueError:
        value = None
    if value is None or not low <= value <= high:
        kind = "a whole number" if integer else "a number"
        raise UnsupportedConfig(
            f'<{control.tag} name="{control.name}"> has {name}="{raw}"; set it to {kind} from {low:g} to {high:g}'
        )
    return value


def _choice_target(control, image: ImageField) -> ImageChoiceTarget:
    labels = tuple(control.labels)
    attrs = {label: control.labels_attrs[label].attr for label in labels}
    hints = tuple(
        (label, a.get("hint") or a.get("alias")) for label, a in attrs.items() if a.get("hint") or a.get("alias")
    )
    groups = tuple((label, a["group"]) for label, a in attrs.items() if a.get("group"))
    return ImageChoiceTarget(
        control=control.name,
        image=image,
        labels=labels,
        multiple=str(control.attr.get("choice", "single")).lower() == "multiple",
        hints=hints,
        groups=groups,
        threshold=_number_attr(control, THRESHOLD_ATTR, 0.0, 1.0),
        candidate_threshold=_number_attr(control, CANDIDATE_ATTR, 0.0, 1.0),
        group_size=_number_attr(control, GROUP_SIZE_ATTR, 1, 1000, integer=True),  # type: ignore[arg-type]
    )


def check_label_count(spec: ProjectSpec, max_labels: int) -> None:
    """Refuse a control with more labels than ``max_labels``: every label is scored for every region or image."""
    for target in (*spec.boxes, *spec.choices):
        if len(target.labels) > max_labels:
            raise UnsupportedConfig(
                f"<{target.control}> has {len(target.labels)} labels, over MAX_LABELS={max_labels}: the model scores "
                "every label for every region, so the cost grows with the label count; split the labels across "
                "controls or raise MAX_LABELS"
            )


def parse_label_config(config: object) -> ProjectSpec:
    """Read a Label Studio label config; raise :class:`UnsupportedConfig` if nothing in it can be served."""
    if not isinstance(config, str):
        raise UnsupportedConfig(f"the label config is a {type(config).__name__}, not an XML string")
    return _parse_label_config(config)


@lru_cache(maxsize=64)
def _parse_label_config(config: str) -> ProjectSpec:
    if not config.strip():
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

    boxes, choices, texts, ignored = [], [], [], []
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
            choices.append(_choice_target(control, targets[0]))
        elif control.tag == "TextArea" and targets and _is_true(control.attr.get("perRegion")):
            image = targets[0]
            texts.append(BoxTextTarget(control.name, image, tuple(box_controls.get(image.name, ()))))
        elif control.tag not in _BOX_TAGS:
            ignored.append(f"{control.tag} {control.name}")

    if not boxes and not choices and not any(t.box_controls for t in texts):
        found = ", ".join(ignored) or "no controls"
        raise UnsupportedConfig(
            f"nothing to annotate in this label config (found: {found}); this backend supports {SUPPORTED}"
        )
    return ProjectSpec(tuple(boxes), tuple(choices), tuple(ignored), tuple(texts))
