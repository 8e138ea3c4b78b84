"""Label config → what this backend annotates: one handler (``backend.controls``) per served control.

This module holds what the handlers share of Label Studio's config language: images and where
their URLs live, label sets (written, read from the task, or a taxonomy's paths), the
namespaced ``mllm*`` attributes, and :class:`ConfigView`, the config as handlers read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any
from xml.etree import ElementTree

from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.protocol import TaskError, json_type

if TYPE_CHECKING:
    from backend.controls import ImageChoices, ImageText, RegionLabels, RegionText
    from backend.controls.base import ControlHandler

SUPPORTED = (
    "regions a person draws on an <Image> (<RectangleLabels>, <PolygonLabels>, <EllipseLabels>, <KeyPointLabels>, "
    "<BrushLabels>, or a shape tool with <Labels>, per-region <Choices>, <Taxonomy> or <TextArea>), "
    "and for a whole <Image> <Choices>, <Taxonomy>, a <TextArea> (caption) or a <TextArea> on a <Text> question"
)
SHAPE_TOOLS = frozenset({"Rectangle", "Polygon", "Ellipse", "KeyPoint", "Brush"})
LABELLED_SHAPES = frozenset(f"{tool}Labels" for tool in SHAPE_TOOLS)
_REGION_TAGS = SHAPE_TOOLS | LABELLED_SHAPES | {"Labels"}  # controls whose results are drawn regions
# Per-region text areas read text (OCR) when their name or placeholder says so; otherwise they name the object.
_READING_WORDS = ("transcri", "ocr", "recogni", "read", "text")
TEXT_TASK_ATTR = "mllmTask"  # on a <TextArea>: "name", "read", "caption" or "answer", when the guess is wrong
# Per-control settings, as attributes on the <Choices> tag (namespaced so they never clash with Label Studio's).
THRESHOLD_ATTR = "mllmThreshold"  # P(yes) a multiple-choice tag needs to be kept
CANDIDATE_ATTR = "mllmCandidateThreshold"  # group-stage probability a label needs to become a candidate
GROUP_SIZE_ATTR = "mllmGroupSize"  # labels per group-wise question
VIEW_ATTR = "mllmView"  # what a region's label question shows: "crop" or "context" (regions.REGION_VIEWS)
MODE_ATTR = "mllmMode"  # how a label is asked: "closed", "multiple-choice" or "open-world" (annotate/choice.py)
ATTRIBUTE_ATTR = "mllmAttribute"  # on a yes/no <Choices>: the attribute's name, when the control's name is not it
YES_NO = ("yes", "no")  # a single <Choices> with exactly these choices (any case) is a binary attribute


def binary_attribute(control: Any, labels: tuple[str, ...]) -> tuple[str, tuple[str, str]] | None:
    """A yes/no ``<Choices>``'s attribute name and its (yes, no) choices as the config spells them, or None."""
    folded = {label.casefold(): label for label in labels}
    if len(labels) != 2 or set(folded) != set(YES_NO):
        return None
    name = control.attr.get(ATTRIBUTE_ATTR) or control.name.replace("_", " ").strip()
    return name, (folded["yes"], folded["no"])


class UnsupportedConfig(ValueError):
    """The label config has nothing this backend can annotate; the message says what it supports."""


def _task_data(task: dict, key: str) -> dict:
    data = task.get("data")
    if not isinstance(data, dict):
        raise TaskError(f"the task's data is {json_type(data)}, not an object like {{{key!r}: ...}}")
    return data


@dataclass(frozen=True)
class ImageField:
    """An <Image> tag and where its URL lives in a task."""

    name: str
    value: str  # "$image" reads task["data"]["image"]; anything else is a literal URL
    value_list: bool = False  # <Image valueList="$pages">: a list of URLs, regions say which by item_index

    def url(self, task: dict, item_index: int | None = None) -> str:
        if not self.value.startswith("$"):
            return self.value
        key = self.value[1:]
        url = _task_data(task, key).get(key)
        if self.value_list:
            index = item_index or 0
            if not isinstance(url, list) or not 0 <= index < len(url):
                raise TaskError(f"task data has no image {index} in the list under {key!r} (the <Image "
                                f"name={self.name!r}> reads valueList {self.value})")  # fmt: skip
            url = url[index]
        if not isinstance(url, str) or not url.strip():
            raise TaskError(
                f"task data has no image URL under {key!r} (the <Image name={self.name!r}> reads {self.value})"
            )
        return url.strip()


