"""A region's label asked about its crop or, with mllmView="context", about the whole image with its box drawn."""

from __future__ import annotations

import base64

import numpy as np
import pytest
from PIL import Image

from backend import Annotator
from backend.labelstudio.config import UnsupportedConfig, parse_label_config
from backend.labelstudio.regions import OUTLINE_COLOUR, Box, outline_box, pixel_corners
from tests.conftest import png_bytes
from tests.test_label_modes import Recording


def _red(image: Image.Image) -> np.ndarray:
    return np.all(np.asarray(image) == OUTLINE_COLOUR, axis=-1)


@pytest.mark.parametrize("rotation", [0.0, 30.0])
def test_the_outline_runs_just_outside_the_box_and_leaves_the_image_as_it_was(rotation):
    image = Image.new("RGB", (200, 100), (255, 255, 255))
    box = Box("r", "label", "image", 40, 30, 20, 30, rotation)
    outlined = outline_box(image, box)
    assert np.asarray(image).min() == 255  # the caller's image is not drawn on
    red = _red(outlined)
    corners = np.array(pixel_corners(box, 200, 100))
    centre = corners.mean(axis=0)
    assert not red[round(centre[1]), round(centre[0])]  # the object inside stays visible
    assert 0.01 < red.mean() < 0.1
    ys, xs = np.nonzero(red)  # the line surrounds the box: it reaches past each of its extremes
    assert xs.min() < corners[:, 0].min() and xs.max() > corners[:, 0].max() - 1
    assert ys.min() < corners[:, 1].min() and ys.max() > corners[:, 1].max() - 1


def test_a_controls_mllm_view_is_read_and_checked():
    spec = parse_label_config(
        '<View><Image name="i" value="$i"/><RectangleLabels name="b" toName="i" '
        'mllmView="context"><Label value="a"/><Label value="c"/></RectangleLabels></View>'
    )
    assert spec.region_labels[0].view == "context"
    with pytest.raises(UnsupportedConfig, match='mllmView="scene"; set it to crop, context'):
        parse_label_config('<View><Image name="i" value="$i"/><RectangleLabels name="b" toName="i" '
                           'mllmView="scene"><Label value="a"/></RectangleLabels></View>')  # fmt: skip


CONFIG = """<View><Image name="image" value="$image"/>
<RectangleLabels name="label" toName="image"{view}><Label value="Cat"/><Label value="Dog"/></RectangleLabels>
</View>"""


def _task() -> dict:
    rng = np.random.default_rng(3)
    image = Image.fromarray(rng.integers(0, 255, (60, 90, 3), dtype=np.uint8))
    url = "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode()
    box = {
        "id": "b1",
        "from_name": "label",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {"x": 10, "y": 20, "width": 30, "height": 40, "rotation": 0, "rectanglelabels": ["Cat"]},
    }
    return {"id": 1, "data": {"image": url}, "annotations": [{"id": 1, "result": [box]}]}


class Seeing(Recording):
    """Records each question's prompt and the size of the images it was asked about."""

    def score_options(self, images, prompt, options):
        self.asked.append((prompt, tuple(image.size for image in images)))
        return self.inner.score_options(images, prompt, options)


@pytest.mark.parametrize("view, setting", [(' mllmView="context"', "crop"), ("", "context"), ("", "crop")])
def test_the_label_question_shows_the_whole_image_outlined_when_the_control_or_setting_says_context(
    llava_engine, view, setting
):
    engine = Seeing(llava_engine)
    annotator = Annotator(engine=engine, settings={"REGION_VIEW": setting, "CRITIC": "on"})
    [prediction] = annotator.predict([_task()], CONFIG.format(view=view))
    [result] = prediction["result"]
    assert result["id"] == "b1" and result["value"]["rectanglelabels"][0] in {"Cat", "Dog"}
    label_question, critic_question = engine.asked
    in_context = bool(view) or setting == "context"  # the control's attribute wins over the setting
    assert ("red box" in label_question[0]) == in_context
    assert (label_question[1] == ((90, 60),)) == in_context  # the whole image, not the box's 32x32 crop
    assert "wrong" in critic_question[0] and critic_question[1] != ((90, 60),)  # the critic judges the crop
