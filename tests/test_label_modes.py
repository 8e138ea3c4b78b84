"""Label questions in their three modes and with option-order debiasing (annotate/choice.py)."""

from __future__ import annotations

import numpy as np
import pytest

from backend.annotate.choice import choose_label
from backend.annotate.mapping import LabelMapper
from backend.labelstudio.config import UnsupportedConfig, parse_label_config
from backend.models.text_encoder import SentenceEncoder
from backend.prompts import PromptBook
from backend.settings import PACKAGE_PROMPTS
from tests.conftest import noise_image

LABELS = ("cat", "dog", "bird", "car")


PROMPTS = PromptBook(PACKAGE_PROMPTS)


class Recording:
    def __init__(self, inner) -> None:
        self.inner, self.name, self.asked = inner, inner.name, []

    def score_options(self, images, prompt, options):
        self.asked.append((prompt, tuple(options)))
        return self.inner.score_options(images, prompt, options)

    def generate(self, images, prompt, max_new_tokens=32):
        self.asked.append((prompt, ()))
        return self.inner.generate(images, prompt, max_new_tokens)

    def __getattr__(self, name: str):  # the usage counters: the real engine's
        return getattr(self.inner, name)


def test_cyclic_orders_average_each_labels_probability_over_the_rotated_lists(llava_engine):
    images = [noise_image(30, 30, 1), noise_image(40, 20, 2)]
    engine = Recording(llava_engine)
    debiased = choose_label(engine, PROMPTS, "box_label", images, LABELS, orders=2)
    assert [options for _, options in engine.asked] == [LABELS, ("bird", "car", "cat", "dog")]
    expected = np.zeros((len(images), len(LABELS)))
    for prompt, options in engine.asked:
        probabilities = llava_engine.score_options(images, prompt, options).probabilities
        expected += probabilities[:, [options.index(label) for label in LABELS]] / 2
    for choice, row in zip(debiased, expected, strict=True):
        assert np.allclose(choice.probabilities, row) and choice.label == LABELS[int(row.argmax())]
    assert (
        choose_label(llava_engine, PROMPTS, "box_label", images, LABELS)[0].probabilities != debiased[0].probabilities
    )


def test_multiple_choice_scores_the_letters_of_the_listed_labels(llava_engine):
    engine = Recording(llava_engine)
    [choice] = choose_label(engine, PROMPTS, "box_label", [noise_image(30, 30, 3)], LABELS, mode="multiple-choice")
    [(prompt, options)] = engine.asked
    assert options == ("A", "B", "C", "D") and "B. dog" in prompt.splitlines() and "- dog" not in prompt
    assert prompt.count("Answer") == 1
    assert sum(choice.probabilities) == pytest.approx(1.0) and choice.labels == LABELS


@pytest.fixture(scope="module")
def shapes_engine():
    from backend.models.local import TransformersEngine
    from backend.shapes.training import SHIPPED

    return TransformersEngine.load(str(SHIPPED), "cpu")


@pytest.fixture(scope="module")
def circle_crops():
    from backend.shapes.questions import crop_of
    from backend.shapes.world import generate_world

    crops = [crop_of(image, scene, shape) for scene, image in generate_world(tasks=40, seed=2003)
             for shape in scene.shapes if shape.cls == "circle"]  # fmt: skip
    return crops[:6]


def test_open_world_maps_a_free_answer_and_keeps_an_out_of_set_one_as_a_suggestion(shapes_engine, circle_crops):
    mapper = LabelMapper(SentenceEncoder(), min_similarity=0.45)
    inside = choose_label(shapes_engine, PROMPTS, "box_label", circle_crops, ("circle", "square", "star"),
                          mode="open-world", mapper=mapper)  # fmt: skip
    exact = [c for c in inside if c.mapped == 0.0]  # "striped orange circle (circle)": its category is a label
    assert len(exact) >= 4 and all(c.label == "circle" and c.suggestion is None for c in exact)
    outside = choose_label(shapes_engine, PROMPTS, "box_label", circle_crops, ("invoice", "receipt"),
                           mode="open-world", mapper=mapper)  # fmt: skip
    suggested = [c for c in outside if c.suggestion is not None]
    assert len(suggested) == len(circle_crops)  # no label is like a shape: every answer is kept as a suggestion
    assert sum("circle" in c.suggestion for c in suggested) >= 4
    assert all(c.label in {"invoice", "receipt"} and c.mapped == 1.0 for c in suggested)  # the nearest, marked


def test_a_controls_mllm_mode_is_read_and_checked():
    spec = parse_label_config('<View><Image name="i" value="$i"/><RectangleLabels name="b" toName="i" '
                              'mllmMode="multiple-choice"><Label value="a"/><Label value="c"/></RectangleLabels>'
                              '</View>')  # fmt: skip
    assert spec.region_labels[0].mode == "multiple-choice"
    with pytest.raises(UnsupportedConfig, match='mllmMode="guess"; set it to closed, multiple-choice, open-world'):
        parse_label_config('<View><Image name="i" value="$i"/><Choices name="c" toName="i" mllmMode="guess">'
                           '<Choice value="a"/></Choices></View>')  # fmt: skip


def test_out_of_set_answers_are_listed_per_project_as_candidate_new_classes(make_client, circle_crops):
    import base64

    from backend.shapes.training import SHIPPED
    from tests.conftest import png_bytes

    client, _ = make_client(MLLM_MODEL=str(SHIPPED), LABEL_MODE="open-world")
    config = ('<View><Image name="i" value="$i"/><RectangleLabels name="b" toName="i"><Label value="invoice"/>'
              '<Label value="receipt"/></RectangleLabels></View>')  # fmt: skip
    tasks = []
    for task_id, crop in enumerate(circle_crops[:3], start=1):  # one circle filling each image
        url = "data:image/png;base64," + base64.b64encode(png_bytes(crop)).decode()
        box = {
            "id": f"b{task_id}",
            "from_name": "b",
            "to_name": "i",
            "type": "rectanglelabels",
            "value": {"x": 0, "y": 0, "width": 100, "height": 100, "rotation": 0, "rectanglelabels": []},
        }
        tasks.append({"id": task_id, "data": {"i": url}, "annotations": [{"id": task_id, "result": [box]}]})
    answered = client.post("/predict", json={"tasks": tasks, "label_config": config, "project": "7.1"}).get_json()
    written = [r["out_of_set"] for p in answered["results"] for r in p["result"]]
    assert len(written) == 3 and all(written)
    listed = client.get("/suggestions?project=7").get_json()
    assert listed["project"] == 7
    suggestions = listed["suggestions"]
    assert sum(s["count"] for s in suggestions) == 3
    assert {t for s in suggestions for t in s["tasks"]} == {1, 2, 3}
    assert all(set(s["labelled_as"]) <= {"invoice", "receipt"} and s["controls"] == ["b"] for s in suggestions)
    assert {s["text"].casefold() for s in suggestions} == {w.strip().casefold() for w in written}
    assert client.get("/suggestions?project=8").get_json()["suggestions"] == []
    missing = client.get("/suggestions")
    assert missing.status_code == 400 and "GET /suggestions?project=<id>" in missing.get_json()["error"]