@dataclass(frozen=True)
class LabelSet:
    """A control's labels: written in the config, or read from each task's data (``value="$key"``)."""

    labels: tuple[str, ...] = ()
    data_key: str | None = None
    paths: tuple[tuple[str, ...], ...] = ()  # <Taxonomy>: each label is a path through the tree

    def of(self, task: dict) -> tuple[str, ...]:
        if self.data_key is None:
            return self.labels
        raw = _task_data(task, self.data_key).get(self.data_key)
        if not isinstance(raw, list):
            raise TaskError(f"task data has no label list under {self.data_key!r} (the control reads its labels "
                            "from there)")  # fmt: skip
        labels = [item.get("value") if isinstance(item, dict) else item for item in raw]
        labels = [str(label) for label in labels if isinstance(label, (str, int, float)) and str(label).strip()]
        if not labels:
            raise TaskError(f"task data under {self.data_key!r} holds no labels like [{{'value': 'Cat'}}]")
        return tuple(dict.fromkeys(labels))

    @property
    def dynamic(self) -> LabelSet | None:
        """Itself when it is more than the config's written labels (read from the task, or a taxonomy), else None."""
        return self if self.data_key or self.paths else None

    def payload(self, result_type: str, label: str) -> dict:
        """The result value's label part: ``{"rectanglelabels": [label]}``, or a path for a taxonomy."""
        if self.paths:
            return {"taxonomy": [list(self.paths[self.labels.index(label)])]}
        return {result_type: [label]}


@dataclass(frozen=True)
class ProjectSpec:
    """The handlers of a label config's served controls, in the order they are asked."""

    handlers: tuple[ControlHandler, ...]
    ignored: tuple[str, ...]  # controls present but not annotated by this backend, for logs

    def _of(self, kind: str) -> tuple[Any, ...]:
        import backend.controls as controls  # the handlers read this module's vocabulary

        return tuple(h for h in self.handlers if isinstance(h, getattr(controls, kind)))

    @property
    def region_labels(self) -> tuple[RegionLabels, ...]:
        return self._of("RegionLabels")

    @property
    def region_texts(self) -> tuple[RegionText, ...]:
        return self._of("RegionText")

    @property
    def image_choices(self) -> tuple[ImageChoices, ...]:
        return self._of("ImageChoices")

    @property
    def image_texts(self) -> tuple[ImageText, ...]:
        return self._of("ImageText")

    @property
    def images(self) -> tuple[ImageField, ...]:
        seen: dict[str, ImageField] = {}
        for handler in self.handlers:
            seen.setdefault(handler.image.name, handler.image)
        return tuple(seen.values())

    @property
    def region_controls(self) -> frozenset[str]:
        """The controls whose regions some handler labels or writes into."""
        return frozenset(c for h in self.handlers for c in getattr(h, "region_controls", ()))


def is_true(value: object) -> bool:
    return str(value).lower() in {"true", "1", "yes"}


def number_attr(control, name: str, low: float, high: float, integer: bool = False) -> float | None:
    """A numeric attribute of a control, checked to lie in [low, high] (None when absent)."""
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


def view_attr(control) -> str | None:
    """A region label control's ``mllmView`` (None when absent: the REGION_VIEW setting decides)."""
    from backend.labelstudio.regions import REGION_VIEWS

    return _one_of(control, VIEW_ATTR, REGION_VIEWS)


def mode_attr(control) -> str | None:
    """A label control's ``mllmMode`` (None when absent: the LABEL_MODE setting decides)."""
    from backend.annotate.choice import LABEL_MODES

    return _one_of(control, MODE_ATTR, LABEL_MODES)


def _one_of(control, name: str, allowed: tuple[str, ...]) -> str | None:
    """The control's attribute ``name``, None when absent, refused unless it is one of ``allowed``."""
    raw = control.attr.get(name)
    if raw is not None and raw not in allowed:
        raise UnsupportedConfig(f'<{control.tag} name="{control.name}"> has {name}="{raw}"; set it to '
                                f"{', '.join(allowed)}")  # fmt: skip
    return raw


def text_task(control) -> str:
    """What a <TextArea> is for: "name" or "read" a region, "caption" an image, or "answer" a question."""
    chosen = str(control.attr.get(TEXT_TASK_ATTR) or "").lower()
    if chosen:
        if chosen not in {"name", "read", "caption", "answer"}:
            raise UnsupportedConfig(f'<TextArea name="{control.name}"> has {TEXT_TASK_ATTR}="{chosen}"; set it to '
                                    "name, read, caption or answer")  # fmt: skip
        return chosen
    if not is_true(control.attr.get("perRegion")):
        return "caption"
    words = f"{control.name} {control.attr.get('placeholder', '')}".lower()
    return "read" if any(word in words for word in _READING_WORDS) else "name"


