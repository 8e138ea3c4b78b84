"""Metrics of MLLM labels against human labels, each a small pure function."""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from backend.annotate.suspicion import Calibrator
from backend.labelstudio.export import LabelPair, TagPair


def label_accuracy(pairs: Sequence[LabelPair]) -> dict:
    """Top-1 accuracy of box labels / single choices, and the confusion matrix human → predicted.

    ``accuracy`` compares with the human's first label; ``accuracy_any`` counts a prediction right when it is
    any of the labels the human gave the object (multi-label ground truth), and ``multi_labelled`` says how
    many objects had several."""
    judged = [p for p in pairs if p.human is not None]
    confusion: dict[str, Counter] = defaultdict(Counter)
    for pair in judged:
        confusion[pair.human][pair.predicted] += 1  # type: ignore[index]
    correct = sum(p.predicted == p.human for p in judged)
    correct_any = sum(p.predicted in (p.accepted or (p.human,)) for p in judged)
    return {
        "labels": len(judged),
        "accuracy": correct / len(judged) if judged else None,
        "accuracy_any": correct_any / len(judged) if judged else None,
        "multi_labelled": sum(len(p.accepted) > 1 for p in judged),
        "confusion": {human: dict(row) for human, row in sorted(confusion.items())},
    }


def _tag_score(pair: TagPair, label: str) -> float:
    if pair.label_scores is not None and label in pair.label_scores:
        return float(pair.label_scores[label])
    return (pair.score if pair.score is not None else 1.0) if label in pair.predicted else 0.0


def _f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def tag_metrics(pairs: Sequence[TagPair], labels: Sequence[str]) -> dict:
    """Per-label precision/recall/F1 and agreement; micro and macro F1; mAP over the tag scores.

    Agreement is the CelebA study's: per attribute, the share of images where the MLLM's
    present/absent matches the human's. A tag ranks by its own probability where the
    prediction keeps one (``label_scores``), else by its control's score if predicted and 0 if not.
    """
    from sklearn.metrics import average_precision_score

    per_label, totals = {}, Counter()
    average_precisions = []
    for label in labels:
        predicted = np.array([label in p.predicted for p in pairs])
        truth = np.array([label in p.human for p in pairs])
        tp, fp, fn = int((predicted & truth).sum()), int((predicted & ~truth).sum()), int((~predicted & truth).sum())
        totals.update(tp=tp, fp=fp, fn=fn)
        precision, recall, f1 = _f1(tp, fp, fn)
        per_label[label] = {"precision": precision, "recall": recall, "f1": f1, "support": int(truth.sum()),
                            "agreement": float((predicted == truth).mean()) if len(pairs) else None}  # fmt: skip
        if truth.any():
            average_precisions.append(float(average_precision_score(truth, [_tag_score(p, label) for p in pairs])))
    supported = [m["f1"] for m in per_label.values() if m["support"]]
    micro = _f1(totals["tp"], totals["fp"], totals["fn"])
    return {
        "images": len(pairs),
        "per_label": per_label,
        "micro_precision": micro[0],
        "micro_recall": micro[1],
        "micro_f1": micro[2],
        "macro_f1": float(np.mean(supported)) if supported else None,
        "mAP": float(np.mean(average_precisions)) if average_precisions else None,
    }


def review_curve(task_scores: Sequence[float], task_errors: Sequence[int], points: int = 21) -> dict:
    """Share of wrong labels caught vs share of tasks reviewed, reviewing in ascending-score order."""
    order = np.argsort(np.asarray(task_scores, dtype=float), kind="stable")
    errors = np.asarray(task_errors, dtype=float)[order]
    total = errors.sum()
    fractions = np.linspace(0, 1, points)
    counts = np.round(fractions * len(errors)).astype(int)
    caught = [float(errors[:k].sum() / total) if total else 1.0 for k in counts]
    return {"reviewed": fractions.round(4).tolist(), "caught": [round(c, 4) for c in caught]}


def suspicion_quality(pairs: Sequence[LabelPair]) -> dict:
    """How well the score (P(correct)) separates wrong labels from right ones, and its calibration."""
    scored = [p for p in pairs if p.human is not None and p.score is not None]
    wrong = [p.predicted != p.human for p in scored]
    scores = [float(p.score) for p in scored]  # type: ignore[arg-type]
    return {
        "labels": len(scored),
        "wrong": int(sum(wrong)),
        "auroc_wrong": auroc([-s for s in scores], wrong) if scored else None,
        "ece": expected_calibration_error(scores, [not w for w in wrong]) if scored else None,
        "reliability": reliability_bins(scores, [not w for w in wrong]),
    }


def reliability_bins(scores: Sequence[float], correct: Sequence[bool], bins: int = 10) -> list[dict]:
    scores_arr, correct_arr = np.asarray(scores, dtype=float), np.asarray(correct, dtype=float)
    which = np.minimum((scores_arr * bins).astype(int), bins - 1)
    table = []
    for b in range(bins):
        members = which == b
        if members.any():
            table.append({"bin": [b / bins, (b + 1) / bins], "count": int(members.sum()),
                          "mean_score": float(scores_arr[members].mean()),
                          "accuracy": float(correct_arr[members].mean())})  # fmt: skip
    return table


def text_agreement(texts: Sequence[tuple[str, str]]) -> dict:
    same = [a.strip().casefold() == b.strip().casefold() for a, b in texts]
    return {"pairs": len(texts), "exact_agreement": float(np.mean(same)) if texts else None}


def expected_calibration_error(scores: Sequence[float], outcomes: Sequence[bool], bins: int = 10) -> float:
    """Σ_b (n_b / n) · |mean score_b − accuracy_b| over equal-width score bins."""
    scores_arr, outcomes_arr = np.asarray(scores, dtype=float), np.asarray(outcomes, dtype=float)
    if len(scores_arr) == 0:
        return 0.0
    which = np.minimum((scores_arr * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(scores_arr[members].mean() - outcomes_arr[members].mean())
    return float(error)


def cross_fitted_ece(scores: Sequence[float], outcomes: Sequence[bool], folds: int = 2) -> float:
    """ECE of calibrated scores where each half is calibrated by a fit on the other half (no peeking)."""
    scores_arr, outcomes_arr = np.asarray(scores, dtype=float), np.asarray(outcomes, dtype=bool)
    order = np.random.default_rng(0).permutation(len(scores_arr))
    calibrated = np.empty(len(scores_arr))
    for fold in range(folds):
        held = order[fold::folds]
        train = np.setdiff1d(order, held)
        model = Calibrator().fit(scores_arr[train], outcomes_arr[train])
        calibrated[held] = [model(s) for s in scores_arr[held]]
    return expected_calibration_error(calibrated, outcomes_arr)


def auroc(scores: Sequence[float], positives: Sequence[bool]) -> float:
    """Probability that a random positive scores above a random negative (ties count half)."""
    scores_arr, positives_arr = np.asarray(scores, dtype=float), np.asarray(positives, dtype=bool)
    pos, neg = scores_arr[positives_arr], scores_arr[~positives_arr]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(greater / (len(pos) * len(neg)))
