"""A label for each region a person drew: ``<RectangleLabels>``, ``<PolygonLabels>``, ``<EllipseLabels>``,
``<KeyPointLabels>``, ``<BrushLabels>``, ``<Labels>`` on a shape tool, and per-region ``<Choices>`` or
``<Taxonomy>``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from backend.annotate.choice import Choice, choose_label
from backend.annotate.suspicion import Signals
from backend.controls.base import Asking, Drawn, Output, Predicted, Question, TaskInput
from backend.labelstudio.config import (
    LABELLED_SHAPES,
    ConfigView,
    ImageField,
    LabelSet,
    is_true,
    mode_attr,
    view_attr,
)
from backend.labelstudio.export import Comparison, compare_labels, region_items
from backend.labelstudio.regions import outline_box

TEMPLATES = {False: "box_label", True: "box_context_label"}  # by whether the region is shown in its context


@dataclass(frozen=True)
class RegionLabels:
    """Label each region drawn with one of ``region_controls`` using ``control``'s labels."""

    tags: ClassVar[frozenset[str]] = frozenset({*LABELLED_SHAPES, "Labels", "Choices", "Taxonomy"})
    control: str
    image: ImageField
    labels: tuple[str, ...]
    result_type: str  # "rectanglelabels", "polygonlabels", ..., "labels", "choices" or "taxonomy"
    region_controls: tuple[str, ...]
    label_set: LabelSet | None = None  # None: ``labels``, written in the config
    mode: str | None = None  # mllmMode (None: the LABEL_MODE setting)
    view: str | None = None  # mllmView (None: the REGION_VIEW setting)

    @property
    def source(self) -> LabelSet:
        return self.label_set or LabelSet(self.labels)

    @classmethod
    def serves(cls, control: Any, view: ConfigView) -> bool:
        per_region = is_true(control.attr.get("perRegion"))
        return view.image_of(control) is not None and (
            control.tag in LABELLED_SHAPES or control.tag == "Labels" or (control.tag in cls.tags and per_region)
        )

    @classmethod
    def from_control(cls, control: Any, view: ConfigView) -> RegionLabels | None:
        image = view.image_of(control)
        label_set = view.label_set(control)
        if image is None or label_set is None:
            return None
        if control.tag in LABELLED_SHAPES:
            result_type, drawn = control.tag.lower(), (control.name,)
        else:
            result_type = "labels" if control.tag == "Labels" else control.tag.lower()
            drawn = view.region_controls(image)
        return cls(control.name, image, label_set.labels, result_type, drawn, label_set.dynamic, mode_attr(control),
                   view_attr(control))  # fmt: skip

    def questions(self, task: TaskInput) -> list[Question]:
        mine = task.drawn_with(self.region_controls, self.image)
        if not mine:
            return []
        labels = task.labels_of(self.source)
        in_context = (self.view or task.region_view) == "context"
        return [Question(task.index, drawn.crop, drawn, labels, context=self._context(task, drawn) if in_context
                         else None) for drawn in mine]  # fmt: skip

    def _context(self, task: TaskInput, drawn: Drawn) -> Image.Image | None:
        """The whole image (shrunk once per task) with the region's box outlined; a region on one image of a
        multi-image task (``valueList``) keeps its crop."""
        return outline_box(task.image(self.image), drawn.box) if drawn.box.item_index is None else None

    def answer(self, asking: Asking, questions: Sequence[Question]) -> list[Output | None]:
        cascaded = self._cascade(asking, questions)
        rest = [q for i, q in enumerate(questions) if i not in cascaded]
        asked = iter(_label(asking, rest, self.mode or asking.settings.label_mode))
        outputs: list[Output | None] = []
        for index, question in enumerate(questions):
            choice = cascaded[index] if index in cascaded else next(asked)
            signals = Signals(annotator=choice.probability, margin=choice.margin, mapped=choice.mapped)
            outputs.append(Output(
                question, self.control, self.image.name, self.result_type,
                self.source.payload(self.result_type, choice.label),
                predicted=(Predicted(choice.label, signals, from_classifier=index in cascaded,
                                     alternative=choice.runner_up),),  # fmt: skip
                region_label=choice.label, out_of_set=choice.suggestion,
            ))  # fmt: skip
        return outputs

    def compare(self, task_id: int, predicted: list[dict], human: list[dict], score: float | None) -> Comparison:
        return compare_labels(task_id, self.control, predicted, human, whole_image=False)

    def training_items(self, task: dict, results: list[dict], reviewed: bool, score: float | None) -> list:
        return region_items(task, self.control, self.image, results, reviewed, score)

    def _cascade(self, asking: Asking, questions: Sequence[Question]) -> dict[int, Choice]:
        """With CASCADE=on, regions the project's trained classifier is sure about skip the MLLM."""
        if not asking.settings.cascade or not questions:
            return {}
        classifier = asking.classifier(self.control)
        if classifier is None or classifier.multi_label or tuple(classifier.labels) != tuple(self.labels):
            return {}
        sure = {}
        for index, row in enumerate(classifier.predict_proba([q.image for q in questions])):
            best = int(row.argmax())
            if row[best] >= asking.settings.cascade_threshold:
                sure[index] = Choice(self.labels[best], float(row[best]), self.labels, tuple(float(p) for p in row))
        asking.on_cascade(len(sure))
        return sure


def _label(asking: Asking, questions: Sequence[Question], mode) -> list[Choice]:
    """Each region's label from its own label set (a set read from task data can differ between tasks), asked
    about its crop or, with mllmView="context", about the whole image with its box outlined. Open-world answers
    name the crop: their question has no box to point at."""
    answers: dict[int, Choice] = {}
    for labels, has_context in dict.fromkeys((q.labels, q.context is not None) for q in questions):
        indices = [i for i, q in enumerate(questions) if (q.labels, q.context is not None) == (labels, has_context)]
        in_context = has_context and mode != "open-world"
        shown = [questions[i].context if in_context else questions[i].image for i in indices]
        chosen = choose_label(asking.engine, asking.prompts, TEMPLATES[in_context], shown, labels, mode=mode,
                              orders=asking.settings.option_orders, mapper=asking.mapper)  # fmt: skip
        answers.update(zip(indices, chosen, strict=True))
    return [answers[i] for i in range(len(questions))]
