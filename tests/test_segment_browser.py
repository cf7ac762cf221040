"""The standalone Segment tab in a real browser: Debian's headless chromium driven by playwright.

Upload a photo, click on the garment, and a mask appears: the preview turns blue-tinted where the
object is, and the cutout comes out. Skipped where chromium or playwright is missing (CI installs both).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from browser import CHROMIUM, PHOTO_SIZE, browser_page, standalone_ui, upload_and_click_garment, write_photo

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")


@pytest.fixture
def server(tmp_path):
    with standalone_ui(tmp_path / "out") as url:
        yield url, tmp_path


def test_click_on_garment_shows_mask(server):
    url, tmp = server
    write_photo(tmp / "photo.png")
    with browser_page(url) as page:
        box = upload_and_click_garment(page, tmp / "photo.png")
        page.locator("#anydressing_segment_status").get_by_text("GrabCut").wait_for(timeout=10000)
        picture_left = box["x"] + (box["width"] - box["height"] * PHOTO_SIZE[0] / PHOTO_SIZE[1]) / 2
        page.mouse.click(picture_left + 15, box["y"] + 15, button="right")  # javascript/: a negative point
        page.wait_for_timeout(3000)
        preview = page.locator("#anydressing_segment_preview img")
        preview.screenshot(path=str(tmp / "preview.png"))
        page.screenshot(path=str(tmp / "page.png"))
    shot = np.asarray(Image.open(tmp / "preview.png").convert("RGB")).astype(int)
    h, w = shot.shape[:2]
    beside_click = shot[h // 2 - 5 : h // 2 + 5, w // 3 - 5 : w // 3 + 5].reshape(-1, 3).mean(0)  # off the marker
    assert beside_click[2] > 120 and beside_click[0] < 180, f"the object should be tinted blue: {beside_click}"
    marker = shot[: h // 8, : w // 8].reshape(-1, 3)
    assert ((marker[:, 0] > 180) & (marker[:, 1] < 60)).any(), "the right-click should draw a red negative point"


def test_brush_stroke_subtracts_from_the_mask(server):
    url, tmp = server
    write_photo(tmp / "photo.png")
    with browser_page(url, height=1600) as page:
        upload_and_click_garment(page, tmp / "photo.png")
        page.get_by_text("Brush: paint over the preview").click()
        page.get_by_role("button", name="Load the preview to paint on").click()
        canvas = page.locator("#anydressing_segment_brush canvas").last
        page.wait_for_timeout(2000)
        c = canvas.bounding_box()
        page.mouse.move(c["x"] + c["width"] * 0.15, c["y"] + c["height"] / 2)
        page.mouse.down()
        page.mouse.move(c["x"] + c["width"] * 0.85, c["y"] + c["height"] / 2, steps=30)
        page.mouse.up()
        page.wait_for_timeout(800)
        page.get_by_role("button", name="Subtract strokes from the mask").click()
        page.wait_for_timeout(3000)
        page.locator("#anydressing_segment_preview img").screenshot(path=str(tmp / "brushed.png"))
    shot = np.asarray(Image.open(tmp / "brushed.png").convert("RGB")).astype(int)
    h, w = shot.shape[:2]
    on_stroke = shot[h // 2 - 3 : h // 2 + 3, w // 3 : w // 3 + 6].reshape(-1, 3).mean(0)
    off_stroke = shot[h // 3 - 3 : h // 3 + 3, w // 2 - 3 : w // 2 + 3].reshape(-1, 3).mean(0)
    assert on_stroke[0] > 180 and on_stroke[2] < 90, f"under the stroke the garment is out of the mask: {on_stroke}"
    assert off_stroke[2] > 120, f"elsewhere the garment stays in the mask: {off_stroke}"
