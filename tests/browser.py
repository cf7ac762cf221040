"""What the browser tests share: Debian's chromium, its flags on this closed network, the test photo."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
PHOTO_SIZE = (320, 240)


def write_photo(path: Path) -> None:
    """A red ellipse (the garment) on grey."""
    image = Image.new("RGB", PHOTO_SIZE, (128, 128, 128))
    ImageDraw.Draw(image).ellipse((80, 50, 240, 190), fill=(210, 30, 40))
    image.save(path)


def upload_and_click_garment(page, photo: Path) -> dict:
    """Upload the photo in the Segment tab, click the ellipse's centre, wait for the cutout; returns the
    photo's on-screen box (the img element is letterboxed: the picture is centred in it)."""
    page.locator("#anydressing_segment_photo input[type=file]").set_input_files(str(photo))
    shown = page.locator("#anydressing_segment_photo img")
    shown.wait_for(timeout=30000)
    box = shown.bounding_box()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.locator("#anydressing_segment_cutout img").wait_for(timeout=60000)
    return box


@contextmanager
def browser_page(url: str, height: int = 1200) -> Iterator:
    """A page of Debian's headless chromium on `url`, closed afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": height})
            page.goto(url)
            yield page
        finally:
            browser.close()


@contextmanager
def served(command: list[str], timeout: float = 120) -> Iterator[str]:
    """Run `command` (a gradio app; `{port}` in it is replaced by a free localhost port) until its page
    answers; yields its URL and stops it afterwards."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [part.replace("{port}", str(port)) for part in command]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if proc.poll() is not None:
                    raise RuntimeError(f"{command[1:3]} exited: {proc.stdout.read().decode()}") from None
                if time.time() > deadline:
                    raise RuntimeError(f"{command[1:3]} did not start within {timeout:g} s") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def standalone_ui(outputs: Path) -> AbstractContextManager[str]:
    """`python -m lib_anydressing ui` on a free localhost port, writing to `outputs`; yields its URL."""
    return served([sys.executable, "-m", "lib_anydressing", "ui", "--port", "{port}", "--outputs", str(outputs)])
