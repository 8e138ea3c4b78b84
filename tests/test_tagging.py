"""TagLLM tagging on the tiny checkpoint: group-wise candidates, then concept confirmation."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import pytest

from backend.annotate.tagging import NONE_OF_THESE, TagSettings, label_groups, tag_images
from backend.labelstudio.config import UnsupportedConfig, parse_label_config
from backend.prompts import PromptBook
from backend.settings import PACKAGE_PROMPTS
from tests.conftest import noise_image

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
        return self.inner.generate(images, prompt, max_new_tokens)


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
