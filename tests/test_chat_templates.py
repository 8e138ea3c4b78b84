"""Answers as the real chat templates render them (tests/data/chat_templates: 16 families, sources named).

Each family gets a small tokenizer with its real special tokens (BOS added on tokenizing where the real one adds
it), and its checkpoint's template. An option's tokens must be what the template writes after the generation
prompt, through its own end of turn and nothing after; the prompt carries one BOS, never two.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import processors

from backend.devtools.tiny import _train_tokenizer
from backend.models.chat import ChatFormat, user_turn

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"
FAMILIES = json.loads((TEMPLATES / "families.json").read_text())
OPTIONS = ["Dog", "traffic light", "Dachshund (Dog)", "猫", "a"]


def family_tokenizer(spec: dict):
    pad = spec["specials"][0]
    tokenizer = _train_tokenizer(spec["specials"], eos=spec["eos"], pad=pad)
    if spec.get("bos"):
        tokenizer.bos_token = spec["bos"]
    if spec.get("adds_bos"):
        bos = spec["bos"]
        tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
        )
    tokenizer.chat_template = (TEMPLATES / spec["template"]).read_text()
    return tokenizer


def family_chat(name: str) -> tuple[ChatFormat, object]:
    tokenizer = family_tokenizer(FAMILIES[name])
    processor = SimpleNamespace(apply_chat_template=tokenizer.apply_chat_template, image_token=None)
    return ChatFormat(processor, tokenizer), tokenizer


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_an_option_is_what_the_template_writes_through_its_end_of_turn(name):
    spec = FAMILIES[name]
    chat, tokenizer = family_chat(name)
    answer = chat.answer("Dog")
    assert answer.ends_with == spec["ends_with"], answer
    assert answer.text == spec["answer"].removesuffix(spec["last"] if spec["ends_with"] == "end of sequence" else "")
    assert tokenizer.decode(list(answer.ids)) == spec["answer"]
    assert answer.ids[-1] == tokenizer.convert_tokens_to_ids(spec["last"])
    assert answer.ids.count(answer.ids[-1]) == 1, "nothing after the end of turn"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_option_tokens_agree_with_the_templates_own_rendering_of_a_full_answer(name):
    chat, _ = family_chat(name)
    prompt = chat.prompt("?")
    for option in OPTIONS:
        answer = chat.answer(option)
        parts = [{"type": "text", "text": option}]
        printed = str(parts) in chat.render([*user_turn("?"), {"role": "assistant", "content": parts}])
        content = option if printed else parts
        turns = [*user_turn("?"), {"role": "assistant", "content": content}]  # GLM-4V prints a list: give it text
        if answer.ends_with == "next turn":
            turns.append({"role": "user", "content": [{"type": "text", "text": "?"}]})
        rendered = chat.render(turns)
        if rendered.startswith(prompt):  # the answer turn continues the generation prompt: the same text
            assert rendered.startswith(prompt + answer.text), (option, rendered)
        else:  # LLaVA-OneVision's turn opens differently: the same answer and end of turn, after the prompt
            assert answer.text in rendered, (option, rendered)
        whole = chat.ids(prompt + answer.text)  # the conversation tokenized once
        spoken = list(answer.ids[:-1]) if answer.ends_with == "end of sequence" else list(answer.ids)
        assert whole == chat.ids(prompt) + spoken, option


@pytest.mark.parametrize("name", sorted(name for name, spec in FAMILIES.items() if spec.get("bos")))
def test_the_prompt_carries_one_bos(name):
    chat, tokenizer = family_chat(name)
    ids = chat.ids(chat.prompt("Which label?"))
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1, ids[:4]


def test_a_template_that_writes_its_own_bos_is_tokenized_without_another():
    written, added = family_chat("gemma3")[0], family_chat("llava-next")[0]
    assert not written.add_special_tokens and added.add_special_tokens


def test_the_families_cover_every_way_a_turn_ends():
    assert {spec["ends_with"] for spec in FAMILIES.values()} == {"template", "next turn", "end of sequence"}
