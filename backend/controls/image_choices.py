"""Labels for a whole image: a single-choice ``<Choices>`` (or ``<Taxonomy>``) is a classification; a
multiple-choice one is tagging (TagLLM: group-wise candidates, then concept disambiguation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from backend.annotate.choice import Choice, choose_label
from backend.annotate.suspicion import Signals
from backend.annotate.tagging import Tags, TagSettings, attribute_images, tag_images
from backend.controls.base import Asking, Output, Predicted, Question, TaskInput
from backend.labelstudio.config import (
    CANDIDATE_ATTR,
    GROUP_SIZE_ATTR,
    THRESHOLD_ATTR,
    ConfigView,
    ImageField,
    LabelSet,
    binary_attribute,
    is_true,
    mode_attr,
    number_attr,
)
from backend.labelstudio.export import Comparison, compare_labels, compare_tags, image_items


@dataclass(frozen=True)
class ImageChoices:
    """Choose one (or, with ``multiple``, several) of ``labels`` for the whole image."""

    tags: ClassVar[frozenset[str]] = frozenset({"Choices", "Taxonomy"})
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
    attribute: tuple[str, tuple[str, str]] | None = None  # a yes/no control: (attribute name, (yes, no) choices)
    attribute_hint: str | None = None  # <Choices hint="...">: the attribute's definition
    mode: str | None = None  # mllmMode for a single choice (None: the LABEL_MODE setting)

    @property
    def source(self) -> LabelSet:
        return self.label_set or LabelSet(self.labels)

    @classmethod
    def serves(cls, control: Any, view: ConfigView) -> bool:
        return (
            control.tag in cls.tags
            and view.image_of(control) is not None
            and not is_true(control.attr.get("perRegion"))
        )

    @classmethod
    def from_control(cls, control: Any, view: ConfigView) -> ImageChoices | None:
        image, label_set = view.image_of(control), view.label_set(control)
        if image is None or label_set is None:
            return None
        attrs = {label: control.labels_attrs[label].attr for label in label_set.labels if label in control.labels_attrs}
        hints = tuple((label, a.get("hint") or a.get("alias")) for label, a in attrs.items()
                      if a.get("hint") or a.get("alias"))  # fmt: skip
        groups = tuple((label, a["group"]) for label, a in attrs.items() if a.get("group"))
        multiple = control.tag != "Taxonomy" and str(control.attr.get("choice", "single")).lower() == "multiple"
        attribute = None if multiple or control.tag == "Taxonomy" else binary_attribute(control, label_set.labels)
        return cls(
            control=control.name,
            image=image,
            labels=label_set.labels,
            multiple=multiple,
            label_set=label_set.dynamic,
            hints=hints,
            groups=groups,
            threshold=number_attr(control, THRESHOLD_ATTR, 0.0, 1.0),
            candidate_threshold=number_attr(control, CANDIDATE_ATTR, 0.0, 1.0),
            group_size=number_attr(control, GROUP_SIZE_ATTR, 1, 1000, integer=True),  # type: ignore[arg-type]
            attribute=attribute,
            attribute_hint=control.attr.get("hint") if attribute else None,
            mode=mode_attr(control),
        )

    def questions(self, task: TaskInput) -> list[Question]:
        if not task.whole_image:
            return []
        image = task.image(self.image)
        return [Question(task.index, image, labels=task.labels_of(self.source))]

    def answer(self, asking: Asking, questions: Sequence[Question]) -> list[Output | None]:
        outputs: list[Output | None] = [None] * len(questions)
        for labels in dict.fromkeys(q.labels for q in questions):
            indices = [i for i, q in enumerate(questions) if q.labels == labels]
            answers = self._ask(asking, labels, [questions[i].image for i in indices])
            for i, answer in zip(indices, answers, strict=True):
                outputs[i] = self._output(questions[i], answer)
        return outputs

    def compare(self, task_id: int, predicted: list[dict], human: list[dict], score: float | None) -> Comparison:
        if self.multiple:
            return compare_tags(task_id, self.control, predicted, human, score)
        return compare_labels(task_id, self.control, predicted, human, whole_image=True)

    def training_items(self, task: dict, results: list[dict], reviewed: bool, score: float | None) -> list:
        return image_items(task, self.control, self.image, self.multiple, results, reviewed, score)

    def _ask(self, asking: Asking, labels: tuple[str, ...], images: list) -> list[Choice] | list[Tags]:
        if self.attribute is not None and labels == self.labels:  # asked about by its name, not "which label?"
            name, answers = self.attribute
            return attribute_images(asking.engine, asking.prompts, images, name, answers, self.attribute_hint)
        if not self.multiple:
            return choose_label(asking.engine, asking.prompts, "image_choice", images, labels,
                                mode=self.mode or asking.settings.label_mode,  # type: ignore[arg-type]
                                orders=asking.settings.option_orders, mapper=asking.mapper)  # fmt: skip
        s = asking.settings
        tag_settings = TagSettings(
            threshold=self.threshold if self.threshold is not None else s.tag_threshold,
            candidate_threshold=(
                self.candidate_threshold if self.candidate_threshold is not None else s.tag_candidate_threshold
            ),
            group_size=self.group_size or s.tag_group_size,
            method=s.tag_method,  # type: ignore[arg-type]
        )
        return tag_images(asking.engine, asking.prompts, images, labels, tag_settings, dict(self.hints),
                          dict(self.groups), mapper=asking.mapper)  # fmt: skip

    def _output(self, question: Question, answer: Choice | Tags) -> Output:
        hints = dict(self.hints)
        if isinstance(answer, Tags):
            return self._tags_output(question, answer, hints)
        result_type = "taxonomy" if self.source.paths else "choices"
        signals = Signals(annotator=answer.probability, margin=answer.margin, mapped=answer.mapped)
        # An attribute's answer already is a yes/no verdict on it: the critic would ask the same question again.
        predicted = Predicted(answer.label, signals, confirmed=self.attribute is not None, alternative=answer.runner_up)
        return Output(question, self.control, self.image.name, result_type,
                      self.source.payload(result_type, answer.label), predicted=(predicted,), hints=hints,
                      out_of_set=answer.suggestion)  # fmt: skip

    def _tags_output(self, question: Question, answer: Tags, hints: dict[str, str]) -> Output:
        """The kept tags, with every label's P(present) under ``label_scores`` (kept or not, for per-tag ranking).

        With no tag kept the result still carries its scores, and its confidence ranks the task. A tag's
        probability that already came from a yes/no question about it is not asked again by the critic.
        """
        label_scores = {label: round(answer.presence[label], 6) for label in question.labels}
        value = {"choices": list(answer.labels)}
        if not answer.labels:
            return Output(question, self.control, self.image.name, "choices", value, confidence=answer.confidence,
                          ranks_task=True, label_scores=label_scores)  # fmt: skip
        predicted = tuple(Predicted(tag, Signals(annotator=answer.presence[tag]), confirmed=answer.confirmed)
                          for tag in answer.labels)  # fmt: skip
        return Output(question, self.control, self.image.name, "choices", value, predicted=predicted, hints=hints,
                      label_scores=label_scores)  # fmt: skip
