"""`mllm-backend quality`: label quality on a held-out shapes world, through the backend as Label Studio calls it.

It generates a world from ``--seed`` (never a training seed of the shapes model), sends its
tasks to the backend's ``/predict`` exactly as Label Studio does (the person's boxes, without
their labels), feeds the most suspicious tasks back as Label Studio's annotation webhooks (a
simulated reviewer who knows the truth), and compares everything with the ground truth.
Definitions follow ``shared/docs/quality-harness.md``; a key whose method does not exist yet
is ``None``.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from backend.evaluation.metrics import auroc, expected_calibration_error
from backend.labelstudio.regions import region_labels
from backend.shapes.world import CLASSES, REGION_KINDS, WORLD_VERSION, Shape, World, write_world

SCHEMA_VERSION = 1
REPORT_SEED = 2500  # the report's default world: outside the shapes model's training seeds (0-999)
REVIEW_SHARE = 0.2  # review_found_at_20, and the reviewed share of mllm_reviewed_20
TEST_SHARE = 0.3  # the downstream classifier's frozen, human-labelled test split: the last 30 % of tasks
CALIBRATION_SHARE = 0.3  # the review sample (expected share of tasks) corrected before calibration is judged
PROJECT = "1.1700000000"
Log = Callable[[str], None]


@dataclass
class _Run:
    """One pass of a world project through a backend: its predictions, in task order."""

    predictions: list[dict]
    forward_passes: int
    tokens: int


def _backend(model: str, state: Path, **env: str):
    from backend.server import create_app
    from backend.service import build_service
    from backend.settings import Settings

    quiet = {
        "SYNC_PROJECT_MODEL_VERSION": "false",
        "LOG_LEVEL": "WARNING",
        "TRAIN_AFTER_ANNOTATIONS": str(10**6),
        "TRAIN_DEBOUNCE_SECONDS": str(10**6),
    }  # no Label Studio to sync with; the reviews train nothing here
    settings = Settings.from_env({"MLLM_MODEL": model, "MODEL_DIR": str(state), **quiet, **env})
    service = build_service(settings)
    app = create_app(service)
    engine = service.slot.get(timeout=600)
    return app.test_client(), engine


def _as_label_studio_sends(world: World, kind: str) -> tuple[str, list[dict]]:
    """The project's config and its tasks as /predict receives them: ids, data, and the person's regions only
    (their geometry, without the true labels)."""
    config_path, tasks_path = world.projects[kind]
    tasks = []
    for number, task in enumerate(json.loads(tasks_path.read_text()), start=1):
        labelled = [r for r in task["annotations"][0]["result"] if r["type"].endswith("labels")]
        boxes = [{**region, "value": {k: v for k, v in region["value"].items() if k != region["type"]},
                  "type": region["type"].removesuffix("labels")} for region in labelled]  # fmt: skip
        annotations = [{"id": number, "result": boxes}] if boxes else []
        tasks.append({"id": number, "data": task["data"], "annotations": annotations})
    return config_path.read_text(), tasks


def _predict(client, engine, config: str, tasks: list[dict], batch: int = 16) -> _Run:
    passes, tokens = engine.forward_passes, engine.tokens_processed
    predictions = []
    for start in range(0, len(tasks), batch):
        body = {"tasks": tasks[start : start + batch], "label_config": config, "project": PROJECT,
                "params": {"login": None, "password": None, "context": None}}  # fmt: skip
        response = client.post("/predict", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"/predict answered {response.status_code}: {response.get_data(as_text=True)[:300]}")
        predictions += response.get_json()["results"]
    return _Run(predictions, engine.forward_passes - passes, engine.tokens_processed - tokens)


def _box_outcomes(world: World, run: _Run) -> list[list[tuple[float, bool]]]:
    """Per task, (region score, label correct) for every box."""
    tasks = []
    for scene, prediction in zip(world.scenes, run.predictions, strict=True):
        truth = {shape.id: shape.cls for shape in scene.shapes}
        regions = [r for r in prediction.get("result", []) if r.get("type") == "rectanglelabels"]
        tasks.append([(float(r["score"]), r["value"]["rectanglelabels"][0] == truth[r["id"]]) for r in regions])
    return tasks


def region_accuracy(client, engine, world: World) -> dict[str, float | None]:
    """Top-1 label accuracy on the regions a person drew, for each shape of region (the same objects each time)."""
    accuracy = {}
    for kind in REGION_KINDS:
        config, sent = _as_label_studio_sends(world, kind)
        run = _predict(client, engine, config, sent)
        right = []
        for scene, prediction in zip(world.scenes, run.predictions, strict=True):
            truth = {shape.id: shape.cls for shape in scene.shapes}
            right += [region_labels(r)[0] == truth[r["id"]] for r in prediction.get("result", [])]
        accuracy[kind] = float(np.mean(right)) if right else None
    return accuracy


def _found_at(order: np.ndarray, wrong_per_task: np.ndarray, share: float) -> float:
    total = wrong_per_task.sum()
    reviewed = math.ceil(share * len(order))
    return float(wrong_per_task[order[:reviewed]].sum() / total) if total else 1.0


def suspicion(task_scores: list[float], outcomes: list[list[tuple[float, bool]]], confidence: list[float]) -> dict:
    """AUROCs and the review-at-20% figures: suspicion order, random order, annotator confidence alone."""
    wrong = np.array([sum(not ok for _, ok in task) for task in outcomes])
    regions = [pair for task in outcomes for pair in task]
    random_orders = np.random.default_rng(0)
    random_found = [_found_at(random_orders.permutation(len(wrong)), wrong, REVIEW_SHARE) for _ in range(500)]
    return {
        "task_auroc": auroc([-s for s in task_scores], wrong > 0),
        "region_auroc": auroc([-s for s, _ in regions], [not ok for _, ok in regions]),
        "task_auroc_confidence": auroc([-c for c in confidence], wrong > 0),
        "review_found_at_20": _found_at(np.argsort(task_scores, kind="stable"), wrong, REVIEW_SHARE),
        "review_found_at_20_random": float(np.mean(random_found)),
        "review_found_at_20_confidence": _found_at(np.argsort(confidence, kind="stable"), wrong, REVIEW_SHARE),
        "wrong_labels": int(wrong.sum()),
        "tasks_with_wrong_labels": int((wrong > 0).sum()),
    }


def _review_webhooks(client, world: World, kind: str, task_numbers: list[int]) -> None:
    """A reviewer who knows the truth corrects these tasks in Label Studio; its annotation webhooks arrive."""
    imports = json.loads(world.projects[kind][1].read_text())
    for number in task_numbers:
        truth = imports[number - 1]["annotations"][0]["result"]
        annotation = {"id": number, "task": number, "project": 1, "result": truth, "was_cancelled": False}
        body = {"action": "ANNOTATION_CREATED", "project": {"id": 1}, "task": {"id": number}, "annotation": annotation}
        response = client.post("/webhook", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"/webhook answered {response.status_code}: {response.get_data(as_text=True)[:300]}")


def _sample(task_scores: list[float], budget: float, seed: int = 0):
    from backend.review_plan import plan_review

    return plan_review(list(enumerate(task_scores, start=1)), budget=budget, seed=seed)


def review_sample(task_scores: list[float], outcomes: list[list[tuple[float, bool]]], draws: int = 200) -> dict:
    """The box-label accuracy estimated from a review sample of REVIEW_SHARE of the tasks (ACT's threshold rule,
    floor 0.05, seed 0), with its 95 % interval, beside the truth; and over ``draws`` seeds, how often the interval
    covers the truth and how far the plain mean of the reviewed labels (no weights) lies from it."""
    from backend.review_plan import estimate_accuracy

    truth = float(np.mean([ok for task in outcomes for _, ok in task]))

    def drawn(seed: int):
        plan = _sample(task_scores, REVIEW_SHARE, seed)
        rows = [(i.task - 1, i.probability) for i in plan.inclusion if i.selected]
        correct = [sum(ok for _, ok in outcomes[t]) for t, _ in rows]
        labels = [len(outcomes[t]) for t, _ in rows]
        return estimate_accuracy(correct=correct, labels=labels, probabilities=[p for _, p in rows]), correct, labels

    covered, naive, estimates = [], [], []
    for seed in range(draws):
        estimate, correct, labels = drawn(seed)
        estimates.append(estimate)
        covered.append(estimate.low is not None and estimate.low <= truth <= estimate.high)
        naive.append(sum(correct) / max(1, sum(labels)) - truth)
    first = estimates[0]  # the draw with seed 0, as `mllm-backend review-plan` makes by default
    return {
        "review_estimate": {
            "value": first.value,
            "low": first.low,
            "high": first.high,
            "truth": truth,
            "covered": bool(covered[0]),
            "reviewed_tasks": first.reviewed_tasks,
        },  # fmt: skip
        "review_estimate_coverage": float(np.mean(covered)),
        "review_estimate_unweighted_bias": float(np.mean(naive)),
    }


def calibration(client, engine, world: World, config: str, tasks: list[dict], raw: list[list[tuple[float, bool]]],
                task_scores: list[float], store: Path) -> dict:  # fmt: skip
    """ECE before and after a review sample of CALIBRATION_SHARE of the tasks (a plan recorded in the backend's
    store, reviewed through webhooks) calibrates the scores, on the labels not reviewed; and the same calibration
    fitted offline with and without the sample's 1/π weights (the selection-bias correction)."""
    from backend.annotate.suspicion import Calibrator
    from backend.reviews import ReviewStore

    plan = _sample(task_scores, CALIBRATION_SHARE)
    ReviewStore(store).record_plan(int(PROJECT.split(".")[0]), plan)
    drawn = {i.task: i.probability for i in plan.inclusion if i.selected}
    _review_webhooks(client, world, "boxes", sorted(drawn))
    again = _box_outcomes(world, _predict(client, engine, config, tasks))
    held = [i for i in range(len(tasks)) if i + 1 not in drawn]
    raw_pairs = [pair for i in held for pair in raw[i]]
    new_pairs = [pair for i in held for pair in again[i]]
    fitted = [(score, ok, 1 / drawn[i + 1]) for i in range(len(tasks)) if i + 1 in drawn for score, ok in raw[i]]
    offline = {}
    for name, weights in (("weighted", [w for *_, w in fitted]), ("unweighted", None)):
        calibrator = Calibrator().fit([s for s, _, _ in fitted], [ok for _, ok, _ in fitted], weights)
        offline[name] = expected_calibration_error([calibrator(s) for s, _ in raw_pairs], [ok for _, ok in raw_pairs])
    return {
        "ece_raw": expected_calibration_error([s for s, _ in raw_pairs], [ok for _, ok in raw_pairs]),
        "ece_calibrated": expected_calibration_error([s for s, _ in new_pairs], [ok for _, ok in new_pairs]),
        "ece_calibrated_unweighted": offline["unweighted"],
        "ece_calibrated_weighted": offline["weighted"],
        "reviewed_tasks": len(drawn),
        "reliability_raw": _bins(raw_pairs),
        "reliability_calibrated": _bins(new_pairs),
    }


