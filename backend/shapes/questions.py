"""The questions the backend asks, as training examples over the shapes world, with known answers.

Each kind of question the backend asks today (box label, fine name, critic, whole-image choice,
tag candidates, tag confirmation) or is about to ask (all labels of a group present, "is this
label wrong", "X or Y") becomes (image, prompt, answer) examples. The first phrasing of each is
the shipped prompt, rendered by the backend's own :class:`PromptBook`; the others are
paraphrases, and the last paraphrase of each kind is held out of training, to check that a
reasonable edit of a prompt still works. Label lists are shuffled and vary in size, and some
examples put the text before the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from backend.annotate.critic import NO_ALTERNATIVE, NO_ALTERNATIVE_MEANS
from backend.labelstudio.regions import Box, box_from_region, crop_box, outline_box
from backend.prompts import LETTERS, PromptBook, format_labels, lettered_question
from backend.settings import PACKAGE_PROMPTS
from backend.shapes.world import ATTRIBUTES, CLASSES, DEFINITIONS, GROUPS, REGION_KINDS, Scene, Shape

YES, NO, NONE_OF_THESE = "yes", "no", "none of these"
CONFUSABLE = {"circle": "ellipse", "ellipse": "circle", "square": "rectangle", "rectangle": "square",
              "triangle": "diamond", "diamond": "triangle", "star": "cross", "cross": "star"}  # fmt: skip
BOX_MIN_SIDE = 32  # as the backend crops (Settings.box_min_side)

PARAPHRASES: dict[str, tuple[str, ...]] = {
    "box_label": (
        "What is the object in this picture? Choose one of these labels:\n{labels}\nReply with the label only.",
        "Pick the label that fits the object in this image best.\nOptions:\n{labels}",
        "Classify the object in the image. Possible labels:\n{labels}\nGive one label from the list.",
    ),
    "box_context_label": (  # the whole image with the region's box drawn in red
        "What is the object in the red box? Choose one of these labels:\n{labels}\nReply with the label only.",
        "Look at the shape inside the red frame. Which label fits it?\n{labels}\nGive one label from the list.",
        "Classify the object marked by the red box. Possible labels:\n{labels}\nAnswer with one label.",
    ),
    "critic": (  # find the error, against the runner-up ("yes": the label is wrong)
        'This image was labelled "{label}" ({definition}); the runner-up was "{alternative}" '
        "({alternative_definition}). Is the label a mistake? Answer yes or no.",
        'Label: "{label}", meaning {definition}. Closest other label: "{alternative}", meaning '
        "{alternative_definition}. Is the label wrong for this picture? Answer yes or no.",
    ),
    "box_fine_label": (  # without the box's label (the shipped prompt is the first phrasing)
        "What exactly is this object? Give a precise name, then its category in parentheses.",
    ),
    "image_choice": (
        "Which of these labels describes the image as a whole?\n{labels}\nReply with one label.",
        "Choose the best label for this whole picture:\n{labels}\nAnswer with one label only.",
    ),
    "tag_candidates": (  # every label of the group that is present (the shipped prompt is the first phrasing)
        'Which of these appear in the picture? List every one you see, separated by commas, or "none of these".\n'
        "{labels}",
    ),
    "attribute": (
        'Is this image "{attribute}" ({definition})? Answer yes or no.',
        'Here "{attribute}" means {definition}. Does that describe this picture? Answer yes or no.',
    ),
    "tag_confirm": (
        "Is there a {label} in this image? Here it means: {definition}. Answer yes or no.",
        'Does the picture contain "{label}" ({definition})? Answer yes or no.',
    ),
}
# Asked by the coming methods (several labels at once, error-finding critics, binary disambiguation).
EXTRA: dict[str, tuple[str, ...]] = {
    "critic_correct": (  # the critic's question before it looked for the error against the runner-up
        'An annotator labelled this image "{label}". In this task, "{label}" means: {definition}.\n'
        "Look carefully. Is that label correct for this image? Answer yes or no.",
        'Someone tagged this picture as "{label}" ({definition}). Is that right? Answer yes or no.',
        'Is "{label}" the correct label for this image? Here "{label}" means {definition}. Answer yes or no.',
    ),
    "tag_most_visible": (  # the candidate question before it asked for every label present
        "Which of these objects or concepts can be seen in this image?\n{labels}\n"
        'Answer with the one that is most clearly visible, or "none of these".',
        'Which of these can you see in the picture?\n{labels}\nGive the most visible one, or "none of these".',
        'Look at the image. Which of these appears most clearly?\n{labels}\nOr answer "none of these".',
    ),
    "label_wrong": (
        'An annotator labelled this image "{label}". In this task, "{label}" means: {definition}.\n'
        "Look for a mistake. Is that label wrong? Answer yes or no.",
        'This image was labelled "{label}" ({definition}). Is the label a mistake? Answer yes or no.',
    ),
    "x_or_y": (
        "Is this a {a} or a {b}? Answer with one of the two.",
        "Which is it: {a} or {b}? Answer with one word.",
    ),
    "fine_labelled": (  # the fine-name question before it left the label out
        "This image shows a {label}. Name it as precisely as you can, then its general category in parentheses, "
        'for example "Dachshund (Dog)". Answer with the name only.',
        "This is a {label}. Describe it precisely (texture, colour, shape), then its category in parentheses.",
        "Give a precise name for this {label}, then its general category in parentheses. Name only.",
    ),
}
REGION_KINDS_ASKED = {"box_label", "box_context_label", "critic", "critic_correct", "label_wrong", "x_or_y",
                      "box_fine_label", "fine_labelled"}  # fmt: skip  # asked about one region
LETTERED = {"box_lettered": "box_label", "image_lettered": "image_choice"}  # a label question, asked with letters
MIX = {  # share of each question kind in training
    "box_label": 0.26, "box_context_label": 0.04, "critic": 0.12, "label_wrong": 0.03, "x_or_y": 0.04,
    "fine_labelled": 0.03, "box_fine_label": 0.08, "image_choice": 0.06, "tag_most_visible": 0.02,
    "tag_candidates": 0.12, "tag_confirm": 0.14, "attribute": 0.06, "box_lettered": 0.04, "image_lettered": 0.02,
}  # fmt: skip  # no "critic_correct": its opening is the critic's, its answer the opposite, and both went unlearnt


@dataclass(frozen=True)
class Example:
    image: Image.Image
    prompt: str
    answer: str
    text_first: bool = False  # the prompt's text before the image in the user turn


def phrasings(kind: str, prompts: PromptBook | None = None, *, held_out: bool = False) -> tuple[str, ...]:
    """The templates of a kind: the shipped prompt first (when it has one), then paraphrases. Training uses all
    but the last paraphrase; ``held_out`` gives only that last one."""
    book = prompts or PromptBook(PACKAGE_PROMPTS)
    own = PARAPHRASES.get(kind) or EXTRA[kind]
    if held_out:
        return own[-1:]
    shipped = (book.template(kind),) if kind in PARAPHRASES else ()
    return shipped + own[:-1]


def _definition(rng: np.random.Generator, label: str) -> str:
    # The backend says "the usual meaning" when neither concepts.json nor a hint defines a label.
    return DEFINITIONS[label] if rng.random() < 0.7 else f"the usual meaning of “{label}”"


def _shuffled(rng: np.random.Generator, labels: list[str]) -> list[str]:
    return [labels[i] for i in rng.permutation(len(labels))]


def _label_list(rng: np.random.Generator, truth: str) -> list[str]:
    """The true label among 1-7 others, in random order (configs list labels in any order and number)."""
    others = [c for c in CLASSES if c != truth]
    count = int(rng.integers(1, len(others) + 1))
    chosen = list(rng.choice(others, size=count, replace=False))
    if CONFUSABLE[truth] not in chosen and rng.random() < 0.7:
        chosen[0] = CONFUSABLE[truth]
    return _shuffled(rng, [truth, *chosen])


def _wrong_label(rng: np.random.Generator, truth: str) -> str:
    return CONFUSABLE[truth] if rng.random() < 0.6 else str(rng.choice([c for c in CLASSES if c != truth]))


def crop_of(image: Image.Image, scene: Scene, shape: Shape) -> Image.Image:
    return region_crop(image, scene, shape)


REGION_STYLES = ("box", "polygons", "ellipses", "keypoints", "masks")
REGION_STYLE_SHARES = (0.6, 0.12, 0.08, 0.1, 0.1)  # how a person drew the region a crop question is about


def region_box(scene: Scene, shape: Shape, style: str = "box") -> Box:
    """The box the backend reads from ``shape`` drawn as ``style``: an upright box, or a polygon's, ellipse's,
    keypoint's or mask's extent (a rotated shape stays rotated in it), by the backend's own region code."""
    if style == "box":
        return Box(shape.id, "label", "image", shape.x, shape.y, shape.width, shape.height, shape.rotation)
    tag, value = REGION_KINDS[style]
    region = {"id": shape.id, "type": tag.lower(), "original_width": scene.width, "original_height": scene.height,
              "value": value(shape, scene.width, scene.height)}  # fmt: skip
    return box_from_region(region)


