"""What a control handler is, and the data that flows through one prediction.

A handler serves one kind of Label Studio control (``<RectangleLabels>``, ``<Choices>``,
``<TextArea>``, ...). The label config is read into one handler per served control; for each
task a handler says what it wants to ask (:class:`Question`), answers a batch of questions
through the annotation methods (:class:`Output`, one per question), and the predictor scores
the labels every output predicts and builds each result once, in order, with its score.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from PIL import Image

from backend.annotate.suspicion import Signals
from backend.labelstudio.protocol import TaskError
from backend.labelstudio.regions import LABEL_SCORES, OUT_OF_SET, Box, box_result, image_result

if TYPE_CHECKING:
    from backend.annotate.mapping import LabelMapper
    from backend.labelstudio.config import ConfigView, ImageField, LabelSet
    from backend.labelstudio.export import Comparison, LabelledItem
    from backend.models.engine import Engine
    from backend.prompts import PromptBook
    from backend.settings import Settings
    from backend.training.classifier import Classifier


@dataclass(frozen=True)
class Drawn:
    """A region a person drew, cropped for the model."""

    box: Box
    crop: Image.Image
    user_label: str | None  # the label the person gave it, if any


@dataclass(frozen=True)
class TaskInput:
    """What a handler may read of one task: its data, the regions drawn on it, and its images."""

    index: int
    task: dict[str, Any]
    regions: tuple[Drawn, ...]
    image: Callable[[ImageField], Image.Image]  # the whole image as the model sees it (shrunk), made once per task
    whole_image: bool  # False in an interactive request: only the region just drawn is labelled
    max_labels: int  # MAX_LABELS: the most labels a question may score, whether the config or the task gives them
    region_view: str = "crop"  # REGION_VIEW: how a region's label question shows it, unless its control says

    def labels_of(self, source: LabelSet) -> tuple[str, ...]:
        """``source``'s labels for this task, refused past ``max_labels`` (a task's data can list any number)."""
        labels = source.of(self.task)
        if len(labels) > self.max_labels:
            raise TaskError(f"the task's data holds {len(labels)} labels under {source.data_key!r}, over "
                            f"MAX_LABELS={self.max_labels}")  # fmt: skip
        return labels

    def drawn_with(self, controls: Sequence[str], image: ImageField) -> list[Drawn]:
        """The regions drawn on ``image`` with one of ``controls``."""
        return [d for d in self.regions if d.box.from_name in controls and d.box.to_name == image.name]


@dataclass(frozen=True)
class Question:
    """One thing to ask the model for one task: about a drawn region, or about a whole image."""

    task: int
    image: Image.Image  # the region's crop, or the whole image
    region: Drawn | None = None
    labels: tuple[str, ...] = ()  # the label set to choose from (the config's, or the task's own)
    text: str | None = None  # a question from the task's data (visual question answering)
    context: Image.Image | None = None  # the whole image with the region outlined, when the label is asked so


@dataclass(frozen=True)
class Predicted:
    """A label an output predicts; the predictor estimates P(it is correct) from its signals."""

    label: str
    signals: Signals
    from_classifier: bool = False  # chosen by the project's trained classifier (CASCADE), not the MLLM
    confirmed: bool = False  # its probability already answers a yes/no question about it: the critic would re-ask
    alternative: str | None = None  # the label ranked next, which the critic weighs it against


@dataclass(frozen=True)
class Output:
    """A handler's answer to one question: the result it writes, and what the predictor needs to score it.

    The result's score is P(all its ``predicted`` labels are correct) or, for a result that
    predicts no label (text), its ``confidence``. ``value`` None writes nothing: a decision
    (e.g. "no tag applies") that only ranks the task by its ``confidence``.
    """

    question: Question
    control: str
    to_name: str
    result_type: str
    value: dict[str, Any] | None
    predicted: tuple[Predicted, ...] = ()
    confidence: float | None = None
    ranks_task: bool = False  # with no label predicted in the task, its confidence is the task's score
    region_label: str | None = None  # the label this output gives its region, for handlers asked after it
    opinion: str | None = None  # the label this output's text implies for its region (a fine name's category)
    hints: dict[str, str] = field(default_factory=dict)  # label → definition, for the critic
    label_scores: dict[str, float] | None = None  # every label's probability, written beside the chosen ones
    out_of_set: str | None = None  # an open-world answer no label was similar enough to: a candidate new class

    @property
    def region(self) -> Box | None:
        return self.question.region.box if self.question.region is not None else None

    @property
    def result_id(self) -> str:
        return self.region.id if self.region is not None else self.control

    def result(self, score: float | None) -> dict[str, Any]:
        assert self.value is not None
        if self.region is not None:
            result = box_result(self.region, self.control, self.to_name, self.result_type, self.value, score)
        else:
            result = image_result(self.control, self.to_name, self.result_type, self.value, score)
        if self.label_scores is not None:  # Label Studio stores and exports a result's extra keys as they are
            result[LABEL_SCORES] = self.label_scores
        if self.out_of_set is not None:
            result[OUT_OF_SET] = self.out_of_set
        return result


@dataclass
class Asking:
    """What handlers ask with: the model and prompts, and the project's helpers."""

    engine: Engine
    prompts: PromptBook
    settings: Settings
    mapper: LabelMapper | None = None
    classifier: Callable[[str], Classifier | None] = lambda control: None  # the project's, per control
    region_labels: dict[tuple[int, str], str] = field(default_factory=dict)  # (task, region id) → label so far
    on_cascade: Callable[[int], None] = lambda skipped: None


class ControlHandler(Protocol):
    """One served control of a label config. A new control type is a class like this plus a registry line."""

    tags: ClassVar[frozenset[str]]  # the Label Studio tags it may serve
    control: str
    image: ImageField

    @classmethod
    def serves(cls, control: Any, view: ConfigView) -> bool:
        """Whether this handler serves ``control`` (a label_studio_sdk control tag) in this config."""
        ...

    @classmethod
    def from_control(cls, control: Any, view: ConfigView) -> ControlHandler | None:
        """The handler for ``control``; None when there is nothing to annotate (noted in ``view.ignored``)."""
        ...

    def questions(self, task: TaskInput) -> list[Question]:
        """What to ask the model for this task."""
        ...

    def answer(self, asking: Asking, questions: Sequence[Question]) -> list[Output | None]:
        """One output per question (None: nothing to write), batched."""
        ...

    def training_items(
        self, task: dict, results: list[dict], reviewed: bool, score: float | None
    ) -> list[LabelledItem]:
        """What a task's annotation (``reviewed``) or our prediction teaches the project's classifier."""
        ...

    def compare(self, task_id: int, predicted: list[dict], human: list[dict], score: float | None) -> Comparison:
        """Our prediction's results for this control beside the human's (``mllm-backend eval``)."""
        ...