def _bins(pairs: list[tuple[float, bool]]) -> list[dict]:
    from backend.evaluation.metrics import reliability_bins

    return reliability_bins([s for s, _ in pairs], [ok for _, ok in pairs])


def tags(client, engine, world: World, images: list, settings, mapper) -> dict:
    """Whole-image tags through /predict (the default method), ranked per tag by the result's ``label_scores``;
    then every tagging method asked of the same engine on the same images, side by side (``tag_methods``)."""
    from backend.evaluation.metrics import tag_metrics
    from backend.labelstudio.export import TagPair
    from backend.labelstudio.regions import label_scores

    config, tasks = _as_label_studio_sends(world, "tags")
    run = _predict(client, engine, config, tasks)
    truth = [frozenset(scene.tags) for scene in world.scenes]
    results = [next((r for r in p.get("result", []) if r["from_name"] == "tags"), {}) for p in run.predictions]
    pairs = [
        TagPair(number, "tags", frozenset(r.get("value", {}).get("choices", [])), t, r.get("score"), label_scores(r))
        for number, (r, t) in enumerate(zip(results, truth, strict=True), start=1)
    ]
    measured = tag_metrics(pairs, CLASSES)
    methods = tag_methods(engine, world, images, settings, mapper)
    default = methods[settings.tag_method]
    return {
        "tag_micro_f1": measured["micro_f1"],
        "tag_macro_f1": measured["macro_f1"],
        "tag_precision": measured["micro_precision"],
        "tag_recall": measured["micro_recall"],
        "tag_map": measured["mAP"],
        "tag_candidate_recall": default["candidate_recall"],
        "tag_candidates_per_image": default["candidates_per_image"],
        "tag_questions_per_image": default["questions_per_image"],
        "tag_calls_per_image": run.forward_passes / max(1, len(tasks)),
        "tag_methods": methods,
    }


