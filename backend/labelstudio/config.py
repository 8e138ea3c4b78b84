"""Label config → what this backend annotates: which image, which control, which labels."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal
from xml.etree import ElementTree

from label_studio_sdk.label_interface import LabelInterface

from backend.labelstudio.protocol import TaskError, json_type

SUPPORTED = (
    "regions a person draws on an <Image> (<RectangleLabels>, <PolygonLabels>, <EllipseLabels>, <KeyPointLabels>, "
    "<BrushLabels>, or a shape tool with <Labels>, per-region <Choices>, <Taxonomy> or <TextArea>), "
    "and for a whole <Image> <Choices>, <Taxonomy>, a <TextArea> (caption) or a <TextArea> on a <Text> question"
)
_SHAPE_TOOLS = {"Rectangle", "Polygon", "Ellipse", "KeyPoint", "Brush"}
_LABELLED_SHAPES = {f"{tool}Labels" for tool in _SHAPE_TOOLS}
_REGION_TAGS = _SHAPE_TOOLS | _LABELLED_SHAPES | {"Labels"}  # controls whose results are drawn regions
_LABEL_TAGS = {"Choices", "Taxonomy", "Labels", *_LABELLED_SHAPES}  # controls that need a label set
# Per-region text areas read text (OCR) when their name or placeholder says so; otherwise they name the object.
_READING_WORDS = ("transcri", "ocr", "recogni", "read", "text")
TEXT_TASK_ATTR = "mllmTask"  # on a <TextArea>: "name", "read", "caption" or "answer", when the guess is wrong
# Per-control settings, as attributes on the <Choices> tag (namespaced so they never clash with Label Studio's).
THRESHOLD_ATTR = "mllmThreshold"  # P(yes) a multiple-choice tag needs to be kept
CANDIDATE_ATTR = "mllmCandidateThreshold"  # group-stage probability a label needs to become a candidate
GROUP_SIZE_ATTR = "mllmGroupSize"  # labels per group-wise question


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

    def payload(self, result_type: str, label: str) -> dict:
        """The result value's label part: ``{"rectanglelabels": [label]}``, or a path for a taxonomy."""
        if self.paths:
            return {"taxonomy": [list(self.paths[self.labels.index(label)])]}
        return {result_type: [label]}


@dataclass(frozen=True)
class BoxLabelTarget:
    """Label each region drawn with one of ``box_controls`` using ``control``'s labels."""

    control: str
    image: ImageField
    labels: tuple[str, ...]
    result_type: str  # "rectanglelabels", "polygonlabels", ..., "labels", "choices" or "taxonomy"
    box_controls: tuple[str, ...]
    label_set: LabelSet | None = None  # None: ``labels``, written in the config

    @property
    def source(self) -> LabelSet:
        return self.label_set or LabelSet(self.labels)


@dataclass(frozen=True)
class ImageChoiceTarget:
    """Choose one (or, with ``multiple``, several) of ``labels`` for the whole image."""

    control: str
    image: ImageField
    labels: tuple[str, ...]
    multiple: bool
    label_set: LabelSet | None = None  # None: ``labels``, written in the config
    hints: tuple[tuple[str, str], ...] = ()  # (label, definition) from <Choice hint="..."> or alias
    groups: tuple[tuple[str, str], ...] = ()  # (label, group) from <Choice group="...">
    threshold: float | None = None
    candidate_threshold: float | None = None
    group_size: int | None = None

    @property
    def source(self) -> LabelSet:
        return self.label_set or LabelSet(self.labels)


@dataclass(frozen=True)
class BoxTextTarget:
    """Write text into ``control`` for each region drawn with ``box_controls``: a fine-grained name of the object
    (``task="name"``) or the text written in the region (``task="read"``, OCR)."""

    control: str
    image: ImageField
    box_controls: tuple[str, ...]
    task: Literal["name", "read"] = "name"


@dataclass(frozen=True)
class ImageTextTarget:
    """Write text into ``control`` about a whole image: a caption, or the answer to the question in task data
    under ``question`` (a <TextArea> on a <Text> object)."""

    control: str
    image: ImageField
    to_name: str  # the <Image>, or the <Text> object holding the question
    question: str | None = None  # the <Text> object's data key


@dataclass(frozen=True)
class ProjectSpec:
    boxes: tuple[BoxLabelTarget, ...]
    choices: tuple[ImageChoiceTarget, ...]
    ignored: tuple[str, ...]  # controls present but not annotated by this backend, for logs
    texts: tuple[BoxTextTarget, ...] = ()
    image_texts: tuple[ImageTextTarget, ...] = ()

    @property
    def images(self) -> tuple[ImageField, ...]:
        seen: dict[str, ImageField] = {}
        for target in (*self.boxes, *self.choices, *self.texts, *self.image_texts):
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


def _label_set(control, taxonomies: dict[str, tuple[tuple[str, ...], ...]]) -> LabelSet:
    value = str(control.attr.get("value") or "")
    if value.startswith("$") and not control.labels:
        return LabelSet(data_key=value[1:])
    if control.tag == "Taxonomy":
        paths = taxonomies.get(control.name, ())
        return LabelSet(tuple(" / ".join(path) for path in paths), paths=paths)
    return LabelSet(tuple(control.labels))


