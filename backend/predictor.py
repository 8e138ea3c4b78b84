"""Label Studio tasks → predictions: images and crops in, batched model questions, result JSON out.

One broken task never sinks the others: whatever fails (image, box, model) becomes
an error entry for that task alone, which Label Studio logs and does not store, so
the task is predicted again on the next retrieval.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, TypeVar

from PIL import Image

from backend import deadline
from backend.annotate.boxes import FineName, label_crops, name_crops, read_crops
from backend.annotate.choice import Choice
from backend.annotate.critic import judge
from backend.annotate.mapping import LabelMapper
from backend.annotate.suspicion import Signals, fuse
from backend.annotate.tagging import Tags, TagSettings, classify_images, tag_images
from backend.annotate.texts import write_texts
from backend.deadline import DeadlineExceeded
from backend.labelstudio.auth import LabelStudioAuth
from backend.labelstudio.client import LabelStudioSites
from backend.labelstudio.config import (
    BoxLabelTarget,
    BoxTextTarget,
    ImageChoiceTarget,
    ImageField,
    ImageTextTarget,
    LabelSet,
    ProjectSpec,
    check_label_count,
    parse_label_config,
)
from backend.labelstudio.media import ImageLoader, MediaError
from backend.labelstudio.protocol import TaskError, json_type, label_studio_id, project_id
from backend.labelstudio.regions import (
    MODEL_IMAGE_MAX_PIXELS,
    Box,
    RegionError,
    box_from_region,
    box_label,
    box_result,
    crop_box,
    image_result,
    shrink_to,
    text_result,
)
from backend.labelstudio.review import PredictedLabel
from backend.labelstudio.tasks import user_regions
from backend.metrics import Metrics
from backend.models.engine import Engine, EngineUnavailable
from backend.models.slot import EngineSlot
from backend.prompts import PromptBook
from backend.reviews import ReviewStore
from backend.settings import Settings
from backend.training.versions import VersionStore

log = logging.getLogger(__name__)
SCORING = "options-v3"  # bump when the way answers are scored changes
SCORE_MEANING = "P(every predicted label in the task is correct): low = suspicious; sort ascending to review first"

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Judged:
    """A predicted label waiting for its suspicion score."""

    image: Image.Image
    label: str
    signals: Signals
    region: dict  # the result region whose score it sets (several tags share one region)
    region_id: str
    control: str
    hints: dict[str, str] = field(default_factory=dict)
    from_classifier: bool = False  # labelled by the trained classifier (cascade), not the MLLM
    raw: float = 0.0
    p_correct: float = 0.0


@dataclass
class _Outcome:
    task_id: Any
    results: list[dict] = field(default_factory=list)
    judged: list[_Judged] = field(default_factory=list)
    confidences: list[float] = field(default_factory=list)  # decisions with no predicted label ("no tags")
    box_labels: dict[str, str] = field(default_factory=dict)  # box id → label the model chose
    error: str | None = None

    def fail(self, reason: str) -> None:
        self.error = self.error or reason

    def prediction(self, model_version: str) -> dict | list:
        if self.error:
            return {"model_version": model_version, "error": f"task {str(self.task_id)[:40]}: {self.error}"}
        if not self.judged and not self.confidences and not self.results:
            return []  # nothing to annotate yet: store nothing, so a later retrieval tries again
        if self.judged:
            score: float | None = math.prod(j.p_correct for j in self.judged)
        else:
            score = min(self.confidences) if self.confidences else None
        return {"model_version": model_version, "score": score, "score_meaning": SCORE_MEANING, "result": self.results}


@dataclass(frozen=True)
class _BoxJob:
    task: int
    box: Box
    user_label: str | None
    crop: Image.Image
    label_sets: dict[str, tuple[str, ...]]  # control → this task's labels for it


@dataclass(frozen=True)
class _ImageJob:
    task: int
    target: ImageChoiceTarget
    image: Image.Image
    labels: tuple[str, ...]


@dataclass(frozen=True)
class _TextJob:
    task: int
    target: ImageTextTarget
    image: Image.Image
    question: str | None


@dataclass
class _Prepared:
    """One task's crops and images, ready for the model."""

    task: int
    box_jobs: list[_BoxJob] = field(default_factory=list)
    image_jobs: list[_ImageJob] = field(default_factory=list)
    text_jobs: list[_TextJob] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        held = [job.crop for job in self.box_jobs] + [job.image for job in (*self.image_jobs, *self.text_jobs)]
        return sum(image.width * image.height for image in {id(image): image for image in held}.values())


