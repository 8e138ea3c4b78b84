"""A person in a real browser (Debian's Chromium, driven by Playwright) using Label Studio 1.23.2 with this backend.

Screenshots of each step go to ``test-artifacts/browser/``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import requests

from backend.devtools.devstack import ADMIN_EMAIL, Stack
from backend.labelstudio.client import REVIEW_VIEW_TITLE
from backend.shapes.world import write_world

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SHOTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "browser"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def page(stack: Stack):
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is missing: apt-get install chromium (.ci/run does)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{stack.label_studio_url}/user/login")
        page.fill("input[name=email]", ADMIN_EMAIL)
        page.fill("input[name=password]", stack.password)
        page.click("button[type=submit]")
        page.wait_for_load_state("networkidle")
        yield page
        browser.close()


def connect_in_settings(page, stack: Stack, project: int) -> None:
    """Settings → Model → Connect Model, with interactive pre-annotations on, as a person fills the dialog."""
    page.goto(f"{stack.label_studio_url}/projects/{project}/settings/ml")
    page.locator("button:has-text('Connect Model')").first.click()
    page.fill("input[name=title]", "MLLM annotator")
    page.fill("input[name=url]", stack.backend_url)
    page.locator("label:has-text('Interactive preannotations')").click()
    page.locator("button:has-text('Validate and Save')").click()


def test_the_connect_dialog_shows_why_the_backend_refused_the_project(page, client, stack):
    audio = '<View><Audio name="a" value="$audio"/><Choices name="c" toName="a"><Choice value="x"/></Choices></View>'
    project = int(client.projects.create(title="audio only", label_config=audio).id)
    connect_in_settings(page, stack, project)
    page.get_by_text("this backend labels images only (found Audio").first.wait_for()
    page.screenshot(path=SHOTS / "1-connect-refused.png")
    assert list(client.ml.list(project=project)) == []


def free_corner(result: list[dict]) -> tuple[float, float, float, float]:
    """A 17%-square corner of the image that no predicted box touches (x0, y0, x1, y1 in percent).

    The top-left corner comes last: in Label Studio 1.23.2's editor a drag that starts there draws no region
    (measured in this test once the most suspicious task had only that corner free)."""
    from backend.labelstudio.regions import box_from_region, pixel_corners

    extents = []  # each box's extent in percent, rotated boxes by their corners (their x, y is one corner only)
    for region in result:
        corners = pixel_corners(box_from_region(region), 100, 100)
        xs, ys = [c[0] for c in corners], [c[1] for c in corners]
        extents.append((min(xs), min(ys), max(xs), max(ys)))
    # the bottom stays above 85 %: the canvas element reaches below the image, and a drag there selects the
    # label bar's text instead of drawing (seen once the most suspicious task had only a bottom corner free)
    for x, y in ((78, 68), (78, 5), (5, 68), (40, 5), (5, 40), (5, 5)):
        if all(left > x + 17 or right < x or top > y + 17 or bottom < y for left, top, right, bottom in extents):
            return x, y, x + 17, y + 17
    raise AssertionError("no free corner on this task")


def test_connect_retrieve_review_and_draw_with_auto_annotation(page, client, stack):
    world = write_world(stack.workdir / "browser-world", tasks=6, seed=4200)
    config_path, tasks_path = world.projects["boxes"]
    config = config_path.read_text().replace("<RectangleLabels ", '<RectangleLabels smart="true" ')
    project = int(client.projects.create(title="in the browser", label_config=config).id)
    tasks = json.loads(tasks_path.read_text())
    for task in tasks:  # the person drew the boxes; the model labels them
        boxes = [r for r in task["annotations"][0]["result"] if r["type"] == "rectanglelabels"]
        task["annotations"] = [{"result": [{**r, "value": {**r["value"], "rectanglelabels": []}} for r in boxes]}]
    requests.post(f"{stack.label_studio_url}/api/projects/{project}/import", json=tasks, timeout=60,
                  headers={"Authorization": f"Token {stack.token}"}).raise_for_status()  # fmt: skip

    connect_in_settings(page, stack, project)
    page.get_by_text("MLLM annotator").first.wait_for()
    page.screenshot(path=SHOTS / "2-connected.png")

    page.goto(f"{stack.label_studio_url}/projects/{project}/data")
    page.get_by_text(REVIEW_VIEW_TITLE[:15]).first.wait_for()  # the tab the backend made on connect
    page.locator("input[type=checkbox]").first.check()
    page.locator("button[aria-label='Tasks Actions']").click()
    page.get_by_text("Retrieve Predictions").click()
    page.locator("button:has-text('OK')").click()
    page.get_by_text(f"Predictions: {len(tasks)}").wait_for()

    version = requests.get(f"{stack.backend_url}/versions", timeout=5).json()["model_version"]
    _wait(lambda: client.projects.get(project).model_version == version)
    for task in client.tasks.list(project=project):  # as in `make demo`: tasks open on the model's labels
        for annotation in client.annotations.list(id=task.id):
            client.annotations.delete(id=annotation.id)
    scores = {
        int(t.id): float(t.predictions[0]["score"] if isinstance(t.predictions[0], dict) else t.predictions[0].score)
        for t in client.tasks.list(project=project, fields="all")
    }
    page.reload()
    rows = page.locator("[class*=row-wrapper]")
    rows.first.wait_for()
    first = int(re.match(r"\s*(\d+)", rows.first.inner_text()).group(1))
    assert first == min(scores, key=scores.get)  # the most suspicious task first
    page.screenshot(path=SHOTS / "3-most-suspicious-first.png")

    rows.first.click()
    [prediction] = [t.predictions[0] for t in client.tasks.list(project=project, fields="all") if t.id == first]
    prediction = prediction if isinstance(prediction, dict) else prediction.dict()
    labels = {r["value"]["rectanglelabels"][0] for r in prediction["result"]}
    regions = page.locator(".lsf-outliner-item, [class*=outliner] [class*=item]")
    for label in labels:
        page.locator("[class*=outliner]").get_by_text(label, exact=True).first.wait_for()
    page.screenshot(path=SHOTS / "4-task-opens-on-the-models-labels.png")
    before = regions.count()

    answers: list[dict] = []
    page.on("response", lambda r: answers.append(r.json()) if "interactive-annotating" in r.url else None)
    page.locator(":text('Auto-Annotation')").first.click()
    page.locator("button.lsf-tool_smart").first.click()  # "Auto-Detect", shown while Auto-Annotation is on
    canvas = page.locator("canvas").first.bounding_box()
    x0, y0, x1, y1 = (v / 100 for v in free_corner(prediction["result"]))
    at = lambda fx, fy: (canvas["x"] + fx * canvas["width"], canvas["y"] + fy * canvas["height"])  # noqa: E731
    page.mouse.click(*at(x0 + 0.01, y0 + 0.01))
    page.keyboard.press("1")  # the first label, as a person picks one before drawing
    page.mouse.move(*at(x0, y0))
    page.mouse.down()
    page.mouse.move(*at((x0 + x1) / 2, (y0 + y1) / 2), steps=8)
    page.mouse.move(*at(x1, y1), steps=8)
    page.mouse.up()
    page.get_by_text(re.compile(r"\d+ suggestions?$")).first.wait_for()  # with accept and reject buttons
    page.screenshot(path=SHOTS / "5-auto-annotation-suggestion.png")
    [answer] = answers
    [suggested] = [r for r in answer["data"]["result"]
                   if abs(r["value"]["x"] - 100 * x0) < 2 and abs(r["value"]["y"] - 100 * y0) < 2]  # fmt: skip
    assert suggested["value"]["rectanglelabels"][0] in {"circle", "ellipse", "square", "rectangle", "triangle",
                                                        "diamond", "star", "cross"}  # fmt: skip
    assert 0 < suggested["score"] < 1, answer
    assert regions.count() > before


def _wait(check, timeout: float = 60.0) -> None:
    import time

    ends = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < ends, "timed out"
        time.sleep(1)
