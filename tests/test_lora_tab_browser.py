"""The standalone 'Train garment LoRA' tab in a real browser (Debian's headless chromium, playwright).

Photos put where the Segment tab's "Add to LoRA dataset" saves are imported with one click, the
report lists every file, the gallery shows the captions, and a caption edited in the tab is the
`.txt` file on disk, so is a tag removed from all; uploads are reported under their own names; Start
without a checkpoint says why in the page. Skipped where chromium or playwright is missing (CI installs both).
"""

from __future__ import annotations

import pytest
from PIL import Image

from browser import CHROMIUM, browser_page, standalone_ui, write_photo

playwright = pytest.importorskip("playwright.sync_api")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")]


@pytest.fixture
def server(tmp_path):
    with standalone_ui(tmp_path / "out") as url:
        yield url, tmp_path / "out"


def test_import_then_edit_a_caption_in_the_tab(server):
    url, out = server
    source = out / "lora_dataset"  # the tab's default source: where the Segment tab adds cutouts
    source.mkdir(parents=True)
    write_photo(source / "garment.png")
    Image.open(source / "garment.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(source / "garment-1.png")
    (source / "broken.png").write_bytes(b"not a png at all")
    dataset = out / "lora_train" / "dataset"

    with browser_page(url, height=1800) as page:
        page.locator(".tab-nav button", has_text="Train garment LoRA").click()
        page.locator("#anydressing_lora_import_folder").click()
        report = page.locator("#anydressing_lora_report")
        report.get_by_text("imported as 002.png").wait_for(timeout=60000)
        assert report.get_by_text("skipped: unreadable").count() == 1
        page.locator("#anydressing_lora_import_note").get_by_text("Imported 2 of 3 files").wait_for()

        thumbs = page.locator("#anydressing_lora_gallery button.thumbnail-item")
        thumbs.first.wait_for(timeout=20000)
        assert thumbs.count() == 2
        thumbs.first.click()
        caption = page.locator("#anydressing_lora_caption textarea")
        page.wait_for_function(
            "() => document.querySelector('#anydressing_lora_caption textarea').value === 'zxq, shirt'",
            timeout=10000,
        )
        assert page.locator("#anydressing_lora_selected textarea, #anydressing_lora_selected input").first.input_value(
        ).endswith("001.png")  # fmt: skip
        caption.fill("zxq, shirt, red, front view")
        page.locator("#anydressing_lora_save_caption").click()
        page.locator("#anydressing_lora_caption_note").get_by_text("Saved 001.txt").wait_for(timeout=10000)
        page.locator("#anydressing_lora_counts").get_by_text("front view").wait_for(timeout=10000)
        page.locator("#anydressing_lora_tag textarea").fill("shirt")
        page.get_by_role("button", name="Remove from all").click()
        page.locator("#anydressing_lora_caption_note").get_by_text("2 caption(s) changed").wait_for(timeout=10000)

        uploads = out / "to_upload"
        uploads.mkdir()
        write_photo(uploads / "my photo.png")
        page.locator("#anydressing_lora_uploads input[type=file]").set_input_files([str(uploads / "my photo.png")])
        page.wait_for_timeout(1500)
        page.locator("#anydressing_lora_import_uploads").click()
        report.get_by_text("imported as 003.png").wait_for(timeout=60000)
        assert report.get_by_text("my photo.png").count() == 1, "uploads are reported under the user's file name"
        assert thumbs.count() == 3

        page.locator("#anydressing_lora_start").click()  # standalone with no checkpoint: a message, no traceback
        page.locator("#anydressing_lora_final").get_by_text("give the path of an SD1.x checkpoint").wait_for(
            timeout=20000
        )
        page.screenshot(path=str(out / "page.png"), full_page=True)

    assert (dataset / "001.txt").read_text() == "zxq, red, front view\n"
    assert (dataset / "002.txt").read_text() == "zxq\n", "only the batch edit touched the other caption"
    assert Image.open(dataset / "001.png").mode == "RGBA"
