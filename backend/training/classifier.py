"""The downstream classifier: a transformers image backbone with a trainable head, and its noise-aware loss.

Box labels and single choices train a softmax head; multiple-choice tags a sigmoid head.

**Noise-aware loss** (after ACT, arXiv 2511.09833). Each item i carries a weight

    w_i = 1                 for a human-reviewed label
    w_i = q_i = P̂(correct)  for an MLLM-only label (our calibrated suspicion score)

and the loss is the weighted mean  L = Σ_i w_i · ℓ(f(x_i), y_i) / Σ_i w_i,  where ℓ is the
cross-entropy (softmax) or the mean binary cross-entropy over labels (sigmoid). An MLLM-only
label thus counts as much as its chance of being right: in expectation, wrong labels drop
out of the loss and right ones stay. (ACT's unbiased estimator additionally reweights reviewed
items by 1/π_i, their review probability; the backend does not know π_i for reviews done
outside its plan, so it uses the expected-correctness weights alone.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingConfig:
    epochs: int = 10
    batch_size: int = 16
    learning_rate: float = 1e-3
    validation_fraction: float = 0.2
    seed: int = 0
    noise_aware: bool = True


@dataclass
class TrainingData:
    images: list[Image.Image]
    targets: np.ndarray  # (n,) class indices, or (n, K) 0/1 for multi-label
    weights: np.ndarray  # (n,) the noise-aware weights
    tasks: np.ndarray  # (n,) task ids: the split keeps a task's items together
    reviewed: np.ndarray  # (n,) bool


def split_by_task(tasks: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices; every item of a task lands on the same side."""
    unique = np.unique(tasks)
    rng = np.random.default_rng(seed)
    held = set(rng.choice(unique, size=max(1, round(fraction * len(unique))), replace=False).tolist())
    validation = np.array([t in held for t in tasks])
    return np.flatnonzero(~validation), np.flatnonzero(validation)


def weighted_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, multi_label: bool):
    if multi_label:
        per_item = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float(), reduction="none")
        per_item = per_item.mean(dim=1)
    else:
        per_item = torch.nn.functional.cross_entropy(logits, targets.long(), reduction="none")
    return (weights * per_item).sum() / weights.sum().clamp_min(1e-8)


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
        train, validation = split_by_task(data.tasks, config.validation_fraction, config.seed)
        torch.manual_seed(config.seed)
        pixels = self._pixels(data.images)
        targets = torch.as_tensor(data.targets)
        weights = torch.as_tensor(data.weights if config.noise_aware else np.ones(len(data.weights)), dtype=torch.float)
        optimiser = torch.optim.AdamW(self.model.parameters(), lr=config.learning_rate)
        generator = torch.Generator().manual_seed(config.seed)
        self.model.train()
        for epoch in range(config.epochs):
            order = torch.as_tensor(train)[torch.randperm(len(train), generator=generator)]
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                logits = self.model(pixel_values=pixels[batch]).logits
                loss = weighted_loss(logits, targets[batch], weights[batch], self.multi_label)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
            if progress is not None:
                progress((epoch + 1) / config.epochs)
        metrics = self._metrics(data, validation)
        metrics.update(train_items=int(len(train)), validation_items=int(len(validation)), config=asdict(config))
        return metrics

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
