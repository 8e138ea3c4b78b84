"""Label Studio tasks → predictions: the control handlers' questions, batched, scored, and written once.

For each chunk of tasks the predictor asks every handler (``backend.controls``) its questions
in registry order, scores every predicted label (critic, fusion, calibration), and only then
builds each task's results, in order, each with its final score. It owns nothing
type-specific.

One broken task never sinks the others: whatever fails (image, region, model) becomes
an error entry for that task alone, which Label Studio logs and does not store, so
the task is predicted again on the next retrieval.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from PIL import Image

from backend import deadline
from backend.annotate.critic import judge
from backend.annotate.mapping import LabelMapper
from backend.annotate.suspicion import fuse
from backend.controls.base import Asking, ControlHandler, Drawn, Output, Predicted, Question, TaskInput
from backend.deadline import DeadlineExceeded
from backend.labelstudio.auth import LabelStudioAuth
from backend.labelstudio.client import LabelStudioSites
from backend.labelstudio.config import ImageField, ProjectSpec, check_label_count, parse_label_config
from backend.labelstudio.media import ImageLoader, MediaError
from backend.labelstudio.outcomes import PredictedLabel
from backend.labelstudio.protocol import TaskError, json_type, label_studio_id, project_id
from backend.labelstudio.regions import (
    MODEL_IMAGE_MAX_PIXELS,
    RegionError,
    box_from_region,
    box_label,
    crop_box,
    shrink_to,
)
from backend.labelstudio.tasks import user_regions
from backend.models.engine import Engine, EngineUnavailable
from backend.models.providers import SERVED
from backend.models.slot import EngineSlot
from backend.prompts import PromptBook
from backend.reviews import ReviewStore
from backend.settings import Settings
from backend.telemetry import Telemetry
from backend.training.versions import ClassifierVersions

log = logging.getLogger(__name__)
SCORING = "options-v3"  # bump when the way answers are scored changes
SCORE_MEANING = "P(every predicted label in the task is correct): low = suspicious; sort ascending to review first"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class _Scored:
    """A predicted label with its estimated P(correct): ``raw`` from the fused signals, ``p_correct`` calibrated."""

    output: Output
    predicted: Predicted
    raw: float
    p_correct: float


@dataclass
class _Outcome:
    task_id: Any
    outputs: list[Output] = field(default_factory=list)
    error: str | None = None
    reason: str | None = None  # the error's kind, as counted in telemetry ("deadline": not reached in time)

    def fail(self, message: str, reason: str) -> None:
        if self.error is None:
            self.error, self.reason = message, reason


@dataclass(frozen=True)
class Answer:
    """One prediction (or per-task error) per task, the positions of the tasks the deadline left unpredicted
    (their entries are errors saying so: what the server hands to background pre-annotation), and the
    model_version every entry carries."""

    predictions: list[dict | list]
    late: list[int]
    model_version: str


@dataclass
class _Prepared:
    """One task's questions for each handler, ready for the model."""

    task: int
    questions: list[tuple[ControlHandler, Question]] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        held = {id(question.image): question.image for _, question in self.questions}
        return sum(image.width * image.height for image in held.values())


@dataclass
class _Chunk:
    """Tasks annotated together: their questions are batched, their pixels held at once."""

    tasks: list[int] = field(default_factory=list)
    questions: list[tuple[ControlHandler, Question]] = field(default_factory=list)
    pixels: int = 0

    def add(self, prepared: _Prepared) -> None:
        self.tasks.append(prepared.task)
        self.questions += prepared.questions
        self.pixels += prepared.pixels


def model_version(s: Settings, prompts: PromptBook) -> str:
    """One stable string for (model, prompts, scoring, critic): returned by /setup, stamped on every prediction."""
    if s.model_version:
        return s.model_version
    parts = [s.mllm_provider, s.mllm_model, s.mllm_quantization, s.mllm_option_scoring, prompts.fingerprint(),
             SCORING, f"{s.tag_method}:{s.tag_threshold:g}/{s.tag_candidate_threshold:g}/{s.tag_group_size}",
             f"{s.label_mode}/{s.option_orders}",
             f"{s.box_padding:g}/{s.box_min_side}", f"critic={s.critic}:{s.critic_provider}:{s.critic_model}",
             f"cascade={s.cascade}:{s.cascade_threshold:g}"]  # fmt: skip
    if s.mllm_provider in SERVED:  # full-label and first-token give different scores from the same server
        parts.append(f"server-scoring={s.openai_scoring}")
    digest = hashlib.sha256("\0".join(parts).encode()).hexdigest()[:10]
    name = s.mllm_model.rstrip("/").split("/")[-1] or "model"
    return f"{name}-{digest}"