def tag_methods(engine, world: World, images: list, settings, mapper) -> dict[str, dict]:
    """TagLLM against its baselines (one yes/no question per label; one open question listing every label) on
    the same images: recall, precision, F1, mAP from each tag's own score, candidates and questions per image."""
    from backend.annotate.tagging import TAG_METHODS, TagSettings, tag_images
    from backend.evaluation.metrics import tag_metrics
    from backend.labelstudio.config import parse_label_config
    from backend.labelstudio.export import TagPair
    from backend.prompts import PromptBook

    target = parse_label_config(world.projects["tags"][0].read_text()).image_choices[0]
    truth = [frozenset(scene.tags) for scene in world.scenes]
    table = {}
    for method in TAG_METHODS:
        tag_settings = TagSettings(settings.tag_threshold, settings.tag_candidate_threshold, settings.tag_group_size,
                                   method)  # fmt: skip
        found = tag_images(engine, PromptBook(settings.prompts_dir), images, list(target.labels), tag_settings,
                           dict(target.hints), dict(target.groups), mapper=mapper)  # fmt: skip
        pairs = [TagPair(n, "tags", frozenset(f.labels), t, None, f.presence)
                 for n, (f, t) in enumerate(zip(found, truth, strict=True), start=1)]  # fmt: skip
        measured = tag_metrics(pairs, CLASSES)
        table[method] = {
            "recall": measured["micro_recall"], "precision": measured["micro_precision"],
            "f1": measured["micro_f1"], "map": measured["mAP"],
            "candidate_recall": sum(len(set(f.candidates) & t) for f, t in zip(found, truth, strict=True))
            / max(1, sum(len(t) for t in truth)),
            "candidates_per_image": float(np.mean([len(f.candidates) for f in found])),
            "questions_per_image": float(np.mean([f.questions for f in found])),
        }  # fmt: skip
    return table


