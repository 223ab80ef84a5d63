"""The demo page in a real headless Chromium (Debian's chromium + chromedriver, driven by selenium):
upload a real photo, mark a box with two clicks and Score it, type a category, Place, check the boxes on screen and in the JSON; Insert with
a tiny random inpainting pipeline and check that only the box changed; save a screenshot
(docs/demo.png, the README's, with GENLOC_UPDATE_SCREENSHOT=1)."""
import json
import os
from io import BytesIO

import numpy as np
import pytest
import torch
from PIL import Image
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys

from benchmarks.browser import (chromium, demo_server, fetch, file_url, full_page_screenshot, message, press,
                                set_text, shown_image, upload, wait_for)
from genloc import GenLocModel, LocationModelConfig
from genloc.boxes import pixel_rect, validate_boxes
from genloc.testing import save_sd
from tests.helpers import FIXTURES, ROOT

PHOTO = FIXTURES / "libcom" / "controllable_composition" / "background" / "000000460450.png"
# The README's picture is refreshed only on request (GENLOC_UPDATE_SCREENSHOT=1): a test run leaves the tree clean.
README_SCREENSHOT = ROOT / "docs" / "demo.png"
N = 6
MENU = "const v = document.querySelector('#region input').value; return v === arguments[0] ? v : null;"
DONE = """const m = document.querySelector('#message [data-testid=markdown]'); const t = m ? m.innerText.trim() : '';
return t.startsWith(arguments[0]) || t.includes('Error') ? t : null;"""


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny random location model (``model/``) and a tiny random SD inpainter (``inpainter/``)."""
    root = tmp_path_factory.mktemp("demo")
    torch.manual_seed(0)
    GenLocModel(LocationModelConfig.preset("tiny", relative_extents=True)).save_pretrained(root / "model")
    save_sd(root / "inpainter")
    return root


@pytest.fixture(scope="module")
def page(served):
    """The demo serving the `served` models, and a browser on it."""
    root = served
    with demo_server(["--model", str(root / "model"), "--inpainter", str(root / "inpainter"), "--steps", "2"]) as url:
        driver = chromium()
        try:
            driver.get(url)
            yield driver
        finally:
            driver.quit()


def _rects(boxes, size):
    return [pixel_rect(b, size) for b in boxes]


@pytest.mark.slow
def test_place_then_insert_in_a_real_browser(page, served, tmp_path):
    photo = Image.open(PHOTO).convert("RGB")
    w, h = photo.size
    upload(page, "photo", PHOTO)

    set_text(page, "categories", " ")
    _, text = press(page, "place", "boxes", timeout=120)
    assert text.startswith("Error: No category") and "Traceback" not in text

    shown_photo = page.find_element(By.CSS_SELECTOR, "#photo img")  # two clicks: a region box
    for dx, dy in ((-150, -60), (150, 200)):
        ActionChains(page).move_to_element_with_offset(shown_photo, dx, dy).click().perform()
    region = wait_for(page, "const v = document.querySelector('#region-pixels textarea').value; "
                            "return /^\\d+,\\d+,\\d+,\\d+$/.test(v) ? v : null;", 30)
    assert page.execute_script("return document.querySelector('#region input').value") == "pixel box"
    rx1, ry1, rx2, ry2 = (float(v) for v in region.split(","))
    assert 0 <= rx1 < rx2 <= w and 0 <= ry1 < ry2 <= h

    set_text(page, "categories", "person")
    _, text = press(page, "score", "boxes", timeout=120)  # Score the two-click box
    from genloc import demo

    expected = demo.score_box(demo.Backends(model=GenLocModel.from_pretrained(served / "model")), str(PHOTO),
                              "person", region, seed=0).records[0]
    assert text.startswith(f"Score of the box {region.replace(',', ', ')}"), text
    row = [expected["prob"], expected["log_prob"], expected["log_density"], expected["percentile"]]
    assert "person\t" + "\t".join(format(v, f) for v, f in zip(row, (".2e", ".3f", ".2f", ".1f"))) in text, text  # the table
    shown = (np.asarray(shown_image(page, "boxes"), dtype=np.int16) != np.asarray(photo, dtype=np.int16)).any(-1)
    x0, y0, x1, y1 = pixel_rect([rx1, ry1, rx2, ry2], (w, h))
    outside = np.ones((h, w), bool)
    outside[y0:y1, x0:x1] = False
    assert shown.any() and not shown[outside].any(), "Score drew outside the marked box"

    set_text(page, "n", str(N))
    _, text = press(page, "place", "boxes", timeout=120)
    assert text.startswith(f"{N} boxes for person"), text

    doc = json.loads(fetch(file_url(page, "boxes-json")))
    boxes = [r["box"] for r in doc["boxes"]]
    assert doc["image_size"] == [w, h] and len(boxes) == N and doc["region"] == [rx1, ry1, rx2, ry2]
    assert all(rx1 - 1e-6 <= x1 and ry1 - 1e-6 <= y1 and x2 <= rx2 + 1e-6 and y2 <= ry2 + 1e-6
               for x1, y1, x2, y2 in boxes)
    assert validate_boxes(boxes, (w, h)).valid.all() and all(0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h for x1, y1, x2, y2 in boxes)
    assert all(r["category"] == "person" and np.isclose(r["prob"], np.exp(r["log_prob"])) for r in doc["boxes"])

    shown = np.asarray(shown_image(page, "boxes"), dtype=np.int16)
    original = np.asarray(photo, dtype=np.int16)
    assert shown.shape == original.shape
    changed = (shown != original).any(-1)
    inside = np.zeros((h, w), bool)
    for x0, y0, x1, y1 in _rects(boxes, (w, h)):
        inside[y0:y1, x0:x1] = True
        outline = np.zeros((h, w), bool)
        outline[y0:y1, x0:x1] = True
        outline[y0 + 1:y1 - 1, x0 + 1:x1 - 1] = False
        assert changed[outline].mean() > 0.9, "a box's outline is not drawn"
    assert changed.any() and not changed[~inside].any(), "pixels outside every box changed"
    assert shown_image(page, "heat").size == (w, h)

    page.find_element(By.ID, "insert").click()
    text = wait_for(page, DONE, 180, "Inserted")
    assert text.startswith("Inserted 1 object"), text
    edit = np.asarray(Image.open(BytesIO(fetch(file_url(page, "edit-png")))).convert("RGB"), dtype=np.int16)
    x0, y0, x1, y1 = pixel_rect(boxes[0], (w, h))
    box = np.zeros((h, w), bool)
    box[y0:y1, x0:x1] = True
    assert edit.shape == original.shape
    assert (edit[~box] == original[~box]).all(), "Insert changed pixels outside the box"
    assert (edit[box] != original[box]).any(), "Insert drew nothing in the box"
    record = json.loads(fetch(file_url(page, "edit-json")))["inserted"]
    assert [r["box"] for r in record] == [boxes[0]]

    page.execute_script("window.scrollTo(0, 0)")
    screenshot = README_SCREENSHOT if os.environ.get("GENLOC_UPDATE_SCREENSHOT") == "1" else tmp_path / "demo.png"
    full_page_screenshot(page, screenshot)
    assert Image.open(screenshot).size[0] > 0 and "Error" not in message(page)

    # a box typed while the Region menu names a word switches the menu to the box (it is not dropped)
    menu = page.find_element(By.CSS_SELECTOR, "#region input")
    menu.click()
    menu.send_keys(Keys.CONTROL, "a")
    menu.send_keys("left", Keys.ENTER)
    assert wait_for(page, MENU, 30, "left") == "left"
    set_text(page, "region-pixels", "10,10,200,150")
    assert wait_for(page, MENU, 30, "pixel box") == "pixel box"
