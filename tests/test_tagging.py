"""TagLLM tagging on the tiny checkpoint: group-wise candidates, then concept confirmation."""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from backend.annotate.mapping import LabelMapper
from backend.annotate.tagging import NONE_OF_THESE, TagSettings, answer_sets, label_groups, presence, tag_images
from backend.labelstudio.config import UnsupportedConfig, parse_label_config
from backend.models.text_encoder import SentenceEncoder
from backend.prompts import PromptBook
from backend.settings import PACKAGE_PROMPTS
from tests.conftest import noise_image, png_bytes

ROOT = Path(__file__).resolve().parents[1]
COCO = parse_label_config((ROOT / "label_config" / "image_tags_coco.xml").read_text()).image_choices[0]


class CountingEngine:
    """Passes every call to the real engine, counting model passes per image through the provider interface."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.name = inner.name
        self.passes: Counter[int] = Counter()
        self.prompts: list[str] = []

    def score_options(self, images, prompt, options):
        self.passes.update(id(image) for image in images)
        self.prompts.append(prompt)
        return self.inner.score_options(images, prompt, options)

    def generate(self, images, prompt, max_new_tokens=32):
        self.passes.update(id(image) for image in images)
        self.prompts.append(prompt)
        return self.inner.generate(images, prompt, max_new_tokens)

    def __getattr__(self, name: str):  # the usage counters and scoring method: the real engine's
        return getattr(self.inner, name)


@pytest.fixture(scope="module")
def text_mapper() -> LabelMapper:
    return LabelMapper(SentenceEncoder(), min_similarity=0.45)


@pytest.fixture
def prompts(tmp_path) -> PromptBook:
    shutil.copytree(PACKAGE_PROMPTS, tmp_path / "prompts")
    return PromptBook(tmp_path / "prompts")


def test_coco_config_groups_by_supercategory():
    assert len(COCO.labels) == 80
    groups = label_groups(COCO.labels, dict(COCO.groups), 10)
    assert len(groups) == 12 and sorted(len(g) for g in groups)[:2] == [1, 5]
    assert ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe") in groups
    assert label_groups(["a", "b", "c", "d", "e"], {"d": "x"}, 2) == [("d",), ("a", "b"), ("c", "e")]


@pytest.mark.parametrize("candidate_threshold", [0.05, 0.0])
def test_passes_per_image_are_groups_plus_confirmations(llava_engine, prompts, candidate_threshold):
    engine = CountingEngine(llava_engine)
    images = [noise_image(40, 30, 1), noise_image(25, 60, 2), noise_image(64, 64, 3)]
    settings = TagSettings(threshold=0.5, candidate_threshold=candidate_threshold, group_size=10)
    tags = tag_images(engine, prompts, images, COCO.labels, settings, dict(COCO.hints), dict(COCO.groups))
    for image, result in zip(images, tags, strict=True):
        assert engine.passes[id(image)] == 12 + len(result.candidates)
        assert set(result.presence) == set(COCO.labels)
        assert all(0.0 <= p <= 1.0 for p in result.presence.values())
        assert set(result.labels) <= set(result.candidates)
        assert all(result.presence[label] >= 0.5 for label in result.labels)
    if candidate_threshold == 0.0:
        assert all(len(result.candidates) == 80 for result in tags)
    assert sum(NONE_OF_THESE in p for p in engine.prompts) == 12  # each group question offers "none of these"


def test_an_edited_definition_changes_the_next_confirmation_prompt(llava_engine, prompts):
    engine = CountingEngine(llava_engine)
    settings = TagSettings(candidate_threshold=0.0)
    image = [noise_image(30, 30)]
    tag_images(engine, prompts, image, ["mouse"], settings, {"mouse": "computer mouse"})
    assert "the hand-held pointing device" in engine.prompts[-1]  # concepts.json wins over the config hint
    before = prompts.fingerprint()
    concepts_path = prompts.directory / "concepts.json"
    concepts = json.loads(concepts_path.read_text())
    concepts["definitions"]["mouse"] = "a small rodent with a long tail"
    concepts_path.write_text(json.dumps(concepts))
    stat = concepts_path.stat()
    os.utime(concepts_path, (stat.st_atime, stat.st_mtime + 2))
    tag_images(engine, prompts, image, ["mouse"], settings, {"mouse": "computer mouse"})
    assert "a small rodent with a long tail" in engine.prompts[-1]
    assert prompts.fingerprint() != before, "model_version follows the definitions"
    tag_images(engine, prompts, image, ["remote control"], settings, {"remote control": "a TV remote"})
    assert "a TV remote" in engine.prompts[-1]  # no concepts entry: the config's hint


def test_per_control_settings_come_from_the_label_config():
    spec = parse_label_config(
        '<View><Image name="i" value="$i"/><Choices name="c" toName="i" choice="multiple" mllmThreshold="0.7" '
        'mllmCandidateThreshold="0.2" mllmGroupSize="5"><Choice value="a" hint="letter a" group="g"/>'
        '<Choice value="b"/></Choices></View>'
    )
    [target] = spec.image_choices
    assert (target.threshold, target.candidate_threshold, target.group_size) == (0.7, 0.2, 5)
    assert dict(target.hints) == {"a": "letter a"} and dict(target.groups) == {"a": "g"}
    with pytest.raises(UnsupportedConfig, match='mllmThreshold="2"'):
        parse_label_config(
            '<View><Image name="i" value="$i"/><Choices name="c" toName="i" mllmThreshold="2">'
            '<Choice value="a"/></Choices></View>'
        )


def test_concepts_file_errors_name_the_file(prompts):
    (prompts.directory / "concepts.json").write_text('{"definitions": ["not", "a", "mapping"]}')
    with pytest.raises(ValueError, match="concepts.json"):
        prompts.concepts()


def test_answer_sets_cover_every_subset_of_a_small_group_in_listing_order_and_stay_within_the_limit():
    assert answer_sets(["a", "b"]) == [(), ("a",), ("b",), ("a", "b")]
    assert len(answer_sets(list("abcdef"))) == 64  # every subset of six labels
    ten = answer_sets(list("abcdefghij"))
    assert len(ten) == 1 + 10 + 45 and max(len(s) for s in ten) == 2  # by size, smallest first
    assert all(list(s) == sorted(s) for s in ten)  # the answer lists labels in the order the question did
    assert answer_sets(list("abcdefghij"), limit=11) == [(), *((c,) for c in "abcdefghij")]


def test_a_label_is_present_with_the_probability_of_every_answer_naming_it(llava_engine, prompts):
    images = [noise_image(40, 30, 1), noise_image(30, 30, 2)]
    group = ("cat", "dog", "bird")
    question = prompts.render("tag_candidates", labels="- cat\n- dog\n- bird")
    found = presence(llava_engine, images, question, group)
    options = [", ".join(s) if s else NONE_OF_THESE for s in answer_sets(group)]
    scored = llava_engine.score_options(images, question, options).probabilities
    for i in range(len(images)):
        for j, label in enumerate(group):
            assert found[i, j] == pytest.approx(sum(p for p, o in zip(scored[i], options, strict=True)
                                                    if label in o.split(", ")))  # fmt: skip
        # presence is a probability per label, not a share of one answer: together they can pass 1
        assert found[i].min() >= 0.0 and found[i].max() <= 1.0


def test_the_baselines_ask_one_question_per_label_or_one_per_image(llava_engine, prompts):
    engine = CountingEngine(llava_engine)
    images = [noise_image(40, 30, 1), noise_image(25, 60, 2)]
    labels = ["cat", "dog", "bird", "car"]
    yes_no = tag_images(engine, prompts, images, labels, TagSettings(method="yes_no"))
    assert all(engine.passes[id(image)] == 4 for image in images)
    assert all(t.questions == 4 and t.candidates == tuple(labels) and t.confirmed for t in yes_no)
    engine.passes.clear()
    opened = tag_images(engine, prompts, images, labels, TagSettings(method="open"))
    assert all(engine.passes[id(image)] == 1 for image in images)
    assert all(t.questions == 1 and not t.confirmed and set(t.presence) == set(labels) for t in opened)
    assert "- car" in engine.prompts[-1]  # one question listing every label


def test_an_open_answer_names_labels_exactly_or_through_the_text_encoder(text_mapper):
    from backend.annotate.tagging import _named_labels

    labels = ["cat", "dog", "aeroplane"]
    assert _named_labels("Cat, dog.", labels, None) == {"cat", "dog"}
    assert _named_labels("none of these", labels, None) == set()
    assert _named_labels("cat, airplane, spaceship", labels, text_mapper) == {"cat", "aeroplane"}


TAGS_CONFIG = (
    '<View><Image name="image" value="$image"/><Choices name="tags" toName="image" choice="multiple">'
    '<Choice value="cat" group="animal"/><Choice value="dog" group="animal"/><Choice value="car"/></Choices></View>'
)


def _tag_prediction(client, threshold: str | None = None) -> dict:
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(40, 30, 5))).decode()
    body = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": TAGS_CONFIG}
    [prediction] = client.post("/predict", json=body).get_json()["results"]
    return prediction


@pytest.mark.parametrize("threshold", ["0", "1"])
def test_a_tags_result_keeps_every_labels_probability_even_when_no_tag_is_kept(make_client, threshold):
    client, _ = make_client(TAG_THRESHOLD=threshold, TAG_CANDIDATE_THRESHOLD="0")
    [result] = _tag_prediction(client)["result"]
    assert result["value"]["choices"] == (["cat", "dog", "car"] if threshold == "0" else [])
    assert set(result["label_scores"]) == {"cat", "dog", "car"}
    assert all(0.0 <= p <= 1.0 for p in result["label_scores"].values())
    assert len(set(result["label_scores"].values())) > 1  # each label's own probability, not one shared score


@pytest.mark.parametrize("method", ["tagllm", "yes_no"])
def test_the_critic_does_not_ask_again_what_a_tags_confirmation_already_asked(make_client, method):
    passes = {}
    for critic in ("off", "on"):
        client, service = make_client(TAG_METHOD=method, TAG_THRESHOLD="0", TAG_CANDIDATE_THRESHOLD="0",
                                      CRITIC=critic)  # fmt: skip
        engine = service.slot.get(timeout=60)
        before = engine.forward_passes
        _tag_prediction(client)
        passes[critic] = engine.forward_passes - before
    assert passes["on"] == passes["off"] > 0, passes


ATTRIBUTES_CONFIG = (
    '<View><Image name="image" value="$image"/>'
    '<Choices name="Wearing_Hat" toName="image" hint="a hat or cap on the head"><Choice value="Yes"/>'
    '<Choice value="No"/></Choices>'
    '<Choices name="q7" toName="image" mllmAttribute="Eyeglasses"><Choice value="no"/><Choice value="yes"/></Choices>'
    '<Choices name="mood" toName="image"><Choice value="happy"/><Choice value="sad"/><Choice value="calm"/></Choices>'
    "</View>"
)


def test_a_yes_no_choices_is_an_attribute_named_by_its_control_or_mllm_attribute():
    by_name = {c.control: c for c in parse_label_config(ATTRIBUTES_CONFIG).image_choices}
    assert by_name["Wearing_Hat"].attribute == ("Wearing Hat", ("Yes", "No"))
    assert by_name["Wearing_Hat"].attribute_hint == "a hat or cap on the head"
    assert by_name["q7"].attribute == ("Eyeglasses", ("yes", "no"))
    assert by_name["mood"].attribute is None  # three choices: a classification


def test_an_attribute_is_asked_about_by_name_and_answered_in_the_configs_spelling(make_client, monkeypatch):
    client, service = make_client(CRITIC="on")
    engine = service.slot.get(timeout=60)
    asked: list[str] = []
    original = engine.score_options

    def recording(images, prompt, options):
        asked.append(prompt)
        return original(images, prompt, options)

    monkeypatch.setattr(engine, "score_options", recording)
    image = "data:image/png;base64," + base64.b64encode(png_bytes(noise_image(40, 30, 5))).decode()
    body = {"tasks": [{"id": 1, "data": {"image": image}}], "label_config": ATTRIBUTES_CONFIG}
    [prediction] = client.post("/predict", json=body).get_json()["results"]
    answers = {r["from_name"]: r["value"]["choices"] for r in prediction["result"]}
    assert answers["Wearing_Hat"][0] in {"Yes", "No"} and answers["q7"][0] in {"yes", "no"}
    hat = next(p for p in asked if "Wearing Hat" in p)
    assert "a hat or cap on the head" in hat and "Answer yes or no" in hat
    assert any("Eyeglasses" in p for p in asked)
    judged = [p for p in asked if "annotator labelled" in p]
    assert len(judged) == 1 and answers["mood"][0] in judged[0]  # the critic judges the class, not the attributes
