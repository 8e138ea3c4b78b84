"""Text about a whole image: a ``<TextArea>`` on an ``<Image>`` gets a caption; one on a ``<Text>`` question
gets the answer to that question about the view's image (visual question answering)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from backend.annotate.texts import write_texts
from backend.controls.base import Asking, Output, Question, TaskInput
from backend.labelstudio.config import ConfigView, ImageField, text_task
from backend.labelstudio.export import Comparison, compare_texts
from backend.labelstudio.protocol import TaskError

MAX_QUESTION_CHARS = 2000


@dataclass(frozen=True)
class ImageText:
    """Write text into ``control`` about a whole image: a caption, or the answer to the question in task data
    under ``question`` (the <Text> object's key)."""

    tags: ClassVar[frozenset[str]] = frozenset({"TextArea"})
    control: str
    image: ImageField
    to_name: str  # the <Image>, or the <Text> object holding the question
    question: str | None = None

    @classmethod
    def serves(cls, control: Any, view: ConfigView) -> bool:
        if control.tag not in cls.tags:
            return False
        if view.question_of(control) is not None:
            return view.first_image is not None
        return view.image_of(control) is not None and text_task(control) in {"caption", "answer"}

    @classmethod
    def from_control(cls, control: Any, view: ConfigView) -> ImageText | None:
        key = view.question_of(control)
        if key is not None:
            assert view.first_image is not None
            return cls(control.name, view.first_image, control.to_name[0], key)
        image = view.image_of(control)
        assert image is not None
        return cls(control.name, image, image.name)

    def questions(self, task: TaskInput) -> list[Question]:
        if not task.whole_image:
            return []
        image = task.image(self.image)
        return [Question(task.index, image, text=self._question(task.task) if self.question else None)]

    def compare(self, task_id: int, predicted: list[dict], human: list[dict], score: float | None) -> Comparison:
        return compare_texts(self.control, predicted, human, whole_image=True)

    def training_items(self, task: dict, results: list[dict], reviewed: bool, score: float | None) -> list:
        return []  # text trains no classifier

    def answer(self, asking: Asking, questions: Sequence[Question]) -> list[Output | None]:
        texts = write_texts(asking.engine, asking.prompts, [(q.image, q.text) for q in questions])
        return [
            Output(question, self.control, self.to_name, "textarea", {"text": [text.text]},
                   confidence=text.confidence, ranks_task=text.confidence is not None)
            if text.text else None
            for question, text in zip(questions, texts, strict=True)
        ]  # fmt: skip

    def _question(self, task: dict) -> str:
        data = task.get("data") if isinstance(task.get("data"), dict) else {}
        question = data.get(self.question)
        if not isinstance(question, str) or not question.strip():
            raise TaskError(f"task data has no question text under {self.question!r}")
        return question.strip()[:MAX_QUESTION_CHARS]
