"""`mllm-backend eval`: our predictions against human annotations, as JSON, Markdown and PNG plots.

Reproduces the papers' measures on your own project: label accuracy and confusion (boxes,
single choices), per-label precision/recall/F1, micro/macro F1, mAP and agreement (tags),
fine-grained name agreement, how well the suspicion score finds wrong labels (AUROC, review
curve against random order and against the annotator's confidence alone, calibration), cost
per image and per box beside a human's, and the downstream classifier's figures.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from backend.evaluation import metrics
from backend.labelstudio.config import ProjectSpec
from backend.labelstudio.export import TaskComparison, compare_task


@dataclass(frozen=True)
class Pricing:
    """Defaults: a rented A100-class GPU; a person at $15/h spending 6 s per label (set your own)."""

    gpu_hour: float = 2.0
    human_per_label: float = 0.025


def compare_tasks(tasks: Iterable[dict], spec: ProjectSpec, model_version: str | None) -> list[TaskComparison]:
    from tqdm import tqdm

    compared = []
    for task in tqdm(list(tasks), desc="tasks", unit="task", leave=False):
        comparison = compare_task(task, spec, model_version)
        if comparison is not None:
            compared.append(comparison)
    return compared


def _task_errors(comparison: TaskComparison) -> int:
    wrong_labels = sum(p.human is not None and p.predicted != p.human for p in comparison.labels)
    wrong_tags = sum(len(t.predicted - t.human) + len(t.human - t.predicted) for t in comparison.tags)
    return wrong_labels + wrong_tags


def cost(usage: Sequence[dict], pricing: Pricing, labels: int, human_seconds: Sequence[float] = ()) -> dict:
    """Model time and tokens per image and per box (recorded at prediction time), as money beside a human's:
    priced per label, and measured where Label Studio recorded the annotators' time (``lead_time``)."""
    seconds = sum(u["seconds"] for u in usage)
    images, boxes = sum(u["images"] for u in usage), sum(u["boxes"] for u in usage)
    tokens = sum(u.get("tokens") or 0 for u in usage)
    model_cost = seconds / 3600 * pricing.gpu_hour
    human_cost = labels * pricing.human_per_label
    return {
        "pricing": asdict(pricing),
        "tasks": len(usage), "model_seconds": round(seconds, 4), "tokens": tokens,
        "seconds_per_image": seconds / images if images else None,
        "seconds_per_box": seconds / boxes if boxes else None,
        "tokens_per_image": tokens / images if images else None,
        "model_cost": round(model_cost, 6), "human_cost_for_same_labels": round(human_cost, 4),
        "model_to_human_cost": round(model_cost / human_cost, 6) if human_cost else None,
        "human_seconds_per_task": sum(human_seconds) / len(human_seconds) if human_seconds else None,
        "model_seconds_per_task": seconds / len(usage) if usage else None,
        "human_tasks_timed": len(human_seconds),
    }  # fmt: skip


def evaluate(
    comparisons: Sequence[TaskComparison],
    spec: ProjectSpec,
    usage: Sequence[dict] = (),
    pricing: Pricing = Pricing(),
    annotator_scores: dict[int, float] | None = None,
    classifier_versions: Sequence[dict] = (),
) -> dict:
    labels = [p for c in comparisons for p in c.labels]
    report: dict = {"tasks_compared": len(comparisons), "labels": metrics.label_accuracy(labels)}
    report["tags"] = {
        target.control: metrics.tag_metrics(
            [t for c in comparisons for t in c.tags if t.control == target.control], target.labels
        )  # fmt: skip
        for target in spec.image_choices
        if target.multiple
    }
    report["fine_names"] = metrics.text_agreement([t for c in comparisons for t in c.texts])
    report["suspicion"] = metrics.suspicion_quality(labels)
    scored = [c for c in comparisons if c.score is not None]
    errors = [_task_errors(c) for c in scored]
    curves = {"suspicion": metrics.review_curve([c.score for c in scored], errors),  # type: ignore[misc]
              "random": {"reviewed": [i / 20 for i in range(21)], "caught": [i / 20 for i in range(21)]}}  # fmt: skip
    if annotator_scores:
        known = [
            (annotator_scores[c.task], e) for c, e in zip(scored, errors, strict=True) if c.task in annotator_scores
        ]
        if known:
            curves["annotator_confidence"] = metrics.review_curve([s for s, _ in known], [e for _, e in known])
    report["review_curve"] = curves
    report["cost"] = cost(
        usage,
        pricing,
        labels=len(labels) + sum(len(t.predicted) for c in comparisons for t in c.tags),
        human_seconds=[c.human_seconds for c in comparisons if c.human_seconds is not None],
    )
    if classifier_versions:
        latest = classifier_versions[-1]
        report["downstream"] = {
            control: {"all_labels": m.get("validation"), "human_labels": m.get("validation_human")}
            for control, m in latest.get("controls", {}).items()
        } | {"version": latest.get("version"), "data": latest.get("data")}
    return report


