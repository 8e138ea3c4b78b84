from __future__ import annotations

from pathlib import Path

import pytest

from backend.labelstudio.config import UnsupportedConfig, parse_label_config
from backend.labelstudio.protocol import TaskError

CONFIGS = Path(__file__).resolve().parents[1] / "label_config"


def test_rectangle_labels_and_whole_image_choices():
    spec = parse_label_config("""<View>
      <Image name="image" value="$image"/>
      <RectangleLabels name="label" toName="image"><Label value="Cat"/><Label value="Dog, big"/></RectangleLabels>
      <Choices name="tags" toName="image" choice="multiple"><Choice value="Indoor"/><Choice value="猫"/></Choices>
      <Choices name="scene" toName="image"><Choice value="Day"/><Choice value="Night"/></Choices>
    </View>""")
    [box] = spec.region_labels
    assert (box.control, box.labels, box.result_type, box.region_controls) == (
        "label",
        ("Cat", "Dog, big"),
        "rectanglelabels",
        ("label",),
    )
    assert box.image.url({"data": {"image": "/data/upload/x.png"}}) == "/data/upload/x.png"
    assert [(c.control, c.multiple, c.labels) for c in spec.image_choices] == [
        ("tags", True, ("Indoor", "猫")),
        ("scene", False, ("Day", "Night")),
    ]


def test_rectangle_with_per_region_choices_labels_the_rectangles():
    spec = parse_label_config("""<View>
      <Image name="img" value="$url"/>
      <Rectangle name="box" toName="img"/>
      <Choices name="species" toName="img" perRegion="true"><Choice value="A"/><Choice value="B"/></Choices>
    </View>""")
    [target] = spec.region_labels
    assert (target.control, target.result_type, target.region_controls) == ("species", "choices", ("box",))
    assert spec.image_choices == ()


@pytest.mark.parametrize(
    "config, message",
    [
        ("", "empty"),
        ("<View><bad", "not valid XML"),
        ('<View><Text name="t" value="$t"/></View>', "no <Image>"),
        ('<View><Audio name="a" value="$a"/><TextArea name="t" toName="a"/></View>', r"found <Audio>, <TextArea>"),
        ('<View><Image name="i" value="$i"/><Choices name="c" toName="i"/></View>', "nothing to annotate"),
        (
            '<View><Image name="i" value="$i"/><Choices name="c" toName="x"><Choice value="a"/></Choices></View>',
            "not an object",
        ),
    ],
)
def test_unservable_configs_say_what_is_supported(config, message):
    with pytest.raises(UnsupportedConfig, match=message) as error:
        parse_label_config(config)
    assert "RectangleLabels" in str(error.value) or "toName" in str(error.value)


def test_missing_image_field_in_a_task_is_named():
    spec = parse_label_config(
        '<View><Image name="i" value="$photo"/><Choices name="c" toName="i"><Choice value="a"/></Choices></View>'
    )
    with pytest.raises(TaskError, match="photo"):
        spec.image_choices[0].image.url({"data": {"image": "x"}})


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.xml")), ids=lambda p: p.name)
def test_shipped_configs_are_served(path):
    spec = parse_label_config(path.read_text())
    assert spec.region_labels or spec.image_choices
