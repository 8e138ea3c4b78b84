"""Text for each region a person drew: a ``<TextArea perRegion="true">`` names the object ("Dachshund (Dog)")
or reads the text written in it (OCR)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from backend.annotate.boxes import name_crops, read_crops
from backend.controls.base import Asking, Output, Question, TaskInput
from backend.labelstudio.config import ConfigView, ImageField, is_true, text_task
from backend.labelstudio.export import Comparison, compare_texts


@dataclass(frozen=True)
class RegionText:
    """Write text into ``control`` for each region drawn with ``region_controls``: a fine-grained name of the
    object (``task="name"``) or the text written in the region (``task="read"``, OCR)."""

    tags: ClassVar[frozenset[str]] = frozenset({"TextArea"})
    control: str
    image: ImageField
    region_controls: tuple[str, ...]
    task: Literal["name", "read"] = "name"
    label_set: tuple[str, ...] = ()  # the image's region labels, which a fine name's category is mapped onto

    @classmethod
    def serves(cls, control: Any, view: ConfigView) -> bool:
        return (control.tag in cls.tags and view.image_of(control) is not None
                and is_true(control.attr.get("perRegion")) and text_task(control) in {"name", "read"})  # fmt: skip

    @classmethod
    def from_control(cls, control: Any, view: ConfigView) -> RegionText | None:
        image = view.image_of(control)
        assert image is not None
        return cls(control.name, image, view.region_controls(image), text_task(control), view.region_labels(image))

    def questions(self, task: TaskInput) -> list[Question]:
        mine = task.drawn_with(self.region_controls, self.image)
        return [Question(task.index, drawn.crop, drawn) for drawn in mine]

    def compare(self, task_id: int, predicted: list[dict], human: list[dict], score: float | None) -> Comparison:
        return compare_texts(self.control, predicted, human, whole_image=False)

    def training_items(self, task: dict, results: list[dict], reviewed: bool, score: float | None) -> list:
        return []  # text trains no classifier

    def answer(self, asking: Asking, questions: Sequence[Question]) -> list[Output | None]:
        crops = [q.image for q in questions]
        if self.task == "read":
            names = read_crops(asking.engine, asking.prompts, crops)
        else:
            labels = [self._label_of(asking, q) for q in questions]
            names = name_crops(asking.engine, asking.prompts, crops, labels, self.label_set, asking.mapper)
        outputs: list[Output | None] = []
        for question, name in zip(questions, names, strict=True):
            if not name.text:
                outputs.append(None)  # the model said nothing: leave the text area to the person
                continue
            opinion = name.category.label if name.category is not None else None
            outputs.append(Output(question, self.control, self.image.name, "textarea", {"text": [name.text]},
                                  confidence=name.confidence, opinion=opinion))  # fmt: skip
        return outputs

    @staticmethod
    def _label_of(asking: Asking, question: Question) -> str:
        """The region's label: the model's (asked before this handler), else the person's, else "object"."""
        assert question.region is not None
        chosen = asking.region_labels.get((question.task, question.region.box.id))
        return chosen or question.region.user_label or "object"