REVIEW_BUDGETS = (0.1, 0.2, 0.5)  # review samples of the training tasks in the downstream table


def downstream(shapes: list[_Shape], run: _Run, settings, tasks: int) -> dict:
    """Test accuracy of the downstream classifier (default backbone) by label source and loss, as ACT reports it.

    One frozen, human-labelled test split (the last TEST_SHARE of tasks) for every source. Trained on the rest
    with the world's true labels (``human``), the backend's labels (``mllm``), or the backend's labels with a
    review sample of k % of the training tasks corrected by a reviewer (``mllm_reviewed_k``, ACT's threshold
    rule with the 0.05 floor, so every π is known), each with every loss (training/classifier.py). On human
    labels the losses coincide (every weight 1, nothing to correct), as do ``act`` and ``plain`` on unreviewed
    MLLM labels, so those are trained once.
    """
    import torch

    from backend.review_plan import plan_review
    from backend.training import TRAINING_LOSSES
    from backend.training.backbone import classifier_backbone
    from backend.training.classifier import Classifier, TrainingData
    from backend.training.run import training_config

    backbone = classifier_backbone(configured=settings.classifier_backbone, serving_model=settings.mllm_model,
                                   model_dir=settings.model_dir)  # fmt: skip
    split = tasks - math.ceil(TEST_SHARE * tasks)
    train_scores = [(number, float(p["score"])) for number, p in enumerate(run.predictions[:split])]
    rows: dict[str, list] = {"crops": [], "truth": [], "predicted": [], "score": [], "task": []}
    for item in shapes:
        region = next(r for r in run.predictions[item.task].get("result", []) if r.get("id") == item.shape.id
                      and r.get("type") == "rectanglelabels")  # fmt: skip
        rows["crops"].append(item.crop)
        rows["truth"].append(CLASSES.index(item.shape.cls))
        rows["predicted"].append(CLASSES.index(region["value"]["rectanglelabels"][0]))
        rows["score"].append(float(region["score"]))
        rows["task"].append(item.task)
    arrays = {k: np.asarray(v) for k, v in rows.items() if k != "crops"}
    train, test = np.flatnonzero(arrays["task"] < split), np.flatnonzero(arrays["task"] >= split)
    truth, machine, task = arrays["truth"][train], arrays["predicted"][train], arrays["task"][train]
    images = [rows["crops"][i] for i in train]
    data = {
        "human": TrainingData(images, truth, np.ones(len(train)), task, np.ones(len(train), bool)),
        "mllm": TrainingData(images, machine, arrays["score"][train], task, np.zeros(len(train), bool), machine),
    }
    spent = {"human": 1.0, "mllm": 0.0}
    for budget in REVIEW_BUDGETS:
        plan = plan_review(train_scores, budget=budget)
        pi = {i.task: i.probability for i in plan.inclusion if i.selected}
        reviewed = np.array([t in pi for t in task])
        name = f"mllm_reviewed_{round(budget * 100)}"
        data[name] = TrainingData(images, np.where(reviewed, truth, machine), np.where(reviewed, 1.0,
                                  arrays["score"][train]), task, reviewed, machine,
                                  np.array([pi.get(t, 1.0) for t in task]))  # fmt: skip
        spent[name] = plan.review / max(1, split)
    base = training_config(settings)

    def accuracy(source: str, loss: str) -> float:
        torch.manual_seed(0)  # the same initial head for every source and loss: only the labels differ
        classifier = Classifier.build(backbone, CLASSES, multi_label=False)
        classifier.fit(data[source], replace(base, loss=loss))
        predicted = classifier.predict_proba([rows["crops"][i] for i in test]).argmax(axis=1)
        return float((predicted == arrays["truth"][test]).mean())

    human = accuracy("human", "plain")
    table: dict[str, dict[str, float]] = {loss: {"human": human} for loss in TRAINING_LOSSES}
    plain_mllm = accuracy("mllm", "plain")
    for loss in TRAINING_LOSSES:
        table[loss]["mllm"] = plain_mllm if loss in {"plain", "act"} else accuracy("mllm", loss)
        for source in data:
            if source.startswith("mllm_reviewed"):
                table[loss][source] = accuracy(source, loss)
    default = table[settings.training_loss]
    return {
        "downstream": default,
        "downstream_by_loss": table,
        "downstream_gap": {source: human - value for source, value in default.items()},
        "downstream_reviews_spent": spent,
    }


