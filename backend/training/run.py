"""One training run for a project: Label Studio's labels → datasets → a classifier per control → a version.

Tasks come through label-studio-sdk with ``fields="all"``: full annotation results and the
predictions themselves (Label Studio's JSON export lists predictions by id only, and its
JSON_MIN flattens choices), so MLLM-only labels keep their scores.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from backend.labelstudio.client import LabelStudioSites, connect, project_tasks
from backend.labelstudio.config import ProjectSpec, parse_label_config
from backend.labelstudio.export import LabelledItem, labelled_items
from backend.labelstudio.media import MediaError
from backend.labelstudio.redirects import RedirectRefused
from backend.labelstudio.regions import RegionError, crop_box
from backend.settings import Settings
from backend.training.backbone import classifier_backbone
from backend.training.classifier import Classifier, TrainingConfig, TrainingData, frozen_test_split
from backend.training.versions import ClassifierVersions

log = logging.getLogger(__name__)
MIN_ITEMS = 4  # fewer labelled items than this for a control: nothing worth training


class NothingToTrain(RuntimeError):
    """The project has too few labels for any control yet."""


def training_config(settings: Settings) -> TrainingConfig:
    return TrainingConfig(
        epochs=settings.training_epochs, batch_size=settings.training_batch_size,
        learning_rate=settings.training_learning_rate, loss=settings.training_loss,
    )  # fmt: skip


def build_data(
    items: Sequence[LabelledItem], images: dict[str, Image.Image], labels: Sequence[str], multi_label: bool,
    padding: float = 0.0, min_side: int = 1, inclusion: dict[int, float] | None = None,
) -> TrainingData:  # fmt: skip
    """Crops (or whole images) with targets, noise-aware weights, our own labels (for ACT's loss) and each task's
    review probability π from ``inclusion`` (task → π; 1 for tasks outside it); items whose pixels fail are left
    out."""
    kept, pixels = [], []
    for item in items:
        image = images.get(item.image_url)
        if image is None:
            continue
        try:
            pixels.append(crop_box(image, item.box, padding, min_side) if item.box is not None else image)
        except RegionError:
            continue
        kept.append(item)
    index = {label: i for i, label in enumerate(labels)}
    targets = _targets([item.labels for item in kept], index, multi_label)
    # an item we did not predict (a person labelled it from scratch), or predicted with a label the config no longer
    # has, counts its own label as the machine's: ACT's loss then makes no correction for it
    machine = _targets([item.machine_labels if item.machine_labels and set(item.machine_labels) <= set(index)
                        else item.labels for item in kept], index, multi_label)  # fmt: skip
    return TrainingData(
        images=pixels,
        targets=targets,
        weights=np.array([1.0 if item.reviewed else item.confidence for item in kept], dtype=np.float32),
        tasks=np.array([item.task for item in kept]),
        reviewed=np.array([item.reviewed for item in kept], dtype=bool),
        machine_targets=machine,
        inclusion=np.array([(inclusion or {}).get(item.task, 1.0) for item in kept], dtype=np.float32),
        test=frozen_test_split(np.array([item.task for item in kept]), np.array([item.reviewed for item in kept])),
    )


def _targets(labels: Sequence[tuple[str, ...]], index: dict[str, int], multi_label: bool) -> np.ndarray:
    if multi_label:
        targets = np.zeros((len(labels), len(index)), dtype=np.float32)
        for row, given in enumerate(labels):
            targets[row, [index[label] for label in given if label in index]] = 1.0
        return targets
    return np.array([index[given[0]] for given in labels], dtype=np.int64)


def _summary(items: Sequence[LabelledItem]) -> dict:
    return {
        "items": len(items),
        "human_reviewed": sum(item.reviewed for item in items),
        "mllm_only": sum(not item.reviewed for item in items),
        "labels": dict(Counter(label for item in items for label in item.labels)),
    }


def train_project(settings: Settings, project: int, progress: Callable[[float, str], None] | None = None) -> dict:
    """Export, train and commit a new version; the previous version stays current on any failure."""
    from backend.predictor import model_version
    from backend.prompts import PromptBook

    report = progress or (lambda fraction, stage: None)
    if not settings.label_studio_url or not settings.label_studio_api_key:
        raise RuntimeError("training needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY to export the project's labels")
    client = connect(settings.label_studio_url, settings.label_studio_api_key)
    try:
        spec = parse_label_config(client.projects.get(project).label_config)
    except RedirectRefused as exc:
        raise RuntimeError(f"cannot export project {project}: {exc}") from None
    except Exception as exc:  # httpx errors, SDK ApiError: say where, never with the key
        raise RuntimeError(
            f"cannot export project {project} from Label Studio at {settings.label_studio_url} "
            f"({type(exc).__name__}); check that Label Studio is reachable and the key can read the project"
        ) from None
    ours = model_version(settings, PromptBook(settings.prompts_dir))
    tasks = project_tasks(client, project)
    items = [item for task in tasks for item in labelled_items(task, spec, ours)]
    report(0.05, f"exported {len(tasks)} tasks, {len(items)} labelled items")
    images = _load_images(settings, items)
    store = ClassifierVersions(settings.model_dir)
    version, partial = store.begin(project)
    try:
        controls = _train_controls(settings, spec, items, images, partial, report, _inclusion(settings, project))
        if not controls:
            raise NothingToTrain(f"project {project} has fewer than {MIN_ITEMS} labelled items for every control")
        metrics = {"project": project, "version": version, "created": time.time(), "controls": controls,
                   "data": _summary(items), "mllm_model_version": ours}  # fmt: skip
        (partial / "metrics.json").write_text(json.dumps(metrics, indent=2))
        store.commit(project, version, partial)
    except BaseException:
        store.discard(partial)
        raise
    report(1.0, f"version {version} is current")
    return metrics


def _train_controls(settings, spec: ProjectSpec, items, images, partial: Path, report, inclusion) -> dict:
    targets = [(t.control, t.labels, False) for t in spec.region_labels] + [
        (t.control, t.labels, t.multiple) for t in spec.image_choices
    ]
    results = {}
    for number, (control, labels, multi_label) in enumerate(targets):
        mine = [item for item in items if item.control == control]
        data = build_data(mine, images, labels, multi_label, settings.box_padding, settings.box_min_side, inclusion)
        if len(data.images) < MIN_ITEMS:
            continue
        classifier = Classifier.build(
            classifier_backbone(configured=settings.classifier_backbone, serving_model=settings.mllm_model,
                                model_dir=settings.model_dir), labels, multi_label)  # fmt: skip

        def step(fraction: float, number: int = number, control: str = control) -> None:
            report(0.1 + 0.85 * (number + fraction) / len(targets), f"training {control}")

        results[control] = classifier.fit(data, training_config(settings), step)
        classifier.save(partial / control)
    return results


def _inclusion(settings: Settings, project: int) -> dict[int, float]:
    """Task → π for the tasks the project's latest review plan drew (ACT's loss weighs their reviews by 1/π)."""
    from backend.reviews import ReviewStore

    return ReviewStore.for_settings(settings).inclusion(project)


def _load_images(settings: Settings, items: Sequence[LabelledItem]) -> dict[str, Image.Image]:
    """Each image the items come from, read once (a multi-page task has one per page)."""
    from backend.service import image_loader

    loader = image_loader(settings, cache=False)  # every image is read once per run
    site = LabelStudioSites(settings.label_studio_url, settings.label_studio_api_key).for_project(None)
    images: dict[str, Image.Image] = {}
    for item in items:
        if item.image_url in images:
            continue
        try:
            images[item.image_url] = loader.load(item.image_url, site, item.task)
        except MediaError as exc:
            log.warning("task %s left out of training: %s", item.task, exc)
    return images
