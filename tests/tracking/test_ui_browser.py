"""What a user sees in the MLflow UI, checked in a real browser (Debian's chromium, headless,
driven by Playwright) against `mlflow ui` on a free 127.0.0.1 port that the test starts and
stops: a run's sample images with their step slider, the Chart view comparing a sweep's
children on one frame, the sweep's summary table and the Models tab.

Slow, and skipped without chromium or Playwright. The screenshots land in $CITYSEG_UI_SHOTS
(default: the test's temporary folder), to be looked at:

    CITYSEG_UI_SHOTS=runs/ui-shots .venv/bin/python -m pytest -m slow \
        tests/tracking/test_ui_browser.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cityseg.config import load_experiment
from cityseg.sweep import run_sweep
from cityseg.tracking import tracking_uri
from cityseg.train import runner
from tests.conftest import QUICKSTART, mlflow_process, tiny_overrides, unavailable
from tests.sweep.tiny import write_sweep

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SIZE = ["data.source_size=[128,256]", "data.image_size=[64,128]"]  # large enough to read


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    """A quickstart run (2 epochs, a logged model) and a 2-point sweep in one store, served."""
    if CHROMIUM is None:
        unavailable("no chromium", "apt-get install chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("no Playwright", "pip install -e '.[dev]'")
    tmp = tmp_path_factory.mktemp("ui")
    runner.run(load_experiment(QUICKSTART, [*tiny_overrides(tmp), *SIZE]))
    sweep = write_sweep(tmp, {"loss.pos_weight": [1, 8]})
    run_sweep(sweep, report=lambda line: None)
    client = MlflowClient(tracking_uri=tracking_uri(tmp / "runs"))
    shots = Path(os.environ.get("CITYSEG_UI_SHOTS", tmp / "shots"))
    shots.mkdir(parents=True, exist_ok=True)
    with mlflow_process("ui", "--backend-store-uri", tracking_uri(tmp / "runs"), ready="/") as url:
        yield url, client, shots


@pytest.fixture(scope="module")
def browser(ui):
    from playwright.sync_api import sync_playwright

    url, client, shots = ui
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        # tall, so that every chart of a section renders (the UI draws charts in view only)
        context = browser.new_context(viewport={"width": 1500, "height": 2600})
        context.set_default_timeout(LOAD_MS)
        page = context.new_page()
        page.goto(f"{url}/#/experiments/{_runs(client)[0]}/runs")
        # a new browser starts on the GenAI side: a user picks Model training (the choice is
        # kept) and closes the assistant panel
        page.get_by_text("Model training").first.wait_for(timeout=LOAD_MS)
        page.get_by_text("Model training").first.click()
        page.locator("[aria-label*='Close' i]").first.click()
        page.close()
        yield context
        browser.close()


LOAD_MS = 120_000  # the UI on a loaded 2-core machine
# an element's pixels hidden above, shown, and its height, as the boxes that clip it leave it
VISIBLE = """(e) => {
    const r = e.getBoundingClientRect();
    let top = r.top, bottom = r.bottom;
    for (let p = e.parentElement; p; p = p.parentElement) {
        const style = getComputedStyle(p);
        if (style.overflowY !== "visible" || style.overflowX !== "visible") {
            const b = p.getBoundingClientRect();
            top = Math.max(top, b.top);
            bottom = Math.min(bottom, b.bottom);
        }
    }
    return [top - r.top, Math.max(0, bottom - top), r.height];
}"""


def _open(context, url: str, *, wait_for: str):
    page = context.new_page()
    page.goto(url)
    page.get_by_text(wait_for, exact=True).first.wait_for(timeout=LOAD_MS)
    page.wait_for_timeout(2000)
    return page


def _only_section(page, name: str) -> None:
    """Fold every chart section but `name` (which is unfolded)."""
    headers = page.locator(".du-bois-light-collapse-header")
    for i in range(headers.count()):
        header = headers.nth(i)
        title = header.locator("[data-testid=experiment-view-compare-runs-section-header] div")
        wanted = title.first.inner_text().split()[0] == name
        if (header.get_attribute("aria-expanded") == "true") != wanted:
            header.click()
            page.wait_for_timeout(300)


def _sections(page) -> list[str]:
    """The chart sections' names, top to bottom."""
    titles = page.locator(".du-bois-light-collapse-header "
                          "[data-testid=experiment-view-compare-runs-section-header] div")
    return [t.split()[0] for t in titles.all_inner_texts() if t.strip()]


def _card(page, key: str):
    return page.get_by_text(key, exact=True).first.locator("xpath=ancestor::div[.//button][2]")


def _full_screen(page, key: str):
    """The image card of `key` opened full screen (its expand icon): the frame large."""
    card = _card(page, key)
    card.hover()
    card.locator("button").first.click()
    dialog = page.get_by_role("dialog")
    dialog.locator("img").first.wait_for(timeout=LOAD_MS)
    page.wait_for_timeout(3000)  # every run's image
    return dialog