def attributes(client, engine, world: World, images: list, settings) -> dict:
    """Yes/no attributes (CelebA-style): agreement with the truth per attribute and overall, asked about by name
    through /predict, beside the question they got before ("which label best describes this image? yes / no")."""
    from backend.annotate.choice import choose_label
    from backend.prompts import PromptBook

    config, tasks = _as_label_studio_sends(world, "attributes")
    run = _predict(client, engine, config, tasks)
    names = list(world.scenes[0].attributes)
    truth = {name: ["yes" if scene.attributes[name] else "no" for scene in world.scenes] for name in names}
    asked = {name: [next((r["value"]["choices"][0] for r in p.get("result", []) if r["from_name"] == name), None)
                    for p in run.predictions] for name in names}  # fmt: skip
    book = PromptBook(settings.prompts_dir)
    unnamed = [c.label for c in choose_label(engine, book, "image_choice", images, ["yes", "no"])]
    which = {name: unnamed for name in names}  # that question never named the attribute: one answer for all

    def agreement(answers: dict[str, list]) -> dict:
        per = {n: float(np.mean([a == t for a, t in zip(answers[n], truth[n], strict=True)])) for n in names}
        return {"per_attribute": per, "overall": float(np.mean(list(per.values())))}

    return {"by_name": agreement(asked), "which_label": agreement(which),
            "positives": {n: float(np.mean([t == "yes" for t in truth[n]])) for n in names}}  # fmt: skip


def fine_names(engine, shapes: list[_Shape], run: _Run, settings, mapper) -> dict[str, dict]:
    """Does a box's fine name flag a wrong label? Its category is mapped onto the label set, and a name that
    disagrees with the box's predicted label is a flag. Asked with the shipped prompt (without the label) and
    with the label in it ("This image shows a {label}..."), on the same boxes."""
    import shutil
    import tempfile

    from backend.annotate.boxes import name_crops
    from backend.prompts import PromptBook
    from backend.shapes.questions import EXTRA

    predicted = {(r["id"], i): r["value"]["rectanglelabels"][0] for i, p in enumerate(run.predictions)
                 for r in p.get("result", []) if r.get("type") == "rectanglelabels"}  # fmt: skip
    labels = [predicted[item.shape.id, item.task] for item in shapes]
    wrong = np.array([label != item.shape.cls for label, item in zip(labels, shapes, strict=True)])
    variants = {}
    with tempfile.TemporaryDirectory() as scratch:
        for variant, template in (("without_label", None), ("with_label", EXTRA["fine_labelled"][0])):
            book = Path(scratch) / variant
            shutil.copytree(settings.prompts_dir, book)
            if template is not None:  # as a user who puts the label back into the prompt
                (book / "box_fine_label.txt").write_text(template)
            names = name_crops(engine, PromptBook(book), [item.crop for item in shapes], labels, CLASSES, mapper)
            category = [n.category.label if n.category is not None else None for n in names]
            flagged = np.array([c is not None and c != label for c, label in zip(category, labels, strict=True)])
            variants[variant] = {
                "flagged": float(flagged.mean()),
                "flag_precision": float(wrong[flagged].mean()) if flagged.any() else None,
                "flag_recall": float(flagged[wrong].mean()) if wrong.any() else None,
                "name_category_accuracy": float(
                    np.mean([c == item.shape.cls for c, item in zip(category, shapes, strict=True)])
                ),  # fmt: skip
            }
    return {"wrong_labels": float(wrong.mean()), **variants}


