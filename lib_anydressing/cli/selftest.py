"""`python -m lib_anydressing selftest --url http://127.0.0.1:7860`: check AnyDressing in a running WebUI.

Drives only the public HTTP API of a running A1111 or Forge (started with `--api`), with whatever
checkpoint is loaded, and the two garments of tests/data: plain against dressed; the same dressed
request before and after a different one; a garment that is not an image; an interrupt mid-sampling;
hires fix; ControlNet with a pose image when its API is there; a photo dressed in img2img with 'mask
from garments' when a clothes parser is installed; and, last, the plain image again, which
must be pixel-identical to the first (the model left untouched). Prints a PASS/FAIL table with what to
do for each failure, and the time of a dressed generation against a plain one, cold (garments never
seen: encoding and GarmentsNet included) and warm (features cached), and against ControlNet
reference-only where that is installed; exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

DATA = Path(__file__).resolve().parents[2] / "tests" / "data"
GARMENTS = (
    ("garment_top.png", "upper", [0.0, 0.15, 1.0, 0.6]),
    ("garment_trousers.png", "lower", [0.0, 0.5, 1.0, 1.0]),
)
PROBLEMS = "AnyDressing problems"


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL or SKIP
    detail: str
    fix: str = ""


@dataclass
class Report:
    url: str
    checkpoint: str
    checks: list[Check] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return any(c.status == "FAIL" for c in self.checks)


class WebUI:
    """The WebUI's HTTP API: JSON in, JSON out."""

    def __init__(self, url: str, timeout: float) -> None:
        self.url, self.timeout = url.rstrip("/"), timeout

    def call(self, path: str, body: dict | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=self.timeout) as answer:
            return json.loads(answer.read() or b"null")

    def txt2img(self, payload: dict, route: str = "/sdapi/v1/txt2img") -> Generation:
        started = time.perf_counter()
        answer = self.call(route, payload)
        info = json.loads(answer["info"])
        images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB")) for b in answer["images"]]
        return Generation(images[0], info.get("extra_generation_params", {}), time.perf_counter() - started, images)


@dataclass
class Generation:
    image: np.ndarray
    params: dict[str, Any]
    seconds: float
    images: list[np.ndarray] = field(default_factory=list)  # all the API answered (a mask preview follows)

    @property
    def problems(self) -> str:
        return str(self.params.get(PROBLEMS, ""))

    @property
    def dressed(self) -> bool:
        return "AnyDressing model" in self.params and not self.problems


def garment_args(garments: list[dict] | None = None, **general: Any) -> dict:
    """The AnyDressing entry of alwayson_scripts, as the README documents it."""
    if garments is None:
        garments = [
            {"image": _b64(DATA / name), "category": category, "region": "box", "box": box}
            for name, category, box in GARMENTS
        ]
    return {"AnyDressing": {"args": [{"enabled": True, "garments": garments, **general}]}}