def write_report(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "summary.md"]
    written[0].write_text(json.dumps(report, indent=2, default=str))
    written[1].write_text(markdown(report))
    written += plots(report, out)
    return written


def markdown(report: dict) -> str:
    lines = ["# MLLM labels against human labels", "", f"Tasks compared: {report['tasks_compared']}", ""]
    labels = report["labels"]
    if labels["labels"]:
        lines += ["## Box labels and single choices", "", f"- labels: {labels['labels']}",
                  f"- top-1 accuracy: {labels['accuracy']:.3f}", ""]  # fmt: skip
    for control, tags in report["tags"].items():
        lines += [
            f"## Tags: {control}",
            "",
            f"- images: {tags['images']}",
            f"- micro F1: {tags['micro_f1']:.3f}",
            f"- macro F1: {_fmt(tags['macro_f1'])}",
            f"- mAP: {_fmt(tags['mAP'])}",
            "",
            "| label | precision | recall | F1 | agreement | support |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for label, m in tags["per_label"].items():
            lines.append(f"| {label} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | "
                         f"{_fmt(m['agreement'])} | {m['support']} |")  # fmt: skip
        lines.append("")
    suspicion = report["suspicion"]
    lines += ["## Suspicion score", "", f"- wrong labels: {suspicion['wrong']} of {suspicion['labels']}",
              f"- AUROC (score finds wrong labels): {_fmt(suspicion['auroc_wrong'])}",
              f"- expected calibration error: {_fmt(suspicion['ece'])}", ""]  # fmt: skip
    curve = report["review_curve"]["suspicion"]
    for share in (0.1, 0.2, 0.5):
        index = min(range(len(curve["reviewed"])), key=lambda i: abs(curve["reviewed"][i] - share))
        lines.append(f"- reviewing the most suspicious {share:.0%} of tasks catches {curve['caught'][index]:.0%} "
                     "of wrong labels")  # fmt: skip
    c = report["cost"]
    ratio = _fmt(c["model_to_human_cost"])
    lines += ["", "## Cost", "",
              f"- model seconds per image: {_fmt(c['seconds_per_image'])}; per box: {_fmt(c['seconds_per_box'])}",
              f"- model cost {c['model_cost']} vs human {c['human_cost_for_same_labels']} for the same labels "
              f"(ratio {ratio})", ""]  # fmt: skip
    if "downstream" in report:
        lines += ["## Downstream classifier", "", "```", json.dumps(report["downstream"], indent=1), "```", ""]
    lines += ["Plots: review_curve.png, reliability.png, tag_f1.png (when tags exist)."]
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    figure, axis = plt.subplots(figsize=(5, 4))
    names = {"suspicion": "suspicion order", "random": "random order", "annotator_confidence": "annotator confidence"}
    for name, curve in report["review_curve"].items():
        axis.plot(curve["reviewed"], curve["caught"], marker="o" if name == "suspicion" else None, label=names[name])
    axis.set(xlabel="share of tasks reviewed", ylabel="share of wrong labels caught", title="Review curve",
             xlim=(0, 1), ylim=(0, 1.02))  # fmt: skip
    axis.legend()
    written.append(_save(figure, out / "review_curve.png"))

    figure, axis = plt.subplots(figsize=(5, 4))
    bins = report["suspicion"]["reliability"]
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    if bins:
        axis.bar([b["mean_score"] for b in bins], [b["accuracy"] for b in bins], width=0.08, alpha=0.7,
                 label="labels kept by reviewers")  # fmt: skip
    axis.set(xlabel="predicted P(correct)", ylabel="share correct", title="Reliability", xlim=(0, 1), ylim=(0, 1))
    axis.legend()
    written.append(_save(figure, out / "reliability.png"))

    for control, tags in report["tags"].items():
        per_label = tags["per_label"]
        figure, axis = plt.subplots(figsize=(6, max(2.5, 0.25 * len(per_label))))
        axis.barh(list(per_label), [m["f1"] for m in per_label.values()])
        axis.set(xlabel="F1", title=f"Per-label F1: {control}", xlim=(0, 1))
        written.append(_save(figure, out / ("tag_f1.png" if len(report["tags"]) == 1 else f"tag_f1_{control}.png")))
    return written


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def load_tasks(
    settings, project: int | None, tasks_file: Path | None, label_config: Path | None, model_version: str | None
) -> tuple[object | None, list[dict], str, str | None]:
    """(SDK client or None, tasks with predictions and annotations inline, label config, model_version to judge)."""
    from backend.predictor import model_version as current_version
    from backend.prompts import PromptBook

    if project is not None:
        from backend.labelstudio.client import connect, project_tasks

        if not settings.label_studio_url or not settings.label_studio_api_key:
            raise SystemExit("--project needs LABEL_STUDIO_URL and LABEL_STUDIO_API_KEY")
        client = connect(settings.label_studio_url, settings.label_studio_api_key)
        version = model_version or current_version(settings, PromptBook(settings.prompts_dir))
        return client, project_tasks(client, project), client.projects.get(project).label_config, version
    if tasks_file is None or label_config is None:
        raise SystemExit("--tasks FILE also needs --label-config FILE")
    tasks = json.loads(tasks_file.read_text())
    if any(isinstance(p, int) for t in tasks for p in t.get("predictions") or []):
        raise SystemExit("the tasks file lists predictions by id only; use --project, or tasks with predictions inline")
    return None, tasks, label_config.read_text(), model_version


def run_concepts(
    settings, project: int | None, tasks_file: Path | None, label_config: Path | None, model_version: str | None,
    *, top: int, accept: bool,
) -> dict:  # fmt: skip
    """`mllm-backend concepts`: the labels people correct most, drafted definitions for them, and (``accept``)
    the drafts merged into the prompts directory's concepts.json."""
    from backend.annotate.concepts import accept_definitions, confusions, draft_definitions
    from backend.labelstudio.config import parse_label_config
    from backend.predictor import model_version as current_version
    from backend.prompts import PromptBook
    from backend.service import engine_factory

    _, tasks, config, version = load_tasks(settings, project, tasks_file, label_config, model_version)
    spec = parse_label_config(config)
    compared = compare_tasks(tasks, spec, version)
    hints = {label: hint for target in spec.image_choices for label, hint in target.hints}
    found = confusions([p for c in compared for p in c.labels], [t for c in compared for t in c.tags], top=top)
    prompts = PromptBook(settings.prompts_dir)
    drafts = draft_definitions(engine_factory(settings, None)(), prompts, found, hints=hints) if found else {}
    report: dict = {"compared_tasks": len(compared), "confusions": [asdict(c) for c in found], "drafts": drafts}
    if accept and drafts:
        report["written"] = str(accept_definitions(settings.prompts_dir, drafts))
        report["model_version"] = current_version(settings, PromptBook(settings.prompts_dir))
    return report


def run_eval(
    settings, project: int | None, tasks_file: Path | None, label_config: Path | None, model_version: str | None,
    out: Path, pricing: Pricing, disagreement_tab: bool = False,
) -> list[Path]:  # fmt: skip
    """`mllm-backend eval`: from a Label Studio project (SDK) or a tasks JSON file, to report files in ``out``."""
    from backend.labelstudio.config import parse_label_config
    from backend.reviews import ReviewStore
    from backend.training.versions import ClassifierVersions

    client, tasks, config, version = load_tasks(settings, project, tasks_file, label_config, model_version)
    spec = parse_label_config(config)
    comparisons = compare_tasks(tasks, spec, version)
    usage, annotator, classifiers = [], {}, []
    if project is not None:
        reviews = ReviewStore.for_settings(settings)
        usage, annotator = reviews.usage(project, version), reviews.annotator_task_scores(project, version)
        classifiers = ClassifierVersions(settings.model_dir).versions(project)
    report = evaluate(comparisons, spec, usage, pricing, annotator, classifiers)
    report["model_version"] = version
    disagree = [c.task for c in comparisons if _task_errors(c)]
    report["disagreements"] = {"tasks": len(disagree), "task_ids": disagree[:1000]}
    if project is not None and disagreement_tab:
        from backend.labelstudio.client import disagreement_view

        report["disagreements"]["view_id"] = disagreement_view(client, project, disagree)
    return write_report(report, out)