def label_modes(engine, shapes: list[_Shape], settings, mapper) -> dict[str, dict]:
    """Box labels asked each way on the same boxes: closed (labels scored), multiple-choice (letters scored) and
    open-world (free answer mapped), the first two as listed and averaged over 2 and 4 cyclic orders of the list.
    Accuracy, the AUROC of the label's probability for finding wrong labels, and how far each order's answers
    agree with the as-listed ones (order sensitivity)."""
    from backend.annotate.choice import choose_label
    from backend.prompts import PromptBook

    book = PromptBook(settings.prompts_dir)
    crops, truth = [item.crop for item in shapes], [item.shape.cls for item in shapes]
    table: dict[str, dict] = {}
    for mode, orders in (("closed", 1), ("closed", 2), ("closed", 4), ("multiple-choice", 1),
                         ("multiple-choice", 2), ("multiple-choice", 4), ("open-world", 1)):  # fmt: skip
        chosen = choose_label(engine, book, "box_label", crops, CLASSES, mode=mode, orders=orders, mapper=mapper)
        right = [c.label == t for c, t in zip(chosen, truth, strict=True)]
        table[f"{mode}/{orders}"] = {
            "accuracy": float(np.mean(right)),
            "error_auroc": auroc([-c.probability for c in chosen], [not ok for ok in right]),
            "out_of_set": float(np.mean([c.suggestion is not None for c in chosen])),
        }
    reversed_order = choose_label(engine, book, "box_label", crops, CLASSES[::-1])
    as_listed = choose_label(engine, book, "box_label", crops, CLASSES)
    table["closed/1"]["agrees_with_reversed_list"] = float(np.mean(
        [a.label == b.label for a, b in zip(as_listed, reversed_order, strict=True)]))  # fmt: skip
    return table


SMALL_SHARE = 0.25  # region_views' "small": the smallest quarter of the world's boxes by area


def region_views(engine, world: World, images: list[Image.Image], shapes: list[_Shape], settings) -> dict[str, dict]:
    """Box labels asked about the crop (``REGION_VIEW=crop``) and about the whole image with the box outlined
    (``context``), on the same boxes: accuracy, error AUROC, and accuracy on the smallest quarter of boxes (where
    a crop has the least to show) and on the rest."""
    from backend.annotate.choice import choose_label
    from backend.prompts import PromptBook
    from backend.shapes.questions import in_context

    book = PromptBook(settings.prompts_dir)
    truth = [item.shape.cls for item in shapes]
    areas = np.array([item.shape.width * item.shape.height for item in shapes])
    small = areas <= np.quantile(areas, SMALL_SHARE) if len(areas) else areas.astype(bool)
    shown = {
        "crop": ("box_label", [item.crop for item in shapes]),
        "context": ("box_context_label", [in_context(images[item.task], world.scenes[item.task], item.shape)
                                          for item in shapes]),
    }  # fmt: skip
    table: dict[str, dict] = {}
    for view, (template, pictures) in shown.items():
        chosen = choose_label(engine, book, template, pictures, CLASSES)
        right = np.array([c.label == t for c, t in zip(chosen, truth, strict=True)])
        table[view] = {
            "accuracy": float(right.mean()) if len(right) else None,
            "error_auroc": auroc([-c.probability for c in chosen], list(~right)),
            "accuracy_small": float(right[small].mean()) if small.any() else None,
            "accuracy_rest": float(right[~small].mean()) if (~small).any() else None,
        }
    return table


def prompt_edit(engine, shapes: list[_Shape]) -> float:
    """Box accuracy when the box question is a paraphrase the shapes model never saw (a user's reasonable edit)."""
    from backend.annotate.choice import choose
    from backend.prompts import format_labels
    from backend.shapes.questions import phrasings

    template = phrasings("box_label", held_out=True)[0]
    answers = choose(engine, [item.crop for item in shapes], template.format(labels=format_labels(CLASSES)), CLASSES)
    return float(np.mean([a.label == item.shape.cls for a, item in zip(answers, shapes, strict=True)]))


@dataclass(frozen=True)
class _Shape:
    """A ground-truth shape of the world with its task (0-based) and its crop, as the backend crops it."""

    task: int
    shape: Shape
    crop: Image.Image


def _images_and_shapes(world: World) -> tuple[list[Image.Image], list[_Shape]]:
    """The world's images, read once, and every shape's crop."""
    from backend.shapes.questions import crop_of

    images = [Image.open(world.root / "images" / f"{scene.name}.png").convert("RGB") for scene in world.scenes]
    shapes = [_Shape(index, shape, crop_of(images[index], scene, shape))
              for index, scene in enumerate(world.scenes) for shape in scene.shapes]  # fmt: skip
    return images, shapes


