"""The downstream classifier: a transformers image backbone with a trainable head, and its losses.

Box labels and single choices train a softmax head; multiple-choice tags a sigmoid head. ℓ is
the cross-entropy (softmax) or the mean binary cross-entropy over labels (sigmoid). The loss is
chosen by name (``TrainingConfig.loss``, the ``TRAINING_LOSS`` setting):

- ``"weighted"`` (default): each item weighs w_i = 1 when a person reviewed its label and
  w_i = P̂(correct), our calibrated score, when only the MLLM labelled it; the loss is the
  weighted mean Σ w_i ℓ(f(x_i), y_i) / Σ w_i. In expectation wrong MLLM labels drop out.
- ``"act"``: ACT's corrected loss (arXiv 2511.09833),
  L = (1/N) Σ [ ℓᵐ_i + (ℓ_i − ℓᵐ_i) · δ_i / π_i ], with ℓᵐ the loss on the MLLM's label, ℓ the
  loss on the person's label, δ_i = 1 when item i was reviewed and π_i the probability that its
  task was drawn for review (the review plan's; 1 for reviews outside a plan). Unbiased for the
  all-human loss when every π_i > 0; its variance grows with 1/π.
- ``"plain"``: the unweighted mean over the labels as they are (reviewed where reviewed).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend.training import TRAINING_LOSSES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    validation_fraction: float = 0.2
    seed: int = 0
    loss: str = "weighted"  # one of TRAINING_LOSSES


@dataclass
class TrainingData:
    images: list[Image.Image]
    targets: np.ndarray  # (n,) class indices, or (n, K) 0/1 for multi-label
    weights: np.ndarray  # (n,) the noise-aware weights
    tasks: np.ndarray  # (n,) task ids: the split keeps a task's items together
    reviewed: np.ndarray  # (n,) bool
    machine_targets: np.ndarray | None = None  # the MLLM's label per item, like ``targets`` (None: the same)
    inclusion: np.ndarray | None = None  # (n,) π: the chance the item's task was drawn for review (None: all 1)
    test: np.ndarray | None = None  # (n,) bool: the project's frozen human-labelled test split (never trained on)


MIN_TEST = 2  # fewer frozen test items than this: validate on a random split instead
TEST_FRACTION = 0.2  # of a project's human-labelled tasks, frozen as its test split


def frozen_test_split(tasks: np.ndarray, reviewed: np.ndarray, fraction: float = TEST_FRACTION) -> np.ndarray:
    """Which items belong to the project's frozen test split: human-labelled items of the tasks whose id hashes
    into ``fraction``. A task's place depends on its id alone, so the split stays put as the project grows and
    every version, whatever its labels came from, is tested on the same human labels."""

    def held(task: int) -> bool:
        digest = hashlib.sha256(f"test-split:{int(task)}".encode()).digest()
        return int.from_bytes(digest[:4], "big") < fraction * 2**32

    return np.array([bool(r) and held(t) for t, r in zip(tasks, reviewed, strict=True)], dtype=bool)


def split_by_task(tasks: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices; every item of a task lands on the same side."""
    unique = np.unique(tasks)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(unique, size=max(1, round(fraction * len(unique))), replace=False).tolist())
    validation = np.array([t in held for t in tasks])
    return np.flatnonzero(~validation), np.flatnonzero(validation)


def _per_item(logits: torch.Tensor, targets: torch.Tensor, multi_label: bool) -> torch.Tensor:
    if multi_label:
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
        return loss.mean(dim=1)
    return torch.nn.functional.cross_entropy(logits, targets.long(), reduction="none")


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, multi_label: bool):
    """Σ w ℓ / Σ w (``"weighted"``; all weights 1 is ``"plain"``)."""
    return (weights * _per_item(logits, targets, multi_label)).sum() / weights.sum().clamp_min(1e-8)


def act_loss(
    logits: torch.Tensor, targets: torch.Tensor, machine_targets: torch.Tensor, reviewed: torch.Tensor,
    inclusion: torch.Tensor, multi_label: bool,
) -> torch.Tensor:  # fmt: skip
    """ACT's corrected loss: the mean of ℓᵐ + (ℓ − ℓᵐ)·δ/π (see the module's docstring)."""
    machine = _per_item(logits, machine_targets, multi_label)
    human = _per_item(logits, targets, multi_label)
    return (machine + (human - machine) * reviewed.float() / inclusion).mean()


def evaluate(probabilities: np.ndarray, targets: np.ndarray, multi_label: bool) -> dict[str, float]:
    if not multi_label:
        return {"accuracy": float((probabilities.argmax(axis=1) == targets).mean())}
    from sklearn.metrics import average_precision_score

    present = [k for k in range(targets.shape[1]) if targets[:, k].any()]
    if not present:
        return {"mAP": float("nan")}
    return {"mAP": float(np.mean([average_precision_score(targets[:, k], probabilities[:, k]) for k in present]))}