@dataclass
class _Chunk:
    """Tasks annotated together: their questions are batched, their pixels held at once."""

    tasks: list[int] = field(default_factory=list)
    box_jobs: list[_BoxJob] = field(default_factory=list)
    image_jobs: list[_ImageJob] = field(default_factory=list)
    text_jobs: list[_TextJob] = field(default_factory=list)
    pixels: int = 0

    def add(self, prepared: _Prepared) -> None:
        self.tasks.append(prepared.task)
        self.box_jobs += prepared.box_jobs
        self.image_jobs += prepared.image_jobs
        self.text_jobs += prepared.text_jobs
        self.pixels += prepared.pixels


def model_version(s: Settings, prompts: PromptBook) -> str:
    """One stable string for (model, prompts, scoring, critic): returned by /setup, stamped on every prediction."""
    if s.model_version:
        return s.model_version
    parts = [s.mllm_provider, s.mllm_model, s.mllm_quantization, s.mllm_option_scoring, prompts.fingerprint(),
             SCORING, f"{s.tag_threshold:g}/{s.tag_candidate_threshold:g}/{s.tag_group_size}",
             f"{s.box_padding:g}/{s.box_min_side}", f"critic={s.critic}:{s.critic_provider}:{s.critic_model}",
             f"cascade={s.cascade}:{s.cascade_threshold:g}"]  # fmt: skip
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
        metrics: Metrics,
        reviews: ReviewStore | None = None,
        mapper: LabelMapper | None = None,
        critic_slot: EngineSlot | None = None,
        versions: VersionStore | None = None,
    ) -> None:
        self.settings = settings
        self.slot = slot
        self.loader = loader
        self.prompts = prompts
        self.sites = sites
        self.metrics = metrics
        self.reviews = reviews
        self.mapper = mapper
        self.critic_slot = critic_slot
        self.versions = versions

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
        """One prediction (or per-task error) per task, in order.

        Tasks are prepared in order and annotated in chunks whose images and crops fit
        ``PREDICT_MAX_PIXELS``, so a request's memory is bounded however many tasks it has.
        When the request's deadline (see :mod:`backend.deadline`) passes, the chunk under way
        and the tasks not reached get an error saying so; finished chunks keep their predictions.
        """
        spec = self.spec(label_config)
        engine = self.slot.get(deadline.bounded(self.settings.predict_wait_seconds))
        site = self.sites.for_project(project)
        pid = project_id(project)
        outcomes = [_Outcome(task.get("id") if isinstance(task, dict) else None) for task in tasks]
        chunk = _Chunk()
        for index, task in enumerate(tasks):
            if deadline.remaining() == 0:
                self._fail(outcomes[index], "deadline", self._late_message())
                continue
            prepared = self._prepare_safely(index, task, spec, site, context, outcomes[index])
            if prepared is None:
                continue
            if chunk.tasks and chunk.pixels + prepared.pixels > self.settings.predict_max_pixels:
                self._annotate_chunk(engine, spec, chunk, outcomes, pid)
                chunk = _Chunk()
            chunk.add(prepared)
        self._annotate_chunk(engine, spec, chunk, outcomes, pid)
        version = self.model_version()
        predictions = [outcome.prediction(version) for outcome in outcomes]
        self.metrics.predictions.inc(sum(1 for p in predictions if isinstance(p, dict) and "result" in p))
        return predictions

    def _annotate_chunk(
        self, engine: Engine, spec: ProjectSpec, chunk: _Chunk, outcomes: list[_Outcome], project: int | None
    ) -> None:
        if not chunk.tasks:
            return
        started, tokens_before = time.perf_counter(), getattr(engine, "tokens_processed", 0)
        try:
            deadline.check("predicting")
            self._ask(engine, spec, chunk, outcomes, project)
        except DeadlineExceeded:
            for index in chunk.tasks:
                self._fail(outcomes[index], "deadline", self._late_message())
        seconds = time.perf_counter() - started
        self.metrics.model_seconds.observe(seconds)
        tokens = getattr(engine, "tokens_processed", 0) - tokens_before
        self._remember(project, self.model_version(), [outcomes[i] for i in chunk.tasks], seconds, tokens)

    def _ask(
        self, engine: Engine, spec: ProjectSpec, chunk: _Chunk, outcomes: list[_Outcome], project: int | None
    ) -> None:
        for target in spec.boxes:
            mine = [j for j in chunk.box_jobs if _belongs(j.box, target)]
            self._label_boxes(engine, target, mine, outcomes, project)
        for text_target in spec.texts:
            mine = [j for j in chunk.box_jobs if _belongs(j.box, text_target)]
            self._name_boxes(engine, text_target, spec, mine, outcomes)
        self._choose_for_images(engine, chunk.image_jobs, outcomes)
        self._write_image_texts(engine, chunk.text_jobs, outcomes)
        judged = [j for index in chunk.tasks if not outcomes[index].error for j in outcomes[index].judged]
        self._score(engine, judged, project)

    def _late_message(self) -> str:
        return (
            f"the request's time limit (PREDICT_DEADLINE_SECONDS={self.settings.predict_deadline_seconds:g}) ran out "
            "before this task was predicted; retrieve predictions again for the tasks left, or pre-annotate the "
            "project in the background (POST /jobs/preannotate)"
        )

    def _fail(self, outcome: _Outcome, reason: str, message: str) -> None:
        outcome.fail(message)
        self.metrics.task_errors.labels(reason=reason).inc()

    # --- images and crops -----------------------------------------------------------

    def _prepare_safely(
        self, index: int, task: Any, spec: ProjectSpec, site: LabelStudioAuth | None, context: dict | None,
        outcome: _Outcome,
    ) -> _Prepared | None:  # fmt: skip
        """The task's crops and images, or None after recording why it cannot be annotated."""
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
        box_controls = {c for t in (*spec.boxes, *spec.texts) for c in t.box_controls}
        label_sets = {t.control: self._labels_of(t.source, task) for t in spec.boxes if t.label_set is not None}
        prepared = _Prepared(index)
        for region in user_regions(task, context):
            box = box_from_region(region)
            if box.from_name not in box_controls or box.to_name not in images_by_name:
                continue
            crop = crop_box(image(images_by_name[box.to_name], box.item_index), box, self.settings.box_padding,
                            self.settings.box_min_side)  # fmt: skip
            prepared.box_jobs.append(_BoxJob(index, box, box_label(region), crop, label_sets))
            self._check_held(prepared)
        if not (context and context.get("result")):  # interactive requests label only the region just drawn
            for target in spec.choices:
                held = shrink_to(image(target.image), MODEL_IMAGE_MAX_PIXELS)
                prepared.image_jobs.append(_ImageJob(index, target, held, self._labels_of(target.source, task)))
                self._check_held(prepared)
            for text_target in spec.image_texts:
                held = shrink_to(image(text_target.image), MODEL_IMAGE_MAX_PIXELS)
                question = _question(task, text_target.question) if text_target.question else None
                prepared.text_jobs.append(_TextJob(index, text_target, held, question))
                self._check_held(prepared)
        return prepared

    def _labels_of(self, source: LabelSet, task: dict) -> tuple[str, ...]:
        labels = source.of(task)
        if len(labels) > self.settings.max_labels:
            raise TaskError(f"the task's data holds {len(labels)} labels under {source.data_key!r}, over "
                            f"MAX_LABELS={self.settings.max_labels}")  # fmt: skip
        return labels

    def _check_held(self, prepared: _Prepared) -> None:
        """Refuse a task as soon as what it holds for the model passes the request's budget (not after)."""
        if prepared.pixels > self.settings.predict_max_pixels:
            raise TaskError(f"this task's images and regions hold {prepared.pixels} pixels at once, over "
                            f"PREDICT_MAX_PIXELS={self.settings.predict_max_pixels}")  # fmt: skip

    # --- model questions ----------------------------------------------------------------

    def _label_boxes(
        self, engine: Engine, target: BoxLabelTarget, jobs: list[_BoxJob], outcomes: list[_Outcome], project: int | None
    ) -> None:
        cascaded = self._cascade(target, jobs, project)
        rest = [job for index, job in enumerate(jobs) if index not in cascaded]
        questions = [(job.crop, job.label_sets.get(target.control, target.labels)) for job in rest]
        asked = iter(run_isolated(partial(self._label_crops, engine), questions))
        for index, job in enumerate(jobs):
            answer = cascaded[index] if index in cascaded else next(asked)
            if isinstance(answer, Exception):
                self._model_failed(outcomes[job.task], answer)
                continue
            payload = target.source.payload(target.result_type, answer.label)
            region = box_result(job.box, target.control, target.image.name, target.result_type, payload, None)
            signals = Signals(annotator=answer.probability, margin=answer.margin, mapped=answer.mapped)
            outcome = outcomes[job.task]
            outcome.results.append(region)
            outcome.judged.append(_Judged(job.crop, answer.label, signals, region, job.box.id, target.control,
                                          from_classifier=index in cascaded))  # fmt: skip
            outcome.box_labels.setdefault(job.box.id, answer.label)
            self.metrics.regions.labels(kind="box").inc()

    def _cascade(self, target: BoxLabelTarget, jobs: list[_BoxJob], project: int | None) -> dict[int, Choice]:
        """With CASCADE=on, boxes the trained classifier is sure about skip the MLLM."""
        if not self.settings.cascade or self.versions is None or project is None or not jobs:
            return {}
        classifier = self.versions.classifier(project, target.control)
        if classifier is None or classifier.multi_label or tuple(classifier.labels) != tuple(target.labels):
            return {}
        sure = {}
        for index, row in enumerate(classifier.predict_proba([job.crop for job in jobs])):
            best = int(row.argmax())
            if row[best] >= self.settings.cascade_threshold:
                sure[index] = Choice(target.labels[best], float(row[best]), target.labels, tuple(float(p) for p in row))
        self.metrics.cascade_skipped.inc(len(sure))
        return sure

    def _label_crops(self, engine: Engine, questions: list[tuple[Image.Image, tuple[str, ...]]]) -> list[Choice]:
        """Each crop's label from its own label set (a set read from task data can differ between tasks)."""
        answers: list[Choice | None] = [None] * len(questions)
        for labels, indices in _group(range(len(questions)), lambda i: questions[i][1]).items():
            crops = [questions[i][0] for i in indices]
            for i, answer in zip(indices, label_crops(engine, self.prompts, crops, labels), strict=True):
                answers[i] = answer
        return [answer for answer in answers if answer is not None]

    def _name_boxes(
        self, engine: Engine, target: BoxTextTarget, spec: ProjectSpec, jobs: list[_BoxJob], outcomes: list[_Outcome]
    ) -> None:
        label_set = next((t.labels for t in spec.boxes if t.image == target.image), ())
        labels = [outcomes[j.task].box_labels.get(j.box.id) or j.user_label or "object" for j in jobs]
        ask = partial(self._read_crops if target.task == "read" else self._name_crops, engine, label_set)
        for job, name in zip(jobs, run_isolated(ask, list(zip([j.crop for j in jobs], labels, strict=True))),
                             strict=True):  # fmt: skip
            if isinstance(name, Exception):
                self._model_failed(outcomes[job.task], name)
                continue
            if not name.text:
                continue  # the model said nothing: leave the text area to the person
            region = box_result(job.box, target.control, target.image.name, "textarea", {"text": [name.text]},
                                name.confidence)  # fmt: skip
            outcomes[job.task].results.append(region)
            if name.category is not None and name.category.label is not None:  # the name checks the box's label
                for item in outcomes[job.task].judged:
                    if item.region_id == job.box.id:
                        item.signals = replace(item.signals, name_agrees=name.category.label == item.label)
            self.metrics.regions.labels(kind="text").inc()

    def _name_crops(
        self, engine: Engine, label_set: Sequence[str], items: list[tuple[Image.Image, str]]
    ) -> list[FineName]:
        crops, labels = [crop for crop, _ in items], [label for _, label in items]
        return name_crops(engine, self.prompts, crops, labels, label_set, self.mapper)

    def _read_crops(self, engine: Engine, _labels: Sequence[str], items: list[tuple[Image.Image, str]]) -> list:
        return read_crops(engine, self.prompts, [crop for crop, _ in items])

    def _write_image_texts(self, engine: Engine, jobs: list[_TextJob], outcomes: list[_Outcome]) -> None:
        """Captions and answers to questions about whole images, with their token-probability confidence."""
        for target, group in _group(jobs, lambda job: job.target).items():
            items = [(job.image, job.question) for job in group]
            for job, text in zip(group, run_isolated(partial(write_texts, engine, self.prompts), items), strict=True):
                if isinstance(text, Exception):
                    self._model_failed(outcomes[job.task], text)
                    continue
                if not text.text:
                    continue
                region = text_result(target.control, target.to_name, text.text, text.confidence)
                outcomes[job.task].results.append(region)
                if text.confidence is not None:
                    outcomes[job.task].confidences.append(text.confidence)
                self.metrics.regions.labels(kind="text").inc()

    def _choose_for_images(self, engine: Engine, jobs: list[_ImageJob], outcomes: list[_Outcome]) -> None:
        for (target, labels), group in _group(jobs, lambda job: (job.target, job.labels)).items():
            ask = partial(self._answer_images, engine, target, labels)
            for job, answer in zip(group, run_isolated(ask, [job.image for job in group]), strict=True):
                if isinstance(answer, Exception):
                    self._model_failed(outcomes[job.task], answer)
                    continue
                self._add_image_answer(outcomes[job.task], target, job.image, answer)
                self.metrics.regions.labels(kind="image").inc()

    @staticmethod
    def _add_image_answer(outcome: _Outcome, target: ImageChoiceTarget, image: Image.Image, answer: Choice | Tags):
        hints = dict(target.hints)
        if isinstance(answer, Tags):
            if not answer.labels:  # "none of these" was predicted: no label to judge, but a decision to rank
                outcome.confidences.append(answer.confidence)
                return
            region = image_result(target.control, target.image.name, "choices", {"choices": list(answer.labels)})
            for tag in answer.labels:
                signals = Signals(annotator=answer.presence[tag])
                outcome.judged.append(_Judged(image, tag, signals, region, target.control, target.control, hints))
        else:
            result_type = "taxonomy" if target.source.paths else "choices"
            payload = target.source.payload(result_type, answer.label)
            region = image_result(target.control, target.image.name, result_type, payload)
            signals = Signals(annotator=answer.probability, margin=answer.margin, mapped=answer.mapped)
            outcome.judged.append(_Judged(image, answer.label, signals, region, target.control, target.control, hints))
        outcome.results.append(region)

    def _answer_images(
        self, engine: Engine, target: ImageChoiceTarget, labels: tuple[str, ...], images: list[Image.Image]
    ) -> list[Choice] | list[Tags]:
        if not target.multiple:
            return classify_images(engine, self.prompts, images, labels)
        s = self.settings
        tag_settings = TagSettings(
            threshold=target.threshold if target.threshold is not None else s.tag_threshold,
            candidate_threshold=(
                target.candidate_threshold if target.candidate_threshold is not None else s.tag_candidate_threshold
            ),
            group_size=target.group_size or s.tag_group_size,
        )
        return tag_images(engine, self.prompts, images, labels, tag_settings, dict(target.hints), dict(target.groups))

    # --- suspicion ---------------------------------------------------------------------

    def _score(self, engine: Engine, judged: list[_Judged], project: int | None) -> None:
        """Critic pass, fusion, calibration: each judged label's P(correct) and its region's score."""
        verdicts = self._critic(engine, judged)
        agreement = self._classifier_agreement(judged, project)
        calibrator = self.reviews.calibrator(project) if self.reviews is not None else None
        for item, verdict, classifier in zip(judged, verdicts, agreement, strict=True):
            signals = replace(item.signals, critic=verdict, classifier=classifier)
            item.raw = fuse(signals)
            item.p_correct = calibrator(item.raw) if calibrator is not None else item.raw
        regions: dict[int, list[_Judged]] = defaultdict(list)
        for item in judged:
            regions[id(item.region)].append(item)
        for items in regions.values():  # several tags share a region: P(all of them correct)
            items[0].region["score"] = math.prod(item.p_correct for item in items)

    def _critic(self, engine: Engine, judged: list[_Judged]) -> list[float | None]:
        if not self.settings.critic or not judged:
            return [None] * len(judged)
        try:
            critic = self.critic_slot.get(self.settings.predict_wait_seconds) if self.critic_slot else engine
            hints = {label: hint for item in judged for label, hint in item.hints.items()}
            verdicts = judge(critic, self.prompts, [j.image for j in judged], [j.label for j in judged], hints)
        except Exception as exc:  # the critic is advice: without it, scores fall back to the other signals
            log.warning("critic pass failed (%s); scoring without it", _describe(exc))
            self.metrics.task_errors.labels(reason="critic").inc()
            return [None] * len(judged)
        return [float(v) for v in verdicts]

    def _classifier_agreement(self, judged: list[_Judged], project: int | None) -> list[float | None]:
        """The project's trained classifier's probability for each label (confident learning's self-confidence)."""
        agreement: list[float | None] = [None] * len(judged)
        if self.versions is None or project is None:
            return agreement
        own_labels = [
            (index, item) for index, item in enumerate(judged) if not item.from_classifier
        ]  # no self-agreement
        for control, items in _group(own_labels, lambda pair: pair[1].control).items():
            try:
                classifier = self.versions.classifier(project, control)
                if classifier is None:
                    continue
                probabilities = classifier.predict_proba([item.image for _, item in items])
            except Exception as exc:  # a broken classifier must not stop predictions
                log.warning("classifier for project %s/%s failed (%s)", project, control, _describe(exc))
                continue
            for (index, item), row in zip(items, probabilities, strict=True):
                if item.label in classifier.labels:
                    agreement[index] = float(row[classifier.labels.index(item.label)])
        return agreement

    def _remember(
        self, project: int | None, version: str, outcomes: list[_Outcome], seconds: float, tokens: int
    ) -> None:
        """Keep each predicted label's raw score (to learn from review) and each task's model usage (for cost)."""
        done = [o for o in outcomes if not o.error and isinstance(o.task_id, int) and (o.judged or o.results)]
        if project is None or not done or self.reviews is None:
            return
        judged = [(o, j) for o in done for j in o.judged]
        labels = [PredictedLabel(int(o.task_id), j.region_id, j.control, j.label, j.raw) for o, j in judged]
        self.reviews.record_predictions(project, version, labels, [j.signals.annotator for _, j in judged])
        usage = [(int(o.task_id), seconds / len(done), 1, len(o.box_labels), tokens // len(done)) for o in done]
        self.reviews.record_usage(project, version, usage)

    def _model_failed(self, outcome: _Outcome, exc: Exception) -> None:
        log.warning("model failed on task %s: %s", outcome.task_id, _describe(exc))
        outcome.fail(f"the model could not answer ({_describe(exc)})")
        self.metrics.task_errors.labels(reason="model").inc()


def _belongs(box: Box, target: BoxLabelTarget | BoxTextTarget) -> bool:
    return box.from_name in target.box_controls and box.to_name == target.image.name


def _group(items: Sequence[T], key: Callable[[T], Any]) -> dict[Any, list[T]]:
    groups: dict[Any, list[T]] = defaultdict(list)
    for item in items:
        groups[key(item)].append(item)
    return groups


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _question(task: dict, key: str) -> str:
    data = task.get("data") if isinstance(task.get("data"), dict) else {}
    question = data.get(key)
    if not isinstance(question, str) or not question.strip():
        raise TaskError(f"task data has no question text under {key!r}")
    return question.strip()[:2000]


def _reason(exc: Exception) -> str:
    if isinstance(exc, MediaError):
        return "media"
    if isinstance(exc, RegionError):
        return "region"
    return "data"