def _choice_target(control, image: ImageField, label_set: LabelSet) -> ImageChoiceTarget:
    attrs = {label: control.labels_attrs[label].attr for label in label_set.labels if label in control.labels_attrs}
    hints = tuple(
        (label, a.get("hint") or a.get("alias")) for label, a in attrs.items() if a.get("hint") or a.get("alias")
    )
    groups = tuple((label, a["group"]) for label, a in attrs.items() if a.get("group"))
    multiple = control.tag != "Taxonomy" and str(control.attr.get("choice", "single")).lower() == "multiple"
    return ImageChoiceTarget(
        control=control.name,
        image=image,
        labels=label_set.labels,
        multiple=multiple,
        label_set=label_set if label_set.data_key or label_set.paths else None,
        hints=hints,
        groups=groups,
        threshold=_number_attr(control, THRESHOLD_ATTR, 0.0, 1.0),
        candidate_threshold=_number_attr(control, CANDIDATE_ATTR, 0.0, 1.0),
        group_size=_number_attr(control, GROUP_SIZE_ATTR, 1, 1000, integer=True),  # type: ignore[arg-type]
    )


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


def _text_task(control, reads_question: bool) -> str:
    chosen = str(control.attr.get(TEXT_TASK_ATTR) or "").lower()
    if chosen:
        if chosen not in {"name", "read", "caption", "answer"}:
            raise UnsupportedConfig(f'<TextArea name="{control.name}"> has {TEXT_TASK_ATTR}="{chosen}"; set it to '
                                    "name, read, caption or answer")  # fmt: skip
        return chosen
    if reads_question:
        return "answer"
    if not _is_true(control.attr.get("perRegion")):
        return "caption"
    words = f"{control.name} {control.attr.get('placeholder', '')}".lower()
    return "read" if any(word in words for word in _READING_WORDS) else "name"


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
    images = {o.name: _image_field(o) for o in interface.objects if o.tag == "Image"}
    if not images:
        raise UnsupportedConfig(f"the label config has no <Image>; {_refusal(interface)}")
    questions = {o.name: o.value[1:] for o in interface.objects if o.tag in {"Text", "HyperText"}
                 and str(o.value or "").startswith("$")}  # fmt: skip
    taxonomies = _taxonomy_paths(config)
    objects = {o.name for o in interface.objects}

    region_controls: dict[str, list[str]] = {}  # image → the controls whose results are regions on it
    for control in interface.controls:
        if control.tag in _REGION_TAGS:
            for name in control.to_name:
                region_controls.setdefault(name, []).append(control.name)

    boxes, choices, texts, image_texts, ignored = [], [], [], [], []
    for control in interface.controls:
        targets = [images[name] for name in control.to_name if name in images]
        missing = [name for name in control.to_name if name not in objects]
        asks = [questions[name] for name in control.to_name if name in questions]
        if missing:
            raise UnsupportedConfig(
                f"<{control.tag} name={control.name!r}> points to {missing}, which is not an object in the config; "
                "fix its toName"
            )
        if control.tag == "TextArea" and asks:  # a question about the view's image (visual question answering)
            image = next(iter(images.values()))
            image_texts.append(ImageTextTarget(control.name, image, control.to_name[0], asks[0]))
            continue
        if not targets:
            if control.tag not in _SHAPE_TOOLS:
                ignored.append(f"{control.tag} {control.name}")
            continue
        image, per_region = targets[0], _is_true(control.attr.get("perRegion"))
        drawn = tuple(region_controls.get(image.name, ()))
        if control.tag == "TextArea":
            task = _text_task(control, False)
            if task in {"name", "read"}:
                texts.append(BoxTextTarget(control.name, image, drawn, task))  # type: ignore[arg-type]
            else:
                image_texts.append(ImageTextTarget(control.name, image, image.name))
            continue
        if control.tag not in _LABEL_TAGS:
            if control.tag not in _SHAPE_TOOLS:
                ignored.append(f"{control.tag} {control.name}")
            continue
        label_set = _label_set(control, taxonomies)
        if not label_set.labels and label_set.data_key is None:
            ignored.append(f"{control.tag} {control.name} (no labels)")
            continue
        if control.tag in _LABELLED_SHAPES or control.tag == "Labels":
            own = (control.name,) if control.tag in _LABELLED_SHAPES else drawn
            boxes.append(BoxLabelTarget(control.name, image, label_set.labels, control.tag.lower(), own,
                                        _dynamic(label_set)))  # fmt: skip
        elif per_region:
            result_type = "taxonomy" if control.tag == "Taxonomy" else "choices"
            boxes.append(BoxLabelTarget(control.name, image, label_set.labels, result_type, drawn,
                                        _dynamic(label_set)))  # fmt: skip
        else:
            choices.append(_choice_target(control, image, label_set))

    if not boxes and not choices and not image_texts and not any(t.box_controls for t in texts):
        raise UnsupportedConfig(f"nothing to annotate in this label config; {_refusal(interface)}")
    return ProjectSpec(tuple(boxes), tuple(choices), tuple(ignored), tuple(texts), tuple(image_texts))


def _image_field(tag) -> ImageField:
    listed = tag.attr.get("valueList")
    if listed:
        return ImageField(tag.name, str(listed), value_list=True)
    return ImageField(tag.name, str(tag.value or ""))


def _dynamic(label_set: LabelSet) -> LabelSet | None:
    return label_set if label_set.data_key or label_set.paths else None


def _refusal(interface) -> str:
    """Why a config is refused, naming what it has: Label Studio shows this in its connect dialog."""
    objects = sorted({f"<{o.tag}>" for o in interface.objects})
    controls = sorted({f"<{c.tag}>" for c in interface.controls})
    found = ", ".join(objects + controls) or "no tags"
    return f"this backend labels images only (found {found}); it supports {SUPPORTED}"