class ConfigView:
    """A label config as handlers read it: its images, questions, taxonomies and region tools."""

    def __init__(self, config: str, interface: LabelInterface) -> None:
        self.interface = interface
        self.images = {o.name: _image_field(o) for o in interface.objects if o.tag == "Image"}
        self.questions = {o.name: str(o.value)[1:] for o in interface.objects
                          if o.tag in {"Text", "HyperText"} and str(o.value or "").startswith("$")}  # fmt: skip
        self.taxonomies = _taxonomy_paths(config)
        self.ignored: list[str] = []
        self._regions: dict[str, list[str]] = {}  # image → the controls whose results are regions on it
        for control in interface.controls:
            if control.tag in _REGION_TAGS:
                for name in control.to_name:
                    self._regions.setdefault(name, []).append(control.name)

    @property
    def first_image(self) -> ImageField | None:
        return next(iter(self.images.values()), None)

    def image_of(self, control) -> ImageField | None:
        """The <Image> a control points to (its first, when it names several)."""
        return next((self.images[name] for name in control.to_name if name in self.images), None)

    def question_of(self, control) -> str | None:
        """The data key of the <Text> question a control points to, if any."""
        return next((self.questions[name] for name in control.to_name if name in self.questions), None)

    def region_controls(self, image: ImageField) -> tuple[str, ...]:
        return tuple(self._regions.get(image.name, ()))

    def region_labels(self, image: ImageField) -> tuple[str, ...]:
        """The labels written in the config for the regions of ``image`` (the first region-labelling control's)."""
        for control in self.interface.controls:
            labels_regions = control.tag in LABELLED_SHAPES | {"Labels"} or (
                control.tag in {"Choices", "Taxonomy"} and is_true(control.attr.get("perRegion"))
            )
            if labels_regions and image.name in control.to_name and control.labels:
                return tuple(control.labels)
        return ()

    def label_set(self, control) -> LabelSet | None:
        """The control's labels; None (and noted as ignored) when it has none."""
        value = str(control.attr.get("value") or "")
        if value.startswith("$") and not control.labels:
            return LabelSet(data_key=value[1:])
        if control.tag == "Taxonomy":
            paths = self.taxonomies.get(control.name, ())
            if paths:
                return LabelSet(tuple(" / ".join(path) for path in paths), paths=paths)
        elif control.labels:
            return LabelSet(tuple(control.labels))
        self.ignored.append(f"{control.tag} {control.name} (no labels)")
        return None


def _taxonomy_paths(config: str) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Each <Taxonomy>'s leaves as paths from its root: the model chooses a leaf, the result names its path."""
    if "<Taxonomy" not in config:
        return {}
    root = ElementTree.fromstring(config)  # already read by LabelInterface, so well-formed

    def leaves(node, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = []
        for child in node:
            if child.tag != "Choice":
                continue
            here = (*path, str(child.get("value") or child.get("alias") or ""))
            found += leaves(child, here) or [here]
        return found

    return {str(t.get("name")): tuple(leaves(t, ())) for t in root.iter("Taxonomy")}


def check_label_count(spec: ProjectSpec, max_labels: int) -> None:
    """Refuse a control with more labels than ``max_labels``: every label is scored for every region or image."""
    for handler in spec.handlers:
        labels = getattr(handler, "labels", ())
        if len(labels) > max_labels:
            raise UnsupportedConfig(
                f"<{handler.control}> has {len(labels)} labels, over MAX_LABELS={max_labels}: the model scores "
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
    from backend.controls import HANDLERS  # the handlers read this module's vocabulary

    if not config.strip():
        raise UnsupportedConfig(f"the label config is empty; this backend supports {SUPPORTED}")
    try:
        interface = LabelInterface(config)
    except Exception as exc:
        raise UnsupportedConfig(
            f"the label config is not valid XML ({exc}); this backend supports {SUPPORTED}"
        ) from exc
    view = ConfigView(config, interface)
    if not view.images:
        raise UnsupportedConfig(f"the label config has no <Image>; {_refusal(interface)}")
    objects = {o.name for o in interface.objects}
    found: list[tuple[int, ControlHandler]] = []
    for control in interface.controls:
        missing = [name for name in control.to_name if name not in objects]
        if missing:
            raise UnsupportedConfig(
                f"<{control.tag} name={control.name!r}> points to {missing}, which is not an object in the config; "
                "fix its toName"
            )
        rank = next((i for i, handler in enumerate(HANDLERS) if handler.serves(control, view)), None)
        if rank is None:
            if control.tag not in SHAPE_TOOLS:  # shape tools are read through the handlers that label them
                view.ignored.append(f"{control.tag} {control.name}")
            continue
        handler = HANDLERS[rank].from_control(control, view)
        if handler is not None:
            found.append((rank, handler))
    handlers = tuple(handler for _, handler in sorted(found, key=lambda pair: pair[0]))  # registry order, stable
    if not any(getattr(h, "region_controls", True) for h in handlers):
        raise UnsupportedConfig(f"nothing to annotate in this label config; {_refusal(interface)}")
    return ProjectSpec(handlers, tuple(view.ignored))


def _image_field(tag) -> ImageField:
    listed = tag.attr.get("valueList")
    if listed:
        return ImageField(tag.name, str(listed), value_list=True)
    return ImageField(tag.name, str(tag.value or ""))


def _refusal(interface) -> str:
    """Why a config is refused, naming what it has: Label Studio shows this in its connect dialog."""
    objects = sorted({f"<{o.tag}>" for o in interface.objects})
    controls = sorted({f"<{c.tag}>" for c in interface.controls})
    found = ", ".join(objects + controls) or "no tags"
    return f"this backend labels images only (found {found}); it supports {SUPPORTED}"