def _runs(client: MlflowClient):
    experiment = client.get_experiment_by_name("quickstart")
    found = client.search_runs([experiment.experiment_id])
    single = next(r for r in found if "sweep_role" not in r.data.tags)
    parent = next(r for r in found if r.data.tags.get("sweep_role") == "parent")
    children = [r for r in found if r.data.tags.get("sweep_role") == "child"]
    return experiment.experiment_id, single, parent, children


def test_a_runs_sample_images_have_a_step_slider(ui, browser):
    url, client, shots = ui
    eid, single, _, _ = _runs(client)
    page = _open(browser, f"{url}/#/experiments/{eid}/runs/{single.info.run_id}/model-metrics",
                 wait_for="Add section")
    # per-epoch curves first; the best epoch's one-point charts after them
    sections = _sections(page)
    assert sections[0] in ("throughput", "train", "val"), sections
    assert sections.index("val") < sections.index("val/best"), sections
    _only_section(page, "val")
    page.get_by_text("val/sample_1", exact=True).first.wait_for(timeout=LOAD_MS)
    page.wait_for_timeout(3000)
    page.screenshot(path=str(shots / "run_images.png"), full_page=True)
    # the card opens on step 0, the last epoch's picture, inside the card's visible area: its
    # header is the run's few params. MLflow centres a picture in a square box as wide as the
    # card, whose middle is where the card cuts it: the upper half (the Prediction and Error
    # row of the card) shows
    image = _card(page, "val/sample_0").locator("img").first
    image.wait_for(timeout=LOAD_MS)
    top, shown, height = image.evaluate(VISIBLE)
    assert height >= 150 and top == 0 and shown >= 0.45 * height, (top, shown, height)
    dialog = _full_screen(page, "val/sample_0")
    slider = dialog.get_by_role("slider")
    assert slider.count() == 1
    # step 0 (the last epoch again, where the card opens), 1 and 2
    assert slider.get_attribute("aria-valuemin") == "0"
    assert slider.get_attribute("aria-valuemax") == "2"
    page.screenshot(path=str(shots / "run_image_full_screen.png"))
    page.close()


def test_the_chart_view_compares_the_sweep_childrens_predictions_of_one_frame(ui, browser):
    url, client, shots = ui
    eid, _, parent, children = _runs(client)
    page = _open(browser, f"{url}/#/experiments/{eid}/runs?compareRunsMode=CHART",
                 wait_for="Add section")
    # the children are folded under their parent in the runs list: unfold them
    row = page.get_by_text(parent.info.run_name, exact=True).first.locator(
        "xpath=ancestor::div[@role='row'][1]")
    row.locator("button").first.click()
    for child in children:
        page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=LOAD_MS)
    _only_section(page, "val")
    dialog = _full_screen(page, "val/sample_0")
    page.screenshot(path=str(shots / "chart_view_children.png"))
    shown = dialog.inner_text()
    for child in children:  # each child's prediction of the same frame, under its name
        assert child.info.run_name in shown, shown[:300]
    assert dialog.locator("img").count() >= len(children)
    page.close()


def test_the_sweep_summary_table_shows_every_column(ui, browser):
    url, client, shots = ui
    eid, _, parent, _ = _runs(client)
    page = _open(browser, f"{url}/#/experiments/{eid}/runs/{parent.info.run_id}/artifacts",
                 wait_for="summary.json")
    page.get_by_text("summary.json", exact=True).first.click()
    page.get_by_text("loss/pos_weight", exact=True).first.wait_for(timeout=LOAD_MS)
    page.wait_for_timeout(2000)
    page.screenshot(path=str(shots / "summary_table.png"), full_page=True)
    # the UI's table (design-system rows and cells); it shows the first columns, the others
    # are a click on its column settings away
    header = [h.strip() for h in page.get_by_role("columnheader").all_inner_texts()]
    rows = page.get_by_role("row").filter(has=page.get_by_role("cell"))
    assert "loss/pos_weight" in header and rows.count() == 2, header
    for i in range(rows.count()):
        cells = [c.strip() for c in rows.nth(i).get_by_role("cell").all_inner_texts()]
        assert cells[header.index("loss/pos_weight")] in ("1", "8"), cells  # not empty
        assert all(cells[:len(header)]), (header, cells)
    page.close()


def test_the_models_tab_names_each_model_and_its_dataset(ui, browser):
    url, client, shots = ui
    eid, single, _, _ = _runs(client)
    page = _open(browser, f"{url}/#/experiments/{eid}/models", wait_for="quickstart-unet")
    page.screenshot(path=str(shots / "models_tab.png"), full_page=True)
    page.get_by_text("quickstart-unet", exact=True).first.click()
    page.get_by_text("val/best/dice", exact=True).first.wait_for(timeout=LOAD_MS)
    page.screenshot(path=str(shots / "model_page.png"), full_page=True)
    validation = {i.tags[0].value: i.dataset for i in single.inputs.dataset_inputs}["validation"]
    text = page.inner_text("body")
    assert f"{validation.name} (#{validation.digest})" in text  # the Dataset of its metrics
    assert "system/" not in text
    page.close()