def _through_server(model: str, base_url: str, served_model: str, state: Path, scoring: str) -> dict[str, str]:
    """The settings that put ``served_model`` at ``base_url`` behind the backend; ``model`` is the same checkpoint
    on disk, whose vision tower the downstream classifier starts from (a server has none to lend)."""
    from backend.training.backbone import classifier_backbone

    backbone = classifier_backbone(configured=None, serving_model=model, model_dir=state)
    return {"MLLM_PROVIDER": "openai", "OPENAI_BASE_URL": base_url, "MLLM_MODEL": served_model,
            "CLASSIFIER_BACKBONE": backbone, "OPENAI_SCORING": scoring}  # fmt: skip


def run_quality(out: Path, *, tasks: int, seed: int, model: str, base_url: str | None = None,
                served_model: str | None = None, scoring: str = "full-label", boxes_only: bool = False,
                log: Log = print) -> dict:  # fmt: skip
    """Generate the held-out world, predict, review, and write report.json, summary.md and plots into ``out``.

    With ``base_url``, every question goes to the OpenAI-compatible server there (``served_model``, by default the
    server's name for ``model``; ``scoring`` is OPENAI_SCORING), as a deployment with a shared vLLM runs it.
    ``boxes_only`` stops after the box labels and their suspicion figures (box accuracy, AUROCs, review at 20 %):
    the quick check of a server."""
    from backend.reviews import ReviewStore
    from backend.settings import Settings

    out = Path(out)
    for stale in out.glob("state*"):  # a previous run's reviews would calibrate this run's "raw" scores
        shutil.rmtree(stale)
    world = write_world(out / "world", tasks=tasks, seed=seed)
    images, shapes = _images_and_shapes(world)
    boxes = len(shapes)
    log(f"world {WORLD_VERSION}, seed {seed}: {tasks} tasks, {boxes} boxes"
        + (f", through {base_url}" if base_url else ", in process"))  # fmt: skip
    config, sent = _as_label_studio_sends(world, "boxes")
    served = _through_server(model, base_url, served_model or model, out / "backbone", scoring) if base_url else {}
    settings = Settings.from_env({"MLLM_MODEL": model, "MODEL_DIR": str(out / "state"), **served})  # the defaults
    critic_default = settings.critic
    client, engine = _backend(model, out / "state", **served)  # the defaults: what a user gets
    run = _predict(client, engine, config, sent)
    outcomes = _box_outcomes(world, run)
    task_scores = [float(p["score"]) for p in run.predictions]
    confidence_by_task = ReviewStore(out / "state" / "reviews.sqlite3").annotator_task_scores(1)
    confidence = [confidence_by_task.get(i + 1, 1.0) for i in range(len(sent))]
    labels = [ok for task in outcomes for _, ok in task]
    report: dict = {
        "schema_version": SCHEMA_VERSION, "world_version": WORLD_VERSION, "seed": seed, "tasks": tasks,
        "boxes": boxes, "model": model, "critic_default": critic_default, "server": base_url,
        "scoring": engine.scoring_method, "box_accuracy": float(np.mean(labels)) if labels else None,
    }  # fmt: skip
    report.update(suspicion(task_scores, outcomes, confidence))
    report["calls_per_image"] = run.forward_passes / max(1, tasks)
    report["tokens_per_box"] = run.tokens / max(1, boxes)
    if boxes_only:
        write(_finite(report), out)
        return report
    flipped_client, flipped_engine = _backend(model, out / "state-critic-flipped",
                                              CRITIC="off" if critic_default else "on", **served)  # fmt: skip
    flipped = _predict(flipped_client, flipped_engine, config, sent)  # the same boxes, the critic the other way
    flipped_outcomes = _box_outcomes(world, flipped)
    flipped_scores = [float(p["score"]) for p in flipped.predictions]
    flipped_auroc = auroc([-s for s in flipped_scores], [any(not ok for _, ok in task) for task in flipped_outcomes])
    with_critic, without = (
        (report["task_auroc"], flipped_auroc) if critic_default else (flipped_auroc, report["task_auroc"])
    )
    report.update(
        task_auroc_with_critic=with_critic, task_auroc_without_critic=without, critic_auroc_gain=with_critic - without
    )  # NaN when no task holds a wrong label
    report.update(review_sample(task_scores, outcomes))
    report.update(calibration(client, engine, world, config, sent, outcomes, task_scores,
                              out / "state" / "reviews.sqlite3"))  # fmt: skip
    report["box_accuracy_prompt_edit"] = prompt_edit(engine, shapes)
    mapper = _mapper(settings)  # one text encoder, loaded once, for every free answer below
    report["fine_names"] = fine_names(engine, shapes, run, settings, mapper)
    report["label_modes"] = label_modes(engine, shapes, settings, mapper)
    report["region_views"] = region_views(engine, world, images, shapes, settings)
    report["region_accuracy"] = region_accuracy(client, engine, world)
    report.update(tags(client, engine, world, images, settings, mapper))
    report["attributes"] = attributes(client, engine, world, images, settings)
    report.update(downstream(shapes, run, settings, tasks))
    report = _finite(report)
    write(report, out)
    return report


