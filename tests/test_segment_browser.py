"""The standalone Segment tab in a real browser: Debian's headless chromium driven by playwright.

Upload a photo, click on the garment, and a mask appears: the preview turns blue-tinted where the
object is, and the cutout comes out. Skipped where chromium or playwright is missing (CI installs both).
The Brush runs in gradio 3 (A1111's; the Image sketch tool) and, where ANYDRESSING_GRADIO4_PYTHON names a
gradio-4 venv's python, in gradio 4 (Forge's; the ImageEditor), the tab served by that python.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from browser import (
    CHROMIUM,
    PHOTO_SIZE,
    ROOT,
    browser_page,
    served,
    standalone_ui,
    upload_and_click_garment,
    write_photo,
)

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]


@pytest.fixture
def server(tmp_path):
    with standalone_ui(tmp_path / "out") as url:
        yield url, tmp_path


@pytest.fixture(params=["gradio3", "gradio4"])
def brush_server(request, tmp_path):
    """The tab on this interpreter's gradio (3), or on the gradio-4 venv's (`gradio4_env.py serve`)."""
    if request.param == "gradio3":
        with standalone_ui(tmp_path / "out") as url:
            yield url, tmp_path
        return
    python = os.environ.get("ANYDRESSING_GRADIO4_PYTHON", "")
    if not python or not Path(python).is_file():
        pytest.skip("set ANYDRESSING_GRADIO4_PYTHON to the python of a venv with gradio 4.40 (Forge's) and torch")
    with _gradio4_ui(python, tmp_path / "out") as url:
        yield url, tmp_path


def _gradio4_ui(python: str, outputs: Path) -> AbstractContextManager[str]:
    return served([python, str(ROOT / "tests" / "gradio4_env.py"), "serve", "{port}", str(outputs)])


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


def test_brush_stroke_subtracts_from_the_mask(brush_server):
    url, tmp = brush_server
    write_photo(tmp / "photo.png")
    with browser_page(url, height=1600) as page:
        _open_brush(page, tmp)
        _load_preview_and_paint(page, 0.5)
        _press_and_wait_for_the_preview(page, "Subtract strokes from the mask")
        page.locator("#anydressing_segment_preview img").screenshot(path=str(tmp / "brushed.png"))
    shot = np.asarray(Image.open(tmp / "brushed.png").convert("RGB")).astype(int)
    h, w = shot.shape[:2]
    on_stroke = shot[h // 2 - 3 : h // 2 + 3, w // 3 : w // 3 + 6].reshape(-1, 3).mean(0)
    off_stroke = shot[h // 3 - 3 : h // 3 + 3, w // 2 - 3 : w // 2 + 3].reshape(-1, 3).mean(0)
    assert on_stroke[0] > 180 and on_stroke[2] < 90, f"under the stroke the garment is out of the mask: {on_stroke}"
    assert off_stroke[2] > 120, f"elsewhere the garment stays in the mask: {off_stroke}"


def _open_brush(page, tmp: Path) -> None:
    """The photo segmented by one click, and the Brush accordion open."""
    upload_and_click_garment(page, tmp / "photo.png")
    page.get_by_text("Brush: paint over the preview").click()


def _load_preview_and_paint(page, fraction_y: float) -> None:
    page.get_by_role("button", name="Load the preview to paint on").click()
    page.wait_for_timeout(2000)
    _paint_line(page, fraction_y)


def _paint_line(page, fraction_y: float) -> None:
    """One horizontal stroke across the brush canvas, at `fraction_y` of its height."""
    canvas = page.locator("#anydressing_segment_brush canvas").last
    c = canvas.bounding_box()
    page.mouse.move(c["x"] + c["width"] * 0.15, c["y"] + c["height"] * fraction_y)
    page.mouse.down()
    page.mouse.move(c["x"] + c["width"] * 0.85, c["y"] + c["height"] * fraction_y, steps=30)
    page.mouse.up()
    page.wait_for_timeout(800)


def _press_and_wait_for_the_preview(page, button: str) -> None:
    """Press `button` and wait until the preview shows a new picture (no stroke reached: the status says)."""
    preview = page.locator("#anydressing_segment_preview img")
    before = preview.get_attribute("src")
    page.get_by_role("button", name=button).click()
    try:
        page.wait_for_function(
            "([before]) => document.querySelector('#anydressing_segment_preview img')?.src !== before",
            arg=[before], timeout=30000,
        )  # fmt: skip
    except Exception as e:
        status = page.locator("#anydressing_segment_status").last.inner_text()
        raise AssertionError(f"the preview did not change after '{button}'; status: {status}") from e
    page.wait_for_timeout(500)


def test_brush_stroke_adds_to_the_mask(brush_server):
    url, tmp = brush_server
    write_photo(tmp / "photo.png")
    with browser_page(url, height=1600) as page:
        _open_brush(page, tmp)
        page.get_by_role("button", name="Add strokes to the mask").click()
        status = page.locator("#anydressing_segment_status")
        status.get_by_text("no brush strokes").wait_for(timeout=10000)  # nothing painted yet: said so
        _load_preview_and_paint(page, 0.1)  # over the grey above the ellipse
        _press_and_wait_for_the_preview(page, "Add strokes to the mask")
        assert "no brush strokes" not in status.last.inner_text()
        page.locator("#anydressing_segment_preview img").screenshot(path=str(tmp / "added.png"))
    shot = np.asarray(Image.open(tmp / "added.png").convert("RGB")).astype(int)
    h, w = shot.shape[:2]
    on_stroke = shot[h // 10 - 1 : h // 10 + 2, w // 2 - 3 : w // 2 + 3].reshape(-1, 3).mean(0)
    above = shot[h // 30 - 1 : h // 30 + 2, w // 2 - 3 : w // 2 + 3].reshape(-1, 3).mean(0)
    assert on_stroke[2] > on_stroke[0] + 40, f"under the stroke the grey is now in the mask (blue): {on_stroke}"
    assert abs(above[2] - above[0]) < 20, f"above the stroke it stays grey: {above}"