def run_isolated(fn: Callable[[list[T]], list[R]], items: list[T]) -> list[R | Exception]:
    """``fn`` over all items at once; if that fails, item by item so only the bad ones fail."""
    if not items:
        return []
    try:
        return list(fn(items))
    except EngineUnavailable as exc:  # the provider is down: every item would fail the same way
        return [exc] * len(items)
    except DeadlineExceeded:
        raise
    except Exception as exc:
        if len(items) == 1:
            return [exc]
        log.warning("batch of %d failed (%s); retrying one by one", len(items), type(exc).__name__)
    results: list[R | Exception] = []
    for item in items:
        try:
            results.extend(fn([item]))
        except DeadlineExceeded:
            raise
        except Exception as exc:
            results.append(exc)
    return results


class Predictor:
    def __init__(
        self,
        settings: Settings,
        slot: EngineSlot,
        loader: ImageLoader,
        prompts: PromptBook,
        sites: LabelStudioSites,
        telemetry: Telemetry,
        reviews: ReviewStore | None = None,
        mapper: LabelMapper | None = None,
        critic_slot: EngineSlot | None = None,
        classifiers: ClassifierVersions | None = None,
    ) -> None:
        self.settings = settings
        self.slot = slot
        self.loader = loader
        self.prompts = prompts
        self.sites = sites
        self.telemetry = telemetry
        self.reviews = reviews
        self.mapper = mapper
        self.critic_slot = critic_slot
        self.classifiers = classifiers

    def model_version(self) -> str:
        return model_version(self.settings, self.prompts)

    def spec(self, label_config: object) -> ProjectSpec:
        """The label config read and checked against this backend's limits (raises UnsupportedConfig)."""
        spec = parse_label_config(label_config)
        check_label_count(spec, self.settings.max_labels)
        return spec

    def predict(
        self, tasks: list[Any], label_config: object, project: str | None, context: dict | None
    ) -> list[dict | list]:
        """One prediction (or per-task error) per task, in order (see :meth:`answer`)."""
        return self.answer(tasks, label_config, project, context).predictions

    def answer(self, tasks: list[Any], label_config: object, project: str | None, context: dict | None) -> Answer:
        """One prediction (or per-task error) per task, in order, and which tasks the deadline left.

        Tasks are prepared in order and annotated in chunks whose images and crops fit
        ``PREDICT_MAX_PIXELS``, so a request's memory is bounded however many tasks it has.
        When the request's deadline (see :mod:`backend.deadline`) passes, the chunk under way
        and the tasks not reached get an error saying so; finished chunks keep their predictions.
        """
        spec = self.spec(label_config)
        engine = self.slot.get(deadline.bounded(self.settings.predict_wait_seconds))
        version = self.model_version()  # once: every entry of one answer carries the same version
        site = self.sites.for_project(project)
        pid = project_id(project)
        outcomes = [_Outcome(task.get("id") if isinstance(task, dict) else None) for task in tasks]
        predictions: list[dict | list] = [[] for _ in tasks]
        chunk = _Chunk()
        for index, task in enumerate(tasks):
            if deadline.remaining() == 0:
                self._fail(outcomes[index], "deadline", self._late_message())
                continue
            prepared = self._prepare_safely(index, task, spec, site, context, outcomes[index])
            if prepared is None:
                continue
            if chunk.tasks and chunk.pixels + prepared.pixels > self.settings.predict_max_pixels:
                self._annotate_chunk(engine, chunk, outcomes, predictions, pid, version)
                chunk = _Chunk()
            chunk.add(prepared)
        self._annotate_chunk(engine, chunk, outcomes, predictions, pid, version)
        for index, outcome in enumerate(outcomes):
            if outcome.error:
                predictions[index] = {"model_version": version, "error": f"task {str(outcome.task_id)[:40]}: "
                                      f"{outcome.error}"}  # fmt: skip
            elif predictions[index]:
                predictions[index] = {"model_version": version, **predictions[index]}  # type: ignore[dict-item]
        self.telemetry.predictions.inc(sum(1 for p in predictions if isinstance(p, dict) and "result" in p))
        late = [index for index, outcome in enumerate(outcomes) if outcome.reason == "deadline"]
        return Answer(predictions, late, version)

    def _annotate_chunk(
        self, engine: Engine, chunk: _Chunk, outcomes: list[_Outcome], predictions: list, project: int | None,
        version: str,
    ) -> None:  # fmt: skip
        if not chunk.tasks:
            return
        started, tokens_before = time.perf_counter(), engine.tokens_processed
        scored: list[_Scored] = []
        try:
            deadline.check("predicting")
            self._ask(engine, chunk, outcomes, project)
            scored = self._score(engine, [outcomes[index] for index in chunk.tasks], project)
        except DeadlineExceeded:
            for index in chunk.tasks:
                self._fail(outcomes[index], "deadline", self._late_message())
        for index in chunk.tasks:
            if not outcomes[index].error:
                predictions[index] = _prediction(outcomes[index], scored)
        seconds = time.perf_counter() - started
        self.telemetry.model_seconds.observe(seconds)
        tokens = engine.tokens_processed - tokens_before
        self._remember(project, version, [outcomes[i] for i in chunk.tasks], scored, seconds, tokens)

    def _ask(self, engine: Engine, chunk: _Chunk, outcomes: list[_Outcome], project: int | None) -> None:
        """Each handler's questions, batched across the chunk, in registry order (see ``backend.controls``)."""
        asking = Asking(engine, self.prompts, self.settings, self.mapper,
                        partial(self._classifier, project), on_cascade=self.telemetry.cascade_skipped.inc)  # fmt: skip
        for handler in dict.fromkeys(handler for handler, _ in chunk.questions):
            questions = [q for h, q in chunk.questions if h is handler and not outcomes[q.task].error]
            answers = run_isolated(partial(handler.answer, asking), questions)
            for question, output in zip(questions, answers, strict=True):
                if isinstance(output, Exception):
                    self._model_failed(outcomes[question.task], output)
                elif output is not None:
                    outcomes[question.task].outputs.append(output)
                    if output.region_label is not None and output.region is not None:
                        asking.region_labels.setdefault((question.task, output.region.id), output.region_label)
                    self.telemetry.regions.labels(kind=_kind(output)).inc()
                    if output.out_of_set is not None:
                        self.telemetry.out_of_set.inc()

    def _late_message(self) -> str:
        return (
            f"the request's time limit (PREDICT_DEADLINE_SECONDS={self.settings.predict_deadline_seconds:g}) ran out "
            "before this task was predicted; retrieve predictions again for the tasks left, or pre-annotate the "
            "project in the background (POST /jobs/preannotate)"
        )

    def _fail(self, outcome: _Outcome, reason: str, message: str) -> None:
        outcome.fail(message, reason)
        self.telemetry.task_errors.labels(reason=reason).inc()

    # --- images and crops -----------------------------------------------------------

    def _prepare_safely(
        self, index: int, task: Any, spec: ProjectSpec, site: LabelStudioAuth | None, context: dict | None,
        outcome: _Outcome,
    ) -> _Prepared | None:  # fmt: skip
        """The task's questions, or None after recording why it cannot be annotated."""
        try:
            if not isinstance(task, dict):
                raise TaskError(f"the task is {json_type(task)}, not a JSON object")
            if task.get("id") is not None and label_studio_id(task.get("id")) is None:
                raise TaskError(f"the task id {str(task.get('id'))[:30]} is not a Label Studio id (0 to 2^63 - 1)")
            prepared = self._prepare(index, task, spec, site, context)
        except (TaskError, MediaError, RegionError) as exc:
            self._fail(outcome, _reason(exc), str(exc))
            return None
        except DeadlineExceeded:
            self._fail(outcome, "deadline", self._late_message())
            return None
        except Exception as exc:  # a task must never sink the request; this one is a bug to report
            log.exception("task %s could not be prepared", outcome.task_id)
            self._fail(outcome, "data", f"the task could not be read ({type(exc).__name__}: {exc})"[:500])
            return None
        return prepared

    def _prepare(
        self, index: int, task: dict, spec: ProjectSpec, site: LabelStudioAuth | None, context: dict | None
    ) -> _Prepared:
        loaded: dict[tuple[str, int | None], Image.Image] = {}

        def image(field_: ImageField, item: int | None = None) -> Image.Image:
            if (field_.name, item) not in loaded:
                url = field_.url(task, item)
                loaded[field_.name, item] = self.loader.load(url, site, label_studio_id(task.get("id")))
            return loaded[field_.name, item]

        images_by_name = {f.name: f for f in spec.images}
        drawn: list[Drawn] = []
        for region in user_regions(task, context):
            box = box_from_region(region)
            if box.from_name not in spec.region_controls or box.to_name not in images_by_name:
                continue
            crop = crop_box(image(images_by_name[box.to_name], box.item_index), box, self.settings.box_padding,
                            self.settings.box_min_side)  # fmt: skip
            drawn.append(Drawn(box, crop, box_label(region)))
            self._check_held([d.crop for d in drawn])
        shown: dict[str, Image.Image] = {}

        def whole(field_: ImageField) -> Image.Image:  # as the model sees a whole image: one copy for every handler
            if field_.name not in shown:
                shown[field_.name] = shrink_to(image(field_), MODEL_IMAGE_MAX_PIXELS)
            return shown[field_.name]

        interactive = bool(context and context.get("result"))  # label only the region just drawn
        given = TaskInput(index, task, tuple(drawn), whole, not interactive, self.settings.max_labels,
                          self.settings.region_view)  # fmt: skip
        prepared = _Prepared(index)
        for handler in spec.handlers:
            prepared.questions += [(handler, question) for question in handler.questions(given)]
            self._check_held([d.crop for d in drawn] + [i for _, q in prepared.questions for i in (q.image, q.context)
                                                         if i is not None])  # fmt: skip
        return prepared

    def _check_held(self, images: Sequence[Image.Image]) -> None:
        """Refuse a task as soon as what it holds for the model passes the request's budget (not after)."""
        pixels = sum(i.width * i.height for i in {id(i): i for i in images}.values())
        if pixels > self.settings.predict_max_pixels:
            raise TaskError(f"this task's images and regions hold {pixels} pixels at once, over "
                            f"PREDICT_MAX_PIXELS={self.settings.predict_max_pixels}")  # fmt: skip

    # --- suspicion ---------------------------------------------------------------------

    def _score(self, engine: Engine, outcomes: list[_Outcome], project: int | None) -> list[_Scored]:
        """Every predicted label's P(correct): its signals (plus the critic, the project's classifier and what
        other outputs say of its region), fused, then calibrated on the project's review outcomes."""
        judged = [(o, p) for outcome in outcomes if not outcome.error for o in outcome.outputs for p in o.predicted]
        opinions = {(o.question.task, o.result_id): o.opinion for outcome in outcomes for o in outcome.outputs
                    if o.opinion is not None and o.region is not None}  # fmt: skip
        verdicts = self._critic(engine, judged)
        agreement = self._classifier_agreement(judged, project)
        calibrator = self.reviews.calibrator(project) if self.reviews is not None else None
        scored = []
        for (output, predicted), verdict, classifier in zip(judged, verdicts, agreement, strict=True):
            opinion = opinions.get((output.question.task, output.result_id))
            signals = replace(predicted.signals, critic=verdict, classifier=classifier,
                              name_agrees=None if opinion is None else opinion == predicted.label)  # fmt: skip
            raw = fuse(signals)
            p_correct = calibrator(raw) if calibrator is not None else raw
            scored.append(_Scored(output, replace(predicted, signals=signals), raw, p_correct))
        return scored

    def _critic(self, engine: Engine, judged: list[tuple[Output, Predicted]]) -> list[float | None]:
        """The judge's P(correct) for each label, except those whose own probability already answers a yes/no
        question about them (confirmed tags): asking again would count the same evidence twice."""
        verdicts: list[float | None] = [None] * len(judged)
        asked = [i for i, (_, predicted) in enumerate(judged) if not predicted.confirmed]
        if not self.settings.critic or not asked:
            return verdicts
        try:
            critic = self.critic_slot.get(self.settings.predict_wait_seconds) if self.critic_slot else engine
            hints = {label: hint for output, _ in judged for label, hint in output.hints.items()}
            images = [judged[i][0].question.image for i in asked]
            found = judge(critic, self.prompts, images, [judged[i][1].label for i in asked],
                          [judged[i][1].alternative for i in asked], hints)  # fmt: skip
        except Exception as exc:  # the critic is advice: without it, scores fall back to the other signals
            log.warning("critic pass failed (%s); scoring without it", _describe(exc))
            self.telemetry.task_errors.labels(reason="critic").inc()
            return verdicts
        for i, verdict in zip(asked, found, strict=True):
            verdicts[i] = float(verdict)
        return verdicts

    def _classifier(self, project: int | None, control: str):
        """The project's trained classifier for ``control``, if there is one."""
        if self.classifiers is None or project is None:
            return None
        return self.classifiers.classifier(project, control)

    def _classifier_agreement(self, judged: list[tuple[Output, Predicted]], project: int | None) -> list[float | None]:
        """The project's trained classifier's probability for each label (confident learning's self-confidence)."""
        agreement: list[float | None] = [None] * len(judged)
        own = [(i, output, p) for i, (output, p) in enumerate(judged) if not p.from_classifier]  # no self-agreement
        for control, items in _group(own, lambda item: item[1].control).items():
            try:
                classifier = self._classifier(project, control)
                if classifier is None:
                    continue
                probabilities = classifier.predict_proba([output.question.image for _, output, _ in items])
            except Exception as exc:  # a broken classifier must not stop predictions
                log.warning("classifier for project %s/%s failed (%s)", project, control, _describe(exc))
                continue
            for (index, _, predicted), row in zip(items, probabilities, strict=True):
                if predicted.label in classifier.labels:
                    agreement[index] = float(row[classifier.labels.index(predicted.label)])
        return agreement

    def _remember(
        self, project: int | None, version: str, outcomes: list[_Outcome], scored: list[_Scored], seconds: float,
        tokens: int,
    ) -> None:  # fmt: skip
        """Keep each predicted label's raw score (to learn from review) and each task's model usage (for cost)."""
        done = [o for o in outcomes if not o.error and isinstance(o.task_id, int) and o.outputs]
        if project is None or not done or self.reviews is None:
            return
        task_of = {id(output): int(o.task_id) for o in done for output in o.outputs}
        mine = [s for s in scored if id(s.output) in task_of]
        labels = [PredictedLabel(task_of[id(s.output)], s.output.result_id, s.output.control, s.predicted.label, s.raw)
                  for s in mine]  # fmt: skip
        usage = [(int(o.task_id), seconds / len(done), 1, _regions_labelled(o), tokens // len(done)) for o in done]
        self.reviews.record_predictions(project, version, labels, [s.predicted.signals.annotator for s in mine],
                                        [s.output.out_of_set for s in mine], usage=usage)  # fmt: skip

    def _model_failed(self, outcome: _Outcome, exc: Exception) -> None:
        log.warning("model failed on task %s: %s", outcome.task_id, _describe(exc))
        self._fail(outcome, "model", f"the model could not answer ({_describe(exc)})")


def _prediction(outcome: _Outcome, scored: list[_Scored]) -> dict | list:
    """The task's results, each built once with its final score, and the task's score.

    A result's score is P(all its labels are correct) (its own confidence for text); the
    task's is P(every label in the task is correct), or, with no label predicted, the lowest
    confidence of the decisions that rank it.
    """
    mine = {id(o): [s for s in scored if s.output is o] for o in outcome.outputs}
    results, task_labels = [], []
    for output in outcome.outputs:
        labels = mine[id(output)]
        task_labels += labels
        if output.value is not None:
            score = math.prod(s.p_correct for s in labels) if labels else output.confidence
            results.append(output.result(score))
    if task_labels:
        task_score: float | None = math.prod(s.p_correct for s in task_labels)
    else:
        ranking = [o.confidence for o in outcome.outputs if o.ranks_task and o.confidence is not None]
        if not ranking and not results:
            return []  # nothing to annotate yet: store nothing, so a later retrieval tries again
        task_score = min(ranking) if ranking else None
    return {"score": task_score, "score_meaning": SCORE_MEANING, "result": results}


def _regions_labelled(outcome: _Outcome) -> int:
    return len({o.result_id for o in outcome.outputs if o.region is not None and o.region_label is not None})


def _kind(output: Output) -> str:
    if output.result_type == "textarea":
        return "text"
    return "box" if output.region is not None else "image"


def _group(items: Sequence[T], key: Callable[[T], Any]) -> dict[Any, list[T]]:
    groups: dict[Any, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _reason(exc: Exception) -> str:
    if isinstance(exc, MediaError):
        return "media"
    if isinstance(exc, RegionError):
        return "region"
    return "data"