def _mapper(settings):
    from backend.annotate.mapping import LabelMapper
    from backend.models.text_encoder import SentenceEncoder

    return LabelMapper(SentenceEncoder(settings.text_encoder), settings.mapping_min_similarity)


def _finite(value: object) -> object:
    """NaN (e.g. an AUROC with no wrong label to rank) becomes null: report.json stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def write(report: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_finite(report), indent=1, allow_nan=False))
    (out / "summary.md").write_text(summary(report))
    return [out / "report.json", out / "summary.md", *_plots(report, out)]


def _fmt(value: object) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key} {_fmt(v)}" for key, v in value.items())
    return f"{value:.3f}" if isinstance(value, float) else ("—" if value is None else str(value))


KEYS = (
    "box_accuracy", "box_accuracy_prompt_edit", "region_accuracy", "task_auroc", "region_auroc",
    "task_auroc_confidence", "critic_auroc_gain", "review_found_at_20", "review_found_at_20_random",
    "review_found_at_20_confidence", "ece_raw", "ece_calibrated", "ece_calibrated_unweighted",
    "ece_calibrated_weighted", "review_estimate", "review_estimate_coverage", "review_estimate_unweighted_bias",
    "tag_micro_f1", "tag_macro_f1", "tag_precision", "tag_recall", "tag_map",
    "tag_candidate_recall", "tag_candidates_per_image", "tag_questions_per_image", "calls_per_image",
    "tokens_per_box", "fine_names", "attributes", "downstream", "downstream_gap",
)  # fmt: skip


def summary(report: dict) -> str:
    lines = [f"# Label quality on the shapes world ({report['world_version']}, seed {report['seed']})", "",
             f"{report['tasks']} tasks, {report['boxes']} boxes, model `{report['model']}`.", "",
             "| metric | value |", "| --- | --- |"]  # fmt: skip
    lines += [f"| `{key}` | {_fmt(report.get(key))} |" for key in KEYS if key in report]
    modes = report.get("label_modes") or {}
    if modes:
        lines += ["", "Box labels asked each way (mode/cyclic orders averaged), on the same boxes:", "",
                  "| mode | accuracy | error AUROC | out of set |", "| --- | --- | --- | --- |"]  # fmt: skip
        lines += [f"| {name} | {_fmt(row['accuracy'])} | {_fmt(row['error_auroc'])} | {_fmt(row['out_of_set'])} |"
                  for name, row in modes.items()]  # fmt: skip
    by_loss = report.get("downstream_by_loss") or {}
    if by_loss:
        losses, spent = list(by_loss), report.get("downstream_reviews_spent") or {}
        lines += [
            "",
            "Downstream test accuracy by label source and loss (frozen human-labelled test split):",
            "",
            "| source | " + " | ".join(losses) + " | tasks reviewed |",
            "| --- |" + " --- |" * (len(losses) + 1),
        ]
        lines += [f"| {source} | " + " | ".join(_fmt(by_loss[loss].get(source)) for loss in losses)
                  + f" | {_fmt(spent.get(source))} |" for source in by_loss[losses[0]]]  # fmt: skip
    views = report.get("region_views") or {}
    if views:
        columns = ("accuracy", "error_auroc", "accuracy_small", "accuracy_rest")
        lines += ["", f"Box labels by what the question shows (small: the smallest {SMALL_SHARE:.0%} of boxes):", "",
                  "| view | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]  # fmt: skip
        lines += [f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for name, row in views.items()]
    methods = report.get("tag_methods") or {}
    if methods:
        columns = ("recall", "precision", "f1", "map", "candidate_recall", "candidates_per_image",
                   "questions_per_image")  # fmt: skip
        lines += ["", "Tagging methods on the same images:", "", "| method | " + " | ".join(columns) + " |",
                  "| --- |" + " --- |" * len(columns)]  # fmt: skip
        lines += [
            f"| {name} | " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for name, row in methods.items()
        ]
    return "\n".join(lines) + "\n"


def _plots(report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfectly calibrated")
    for key, name in (("reliability_raw", "raw"), ("reliability_calibrated", "calibrated")):
        bins = report.get(key) or []
        axis.plot([b["mean_score"] for b in bins], [b["accuracy"] for b in bins], marker="o", label=name)
    axis.set(xlabel="score (P(correct))", ylabel="share correct", title="Reliability, labels not reviewed")
    axis.legend()
    path = out / "reliability.png"
    figure.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(figure)
    return [path]