def region_crop(image: Image.Image, scene: Scene, shape: Shape, style: str = "box") -> Image.Image:
    """The crop the backend makes of ``shape`` drawn as ``style``."""
    return crop_box(image, region_box(scene, shape, style), 0.0, BOX_MIN_SIDE)


def in_context(image: Image.Image, scene: Scene, shape: Shape, style: str = "box") -> Image.Image:
    """The whole image with ``shape``'s region drawn on it, as the backend shows it with mllmView="context"."""
    return outline_box(image, region_box(scene, shape, style))


def _group(rng: np.random.Generator, scene: Scene) -> list[str]:
    if rng.random() < 0.7:
        return _shuffled(rng, list(GROUPS[str(rng.choice(list(GROUPS)))]))
    present = list(scene.tags)
    size = int(rng.integers(2, 6))
    picks = set(rng.choice(CLASSES, size=size, replace=False))
    if present and rng.random() < 0.5:
        picks.add(str(rng.choice(present)))
    return _shuffled(rng, sorted(picks))


def _fill(template: str, **fields: str) -> str:
    return template.format(**fields)


def example(
    kind: str, rng: np.random.Generator, scene: Scene, image: Image.Image, templates: tuple[str, ...]
) -> Example:
    """One example of ``kind`` about ``scene`` with a template drawn from ``templates``."""
    if kind in LETTERED:  # the same question with lettered options (mllmMode="multiple-choice"): answer a letter
        asked = example(LETTERED[kind], rng, scene, image, templates)
        listed = [line[2:] for line in asked.prompt.splitlines() if line.startswith("- ")]
        return Example(asked.image, lettered_question(asked.prompt, listed), LETTERS[listed.index(asked.answer)],
                       asked.text_first)  # fmt: skip
    template = str(rng.choice(templates))
    text_first = bool(rng.random() < 0.15)
    shape = scene.shapes[int(rng.integers(len(scene.shapes)))]
    if kind in REGION_KINDS_ASKED:
        style = REGION_STYLES[int(rng.choice(len(REGION_STYLES), p=REGION_STYLE_SHARES))]
        truth = shape.cls
        if kind == "box_context_label":
            shown = in_context(image, scene, shape, style)
            return Example(shown, _fill(template, labels=format_labels(_label_list(rng, truth))), truth, text_first)
        crop = region_crop(image, scene, shape, style)
        if kind == "box_label":
            return Example(crop, _fill(template, labels=format_labels(_label_list(rng, truth))), truth, text_first)
        if kind in {"critic", "critic_correct", "label_wrong"}:
            right = rng.random() < 0.5
            label = truth if right else _wrong_label(rng, truth)
            answer = (YES if right else NO) if kind == "critic_correct" else (NO if right else YES)
            fields = {"label": label, "definition": _definition(rng, label)}
            if kind == "critic":  # the runner-up: often the truth when the label is wrong
                alternative = _wrong_label(rng, truth) if right or rng.random() < 0.3 else truth
                alternative = alternative if alternative != label else _wrong_label(rng, label)
                if rng.random() < 0.05:  # a label set of one label has no runner-up
                    alternative = NO_ALTERNATIVE
                definition = NO_ALTERNATIVE_MEANS if alternative == NO_ALTERNATIVE else _definition(rng, alternative)
                fields.update(alternative=alternative, alternative_definition=definition)
            return Example(crop, _fill(template, **fields), answer, text_first)
        if kind == "x_or_y":
            a, b = _shuffled(rng, [truth, _wrong_label(rng, truth)])
            return Example(crop, _fill(template, a=a, b=b), truth, text_first)
        named = truth if rng.random() < 0.8 else _wrong_label(rng, truth)  # the name must not echo a wrong label
        prompt = _fill(template, label=named) if kind == "fine_labelled" else template
        return Example(crop, prompt, f"{shape.fine_name} ({truth})", text_first)
    if kind == "image_choice":
        return Example(image, _fill(template, labels=format_labels(_label_list(rng, scene.largest))), scene.largest,
                       text_first)  # fmt: skip
    if kind in {"tag_candidates", "tag_most_visible"}:
        group = _group(rng, scene)
        present = [label for label in group if label in scene.tags]
        if kind == "tag_most_visible":  # "the most clearly visible": the largest shape of the group
            shown = [s for s in scene.shapes if s.cls in present]
            answer = max(shown, key=lambda s: s.width * s.height).cls if shown else NONE_OF_THESE
        else:
            answer = ", ".join(present) if present else NONE_OF_THESE
        return Example(image, _fill(template, labels=format_labels(group)), answer, text_first)
    if kind == "attribute":
        name = str(rng.choice(list(ATTRIBUTES)))
        definition = ATTRIBUTES[name] if rng.random() < 0.8 else f"the usual meaning of “{name}”"
        answer = YES if scene.attributes[name] else NO
        return Example(image, _fill(template, attribute=name, definition=definition), answer, text_first)
    if kind == "tag_confirm":
        label = str(rng.choice(scene.tags)) if rng.random() < 0.5 else str(rng.choice(CLASSES))
        if rng.random() < 0.3:  # the hard negatives: the partner of a present shape
            label = CONFUSABLE[str(rng.choice(scene.tags))]
        answer = YES if label in scene.tags else NO
        return Example(image, _fill(template, label=label, definition=_definition(rng, label)), answer, text_first)
    raise ValueError(f"unknown question kind {kind!r}")


def examples(
    rng: np.random.Generator, scenes: list[tuple[Scene, Image.Image]], count: int, *, held_out: bool = False,
    kinds: dict[str, float] | None = None, prompts: PromptBook | None = None,
) -> list[Example]:  # fmt: skip
    """``count`` examples drawn by the mix (or ``kinds``) over ``scenes``."""
    mix = kinds or MIX
    names, weights = list(mix), np.array(list(mix.values()))
    book = prompts or PromptBook(PACKAGE_PROMPTS)
    templates = {k: phrasings(LETTERED.get(k, k), book, held_out=held_out) for k in names}
    picked: list[Example] = []
    for _ in range(count):
        kind = names[int(rng.choice(len(names), p=weights / weights.sum()))]
        scene, image = scenes[int(rng.integers(len(scenes)))]
        picked.append(example(kind, rng, scene, image, templates[kind]))
    return picked