class Classifier:
    def __init__(self, model, processor, labels: Sequence[str], multi_label: bool) -> None:
        self.model = model
        self.processor = processor
        self.labels = tuple(labels)
        self.multi_label = multi_label

    @classmethod
    def build(cls, backbone: str, labels: Sequence[str], multi_label: bool) -> Classifier:
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the new head is "missing" from the backbone checkpoint by design
        problem = "multi_label_classification" if multi_label else "single_label_classification"
        model = AutoModelForImageClassification.from_pretrained(
            backbone, num_labels=len(labels), problem_type=problem, ignore_mismatched_sizes=True,
            id2label=dict(enumerate(labels)), label2id={label: i for i, label in enumerate(labels)},
        )  # fmt: skip
        return cls(model, AutoImageProcessor.from_pretrained(backbone), labels, multi_label)

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.processor(images=list(images), return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def predict_proba(self, images: Sequence[Image.Image], batch_size: int = 32) -> np.ndarray:
        self.model.eval()
        out = []
        for start in range(0, len(images), batch_size):
            logits = self.model(pixel_values=self._pixels(images[start : start + batch_size])).logits
            out.append((logits.sigmoid() if self.multi_label else logits.softmax(-1)).numpy())
        return np.concatenate(out) if out else np.empty((0, len(self.labels)))

    def fit(self, data: TrainingData, config: TrainingConfig, progress: Callable[[float], None] | None = None) -> dict:
        """Train on every item but the validation ones: the frozen human test split when ``data.test`` holds at
        least MIN_TEST items, else a random split by task."""
        frozen = data.test is not None and int(data.test.sum()) >= MIN_TEST
        if frozen:
            train, validation = np.flatnonzero(~data.test), np.flatnonzero(data.test)
        else:
            train, validation = split_by_task(data.tasks, config.validation_fraction, config.seed)
        torch.manual_seed(config.seed)
        pixels = self._pixels(data.images)
        if config.loss not in TRAINING_LOSSES:
            raise ValueError(f"loss={config.loss!r}; choose one of {', '.join(TRAINING_LOSSES)}")
        loss_of = self._loss(data, config.loss)
        optimiser = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate)
        generator = torch.Generator().manual_seed(config.seed)
        self.model.train()
        for epoch in range(config.epochs):
            order = torch.as_tensor(train)[torch.randperm(len(train), generator=generator)]
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                loss = loss_of(self.model(pixel_values=pixels[batch]).logits, batch)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            if progress is not None:
                progress((epoch + 1) / config.epochs)
        metrics = self._metrics(data, validation)
        metrics.update(train_items=int(len(train)), validation_items=int(len(validation)), config=asdict(config),
                       validation_split="frozen human test split" if frozen else "random by task")  # fmt: skip
        return metrics

    def _loss(self, data: TrainingData, name: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """The named loss of a batch's logits, given the batch's item indices."""
        targets = torch.as_tensor(data.targets)
        if name == "act":
            machine = torch.as_tensor(data.machine_targets if data.machine_targets is not None else data.targets)
            reviewed = torch.as_tensor(data.reviewed)
            inclusion = torch.as_tensor(data.inclusion if data.inclusion is not None else np.ones(len(data.targets)),
                                        dtype=torch.float)  # fmt: skip
            return lambda logits, b: act_loss(logits, targets[b], machine[b], reviewed[b], inclusion[b],
                                              self.multi_label)  # fmt: skip
        weights = torch.as_tensor(data.weights if name == "weighted" else np.ones(len(data.weights)), dtype=torch.float)
        return lambda logits, b: weighted_loss(logits, targets[b], weights[b], self.multi_label)

    def _metrics(self, data: TrainingData, validation: np.ndarray) -> dict:
        if len(validation) == 0:
            return {}
        probabilities = self.predict_proba([data.images[i] for i in validation])
        metrics = {"validation": evaluate(probabilities, data.targets[validation], self.multi_label)}
        reviewed = data.reviewed[validation]
        if reviewed.any():  # human labels are the trustworthy yardstick
            metrics["validation_human"] = evaluate(probabilities[reviewed], data.targets[validation][reviewed],
                                                   self.multi_label)  # fmt: skip
        return metrics

    def save(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.processor.save_pretrained(directory)
        (directory / "labels.json").write_text(json.dumps({"labels": self.labels, "multi_label": self.multi_label}))

    @classmethod
    def load(cls, directory: Path) -> Classifier:
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        meta = json.loads((directory / "labels.json").read_text())
        model = AutoModelForImageClassification.from_pretrained(directory).eval()
        return cls(model, AutoImageProcessor.from_pretrained(directory), meta["labels"], meta["multi_label"])