def pose_image(width: int, height: int) -> str:
    """A standing stick figure in openpose colours on black, base64 PNG (for a ControlNet with module none)."""
    image = Image.new("RGB", (width, height))
    draw = ImageDraw.Draw(image)
    x, s = width / 2, height / 10
    joints = {"head": (x, 1.5 * s), "neck": (x, 2.5 * s), "hip": (x, 5.5 * s)}
    for side in (-1, 1):
        joints[f"hand{side}"] = (x + side * 2.2 * s, 5 * s)
        joints[f"foot{side}"] = (x + side * 1.2 * s, 9.3 * s)
    limbs = [
        ("head", "neck"),
        ("neck", "hip"),
        ("neck", "hand-1"),
        ("neck", "hand1"),
        ("hip", "foot-1"),
        ("hip", "foot1"),
    ]
    colours = [(255, 0, 0), (0, 255, 0), (255, 170, 0), (170, 255, 0), (0, 85, 255), (0, 0, 255)]
    for (a, b), colour in zip(limbs, colours, strict=True):
        draw.line([joints[a], joints[b]], fill=colour, width=max(2, width // 40))
    return _png_b64(image)


def run(
    webui: WebUI, report: Report, size: int, steps: int, seed: int, repeats: int = 1, photo: Image.Image | None = None
) -> None:
    """All checks, in an order where each one's state is known: the plain image first and last."""
    report.checkpoint = str(webui.call("/sdapi/v1/options").get("sd_model_checkpoint", "?"))
    base = {"prompt": "a person standing, full body", "negative_prompt": "", "seed": seed, "steps": steps,
            "width": size, "height": size, "cfg_scale": 5, "sampler_name": "Euler", "batch_size": 1}  # fmt: skip
    add = report.checks.append

    scripts = webui.call("/sdapi/v1/scripts")
    if "anydressing" not in [name.lower() for name in scripts.get("txt2img", [])]:
        add(Check("extension loaded", "FAIL", f"txt2img scripts: {scripts.get('txt2img')}", INSTALL))
        return
    add(Check("extension loaded", "PASS", "AnyDressing is an always-on txt2img script"))

    plain = webui.txt2img(base)
    webui.txt2img(base)  # warm: a first call may load or compile
    dressed = webui.txt2img({**base, "alwayson_scripts": garment_args()})
    warm = webui.txt2img({**base, "alwayson_scripts": garment_args()})
    changed = _mean_change(plain.image, dressed.image)
    if dressed.dressed and changed > 0:
        add(Check("dressed", "PASS", f"2 garments, boxes; mean pixel change {changed:.1f} against plain"))
    else:
        add(Check("dressed", "FAIL", dressed.problems or f"no AnyDressing entries, change {changed:.1f}", PROBLEM))
    _same(add, "repeat", warm, dressed, "the same dressed request twice (features from the cache)")
    try:
        report.timings = speed(webui, base, repeats)
    except RuntimeError as e:
        add(Check("timing", "FAIL", str(e), PROBLEM))

    other = [{"image": _b64(DATA / "garment_trousers.png"), "category": "lower"}]
    webui.txt2img({**base, "seed": seed + 1, "alwayson_scripts": garment_args(other, resolution=384)})
    again = webui.txt2img({**base, "alwayson_scripts": garment_args()})
    _same(add, "determinism", again, dressed, "the dressed request again after a different one")

    broken = [{"image": base64.b64encode(b"not an image").decode(), "category": "upper"}]
    bad = webui.txt2img({**base, "alwayson_scripts": garment_args(broken)})
    named = "garment 1" in bad.problems.lower()
    if named and np.array_equal(bad.image, plain.image):
        add(Check("bad garment", "PASS", f"plain image, problem: {bad.problems}"))
    else:
        add(Check("bad garment", "FAIL", bad.problems or "no problem reported", "the message must name the garment"))

    add(_interrupt(webui, {**base, "steps": steps * 4, "alwayson_scripts": garment_args()}))
    add(_hires(webui, base))
    add(_controlnet(webui, base, size, plain.image))
    add(_photo(webui, base, photo))

    last = webui.txt2img(base)
    if np.array_equal(last.image, plain.image):
        add(Check("model untouched", "PASS", "the plain image at the end is pixel-identical to the first"))
    else:
        add(Check("model untouched", "FAIL", f"mean change {_mean_change(plain.image, last.image):.2f}", UNTOUCHED))


def speed(webui: WebUI, base: dict, repeats: int) -> dict[str, float]:
    """Seconds and ratios to plain: the fastest of `repeats` rounds that alternate plain, dressed cold
    (garments made unique, so nothing is cached), the same dressed again (warm) and reference-only."""
    reference = _reference_only(webui)
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        fresh = garment_args(_unseen_garments())
        runs = {"plain": base, "dressed_cold": {**base, "alwayson_scripts": fresh}}
        runs["dressed_warm"] = runs["dressed_cold"]
        if reference is not None:
            runs["reference_only"] = {**base, "alwayson_scripts": {"ControlNet": {"args": [reference]}}}
        for name, payload in runs.items():
            generation = webui.txt2img(payload)
            if name.startswith("dressed") and not generation.dressed:
                raise RuntimeError(f"the timed dressed generation was not dressed: {generation.problems}")
            times.setdefault(name, []).append(generation.seconds)
    best = {name: min(seconds) for name, seconds in times.items()}
    ratios = {f"ratio_{name.removeprefix('dressed_')}": round(t / best["plain"], 2) for name, t in best.items()}
    ratios.pop("ratio_plain")
    return {**{f"{name}_s": round(t, 2) for name, t in best.items()}, **ratios, "rounds": repeats}


def _unseen_garments() -> list[dict]:
    """The test garments with one pixel set from the clock: content the feature cache has not seen."""
    garments = []
    for name, category, box in GARMENTS:
        image = Image.open(DATA / name).convert("RGBA")
        nonce = time.time_ns()
        image.putpixel((image.width // 2, image.height // 2), (nonce % 251, nonce // 251 % 251, 7, 255))
        garments.append({"image": _png_b64(image), "category": category, "region": "box", "box": box})
    return garments


def _reference_only(webui: WebUI) -> dict | None:
    """A ControlNet unit with the reference-only preprocessor on the first test garment, if there is one."""
    try:
        modules = webui.call("/controlnet/module_list").get("module_list", [])
    except (urllib.error.URLError, ValueError):
        return None
    module = next((m for m in modules if m.lower() == "reference_only"), None)
    if module is None:
        return None
    return {"enabled": True, "module": module, "model": "None", "image": _b64(DATA / GARMENTS[0][0]), "weight": 1.0}


def _same(add: Callable[[Check], None], name: str, got: Generation, want: Generation, what: str) -> None:
    if got.dressed and np.array_equal(got.image, want.image):
        add(Check(name, "PASS", f"{what}: pixel-identical"))
    else:
        change = _mean_change(got.image, want.image)
        add(Check(name, "FAIL", f"{what}: {got.problems or f'mean change {change:.2f}'}", DETERMINISM))


def _interrupt(webui: WebUI, payload: dict) -> Check:
    """Interrupt once sampling has started; the generation must come back (the model is checked last)."""
    result: dict[str, Any] = {}

    def generate() -> None:
        try:
            result["generation"] = webui.txt2img(payload)
        except Exception as e:  # reported below
            result["error"] = e

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    sent, deadline = False, time.monotonic() + webui.timeout
    while thread.is_alive() and time.monotonic() < deadline:
        state = webui.call("/sdapi/v1/progress?skip_current_image=true").get("state", {})
        if state.get("sampling_step", 0) >= 1:
            webui.call("/sdapi/v1/interrupt", {})
            sent = True
            break
        time.sleep(0.1)
    thread.join(webui.timeout)
    if thread.is_alive() or "generation" not in result:
        return Check("interrupt", "FAIL", f"no answer after the interrupt: {result.get('error')}", INTERRUPT)
    if not sent:
        return Check("interrupt", "SKIP", "sampling ended before it could be interrupted: raise --steps")
    return Check("interrupt", "PASS", "interrupted mid-sampling; the WebUI answered")


def _hires(webui: WebUI, base: dict) -> Check:
    payload = {**base, "enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 2,
               "denoising_strength": 0.5, "alwayson_scripts": garment_args()}  # fmt: skip
    if _forge(webui):
        payload["hr_additional_modules"] = ["Use same choices"]  # Forge fails a hires request without it
    hires = webui.txt2img(payload)
    want = round(base["width"] * 1.5)
    if hires.dressed and hires.image.shape[1] == want:
        return Check("hires fix", "PASS", f"{want}x{want}, dressed in both passes")
    return Check("hires fix", "FAIL", hires.problems or f"image {hires.image.shape[1]} wide", PROBLEM)


def _controlnet(webui: WebUI, base: dict, size: int, plain: np.ndarray) -> Check:
    try:
        models = [m for m in webui.call("/controlnet/model_list").get("model_list", []) if m and m != "None"]
    except (urllib.error.URLError, ValueError):
        return Check("controlnet", "SKIP", "no ControlNet API in this WebUI")
    if not models:
        return Check("controlnet", "SKIP", "ControlNet is there but has no model")
    modules = webui.call("/controlnet/module_list").get("module_list", [])
    none = next((m for m in modules if m.lower() == "none"), "none")  # A1111's extension: none; Forge's: None
    unit = {"enabled": True, "module": none, "model": models[0], "image": pose_image(size, size), "weight": 1.0}
    controlnet = {"ControlNet": {"args": [unit]}}
    try:
        pose_only = webui.txt2img({**base, "alwayson_scripts": controlnet})
    except urllib.error.HTTPError as e:  # ControlNet failing on its own, without AnyDressing
        return Check("controlnet", "SKIP", f"{models[0]} alone fails here ({e}): a model for another base?")
    if np.array_equal(pose_only.image, plain):  # e.g. an SD1.5 ControlNet on an SDXL checkpoint
        return Check("controlnet", "SKIP", f"{models[0]} changes nothing on this checkpoint (another base model?)")
    both = webui.txt2img({**base, "alwayson_scripts": {**controlnet, **garment_args()}})
    if both.dressed and not np.array_equal(both.image, pose_only.image):
        return Check("controlnet", "PASS", f"{models[0]} (module {unit['module']}) and AnyDressing in one generation")
    return Check("controlnet", "FAIL", both.problems or "the garments changed nothing under ControlNet", PROBLEM)


def person_photo(width: int, height: int) -> Image.Image:
    """A drawn person on grey: skin-coloured head, red top, blue trousers (what a clothes parser labels)."""
    image = Image.new("RGB", (width, height), (150, 150, 150))
    draw = ImageDraw.Draw(image)
    w, h = width, height
    draw.ellipse([0.42 * w, 0.12 * h, 0.58 * w, 0.28 * h], fill=(230, 190, 160))
    draw.rectangle([0.34 * w, 0.30 * h, 0.66 * w, 0.62 * h], fill=(200, 30, 30))
    draw.rectangle([0.36 * w, 0.62 * h, 0.64 * w, 0.95 * h], fill=(30, 30, 180))
    return image


def _photo(webui: WebUI, base: dict, photo: Image.Image | None) -> Check:
    """img2img on a person photo, mask and regions from 2 garments: dressed, the mask recorded, its preview
    after the image, and the photo kept outside the mask (the top-left corner is background)."""
    photo = (photo or person_photo(base["width"], base["height"])).convert("RGB")
    garments = [{"image": _b64(DATA / name), "category": category} for name, category, _ in GARMENTS]
    payload = {**base, "width": photo.width, "height": photo.height, "init_images": [_png_b64(photo)],
               "denoising_strength": 0.9, "inpainting_fill": 1, "mask_blur": 0,
               "alwayson_scripts": garment_args(garments, mask_from_garments=True)}  # fmt: skip
    result = webui.txt2img(payload, "/sdapi/v1/img2img")
    if "no clothes parser is installed" in result.problems:
        return Check("dress a photo", "SKIP", "no clothes parser installed (models/parser): see the README")
    mask = result.params.get("AnyDressing mask")
    corner = np.asarray(photo)[:8, :8]
    if not (result.dressed and mask and len(result.images) == 2):
        detail = result.problems or f"mask entry {mask!r}, {len(result.images)} images"
        return Check("dress a photo", "FAIL", detail, PROBLEM)
    if not np.array_equal(result.image[:8, :8], corner):
        return Check("dress a photo", "FAIL", "the photo changed outside the mask", PROBLEM)
    changed = _mean_change(np.asarray(photo), result.image)
    return Check("dress a photo", "PASS", f"img2img, mask {mask}; preview returned; mean change {changed:.1f}")


def _forge(webui: WebUI) -> bool:
    """Forge's txt2img takes hr_additional_modules; A1111's does not know it."""
    try:
        schema = webui.call("/openapi.json")
    except (urllib.error.URLError, ValueError):
        return False
    return "hr_additional_modules" in json.dumps(schema.get("components", {}))


def _mean_change(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


INSTALL = "install the extension into extensions/ and restart the WebUI (not just reload the UI)"
PROBLEM = "read the problem text; if it says 'unexpected', report it with the WebUI's console output"
DETERMINISM = "report it with your WebUI version and start flags: garment features must not depend on history"
INTERRUPT = "report it with the console output: the WebUI did not come back from an interrupt"
UNTOUCHED = "restart the WebUI before generating more, and report it: the model was left changed"


def print_table(report: Report) -> None:
    print(f"AnyDressing self-test of {report.url} ({report.checkpoint})")
    width = max(len(c.name) for c in report.checks) if report.checks else 10
    for check in report.checks:
        print(f"  {check.status:4}  {check.name:{width}}  {check.detail}")
        if check.status == "FAIL" and check.fix:
            print(f"        {'':{width}}  what to do: {check.fix}")
    if report.timings:
        t = report.timings
        print(f"  time: plain {t['plain_s']} s, dressed {t['dressed_cold_s']} s cold ({t['ratio_cold']}x), "
              f"{t['dressed_warm_s']} s warm ({t['ratio_warm']}x)", end="")  # fmt: skip
        if "reference_only_s" in t:
            print(f"; ControlNet reference-only {t['reference_only_s']} s ({t['ratio_reference_only']}x)", end="")
        rounds = t["rounds"]
        print(f" (fastest of {rounds} rounds)" if rounds > 1 else " (one round: noisy where other jobs share the "
              "machine; --repeats 3 for figures)")  # fmt: skip
    print("FAIL" if report.failed else "all passed")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:7860", help="the WebUI, started with --api")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (small keeps it quick)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for one request")
    parser.add_argument("--repeats", type=int, default=1, help="timed rounds (the fastest counts)")
    parser.add_argument(
        "--photo", type=Path, default=None, help="a person photo for the img2img check (default: drawn)"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def main(args: argparse.Namespace) -> int:
    webui = WebUI(args.url, args.timeout)
    report = Report(webui.url, "?")
    try:
        photo = Image.open(args.photo) if args.photo else None
        run(webui, report, args.size, args.steps, args.seed, args.repeats, photo)
    except urllib.error.HTTPError as e:  # a request the WebUI could not serve: the checks so far still count
        report.checks.append(Check("aborted", "FAIL", f"the WebUI answered {e}", "see the WebUI's console output"))
    except (urllib.error.URLError, OSError) as e:
        print(f"cannot reach the WebUI's API at {args.url}: {e}. Start it with --api.", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(asdict(report), indent=2))
    else:
        print_table(report)
    return 1 if report.failed else 0
