"""The handler registry: a new control type is one class plus one registry line, with no change elsewhere."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from backend import Annotator
from backend.annotate.choice import choose
from backend.annotate.suspicion import Signals
from backend.controls import HANDLERS, ImageChoices, ImageText, RegionLabels, RegionText
from backend.controls.base import Asking, Output, Predicted, Question, TaskInput
from backend.labelstudio.config import ConfigView, ImageField, UnsupportedConfig, parse_label_config
from backend.labelstudio.export import Comparison
from tests.test_templates import image_url

RATING = """<View><Image name="image" value="$image"/><Rating name="quality" toName="image" maxRating="3"/></View>"""


@dataclass(frozen=True)
class StarRating:
    """A whole-image <Rating>: the model chooses 1 to maxRating stars."""

    tags: ClassVar[frozenset[str]] = frozenset({"Rating"})
    control: str
    image: ImageField
    stars: int

    @classmethod
    def serves(cls, control: Any, view: ConfigView) -> bool:
        return control.tag in cls.tags and view.image_of(control) is not None

    @classmethod
    def from_control(cls, control: Any, view: ConfigView) -> StarRating:
        return cls(control.name, view.image_of(control), int(control.attr.get("maxRating", 5)))

    def questions(self, task: TaskInput) -> list[Question]:
        return [Question(task.index, task.image(self.image), labels=tuple(map(str, range(1, self.stars + 1))))]

    def answer(self, asking: Asking, questions: list[Question]) -> list[Output | None]:
        choices = choose(asking.engine, [q.image for q in questions], "How good is this image?", questions[0].labels)
        return [Output(q, self.control, self.image.name, "rating", {"rating": int(c.label)},
                       predicted=(Predicted(c.label, Signals(annotator=c.probability)),))
                for q, c in zip(questions, choices, strict=True)]  # fmt: skip

    def training_items(self, task: dict, results: list[dict], reviewed: bool, score: float | None) -> list:
        return []

    def compare(self, task_id: int, predicted: list[dict], human: list[dict], score: float | None) -> Comparison:
        return Comparison()


def test_the_registry_routes_each_control_to_its_handler():
    spec = parse_label_config("""<View><Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image"><Label value="a"/></RectangleLabels>
      <TextArea name="name" toName="image" perRegion="true"/>
      <Choices name="scene" toName="image"><Choice value="x"/><Choice value="y"/></Choices>
      <TextArea name="caption" toName="image"/></View>""")
    assert [type(h) for h in spec.handlers] == [RegionLabels, RegionText, ImageChoices, ImageText]
    assert [h.control for h in spec.handlers] == ["label", "name", "scene", "caption"]


def test_a_new_control_type_is_one_class_and_one_registry_line(tiny_llava, monkeypatch):
    from backend.labelstudio import config

    with pytest.raises(UnsupportedConfig, match="nothing to annotate"):
        parse_label_config(RATING)
    monkeypatch.setattr("backend.controls.HANDLERS", (*HANDLERS, StarRating))  # the one registry line
    config._parse_label_config.cache_clear()
    annotator = Annotator(model=tiny_llava, settings={"CRITIC": "off"})
    [prediction] = annotator.predict([{"id": 1, "data": {"image": image_url()}}], RATING)
    [result] = prediction["result"]
    assert result["type"] == "rating" and result["value"]["rating"] in {1, 2, 3}
    assert result["score"] == prediction["score"] and 0 < prediction["score"] < 1
    config._parse_label_config.cache_clear()
