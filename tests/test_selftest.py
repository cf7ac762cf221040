"""The self-test's verdicts, against a local server that answers the A1111 API routes it uses.

The answers have the shapes of A1111 1.10.1's modules/api/models.py (TextToImageResponse: images,
parameters, info as a JSON string with extra_generation_params; ProgressResponse: state.sampling_step)
and the extension's own option parser decides what a request asks for. What the server draws is made
up: a grey level from the seed and the garment images, so a dressed image differs from a plain one.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
from PIL import Image

from lib_anydressing.cli import selftest
from lib_anydressing.generation.options import from_api


def test_the_selftest_request_is_what_the_extension_reads():
    opts = from_api(selftest.garment_args()["AnyDressing"]["args"][0])
    assert opts.usable and not opts.problems
    assert [s.category for s in opts.slots] == ["upper", "lower"] and all(s.box for s in opts.slots)
    pose = Image.open(io.BytesIO(base64.b64decode(selftest.pose_image(96, 128))))
    assert pose.size == (96, 128) and np.asarray(pose).max() > 0


class FakeWebUI(BaseHTTPRequestHandler):
    history_leaks = False  # a WebUI whose dressed images depend on the request before
    broken_controlnet = False  # ControlNet listed, but its model fails every request (Forge: SD1.5 on SDXL)
    reference_only = False  # ControlNet with no model but the reference-only preprocessor
    parser = None  # img2img 'mask from garments': None (no parser installed), "keeps" or "repaints" the photo
    garments_sent: ClassVar[list[bytes]] = []
    last = b""
    step = 0
    interrupted = threading.Event()

    def log_message(self, *args):
        pass

    def _send(self, body, status=200):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        answers = {
            "/sdapi/v1/options": {"sd_model_checkpoint": "rand15.safetensors [abc]"},
            "/sdapi/v1/scripts": {"txt2img": ["anydressing", "x/y/z plot"], "img2img": ["anydressing"]},
            "/sdapi/v1/progress?skip_current_image=true": {"progress": 0.1, "state": {"sampling_step": FakeWebUI.step}},
            "/openapi.json": {"components": {}},
        }
        if FakeWebUI.broken_controlnet:
            answers["/controlnet/model_list"] = {"model_list": ["None", "control_sd15 [abc]"]}
            answers["/controlnet/module_list"] = {"module_list": ["None", "canny"]}
        if FakeWebUI.reference_only:
            answers["/controlnet/model_list"] = {"model_list": ["None"]}
            answers["/controlnet/module_list"] = {"module_list": ["none", "reference_only"]}
        self._send(answers.get(self.path, {"detail": "Not Found"}), 200 if self.path in answers else 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])) or b"{}")
        if self.path == "/sdapi/v1/interrupt":
            FakeWebUI.interrupted.set()
            return self._send(None)
        units = body.get("alwayson_scripts", {}).get("ControlNet", {}).get("args", [])
        if FakeWebUI.reference_only and [u["module"] for u in units] == ["reference_only"]:
            return self._send(self._txt2img(body))
        if units:
            return self._send({"error": "RuntimeError", "detail": "mat1 and mat2 shapes cannot be multiplied"}, 500)
        self._send(self._img2img(body) if self.path == "/sdapi/v1/img2img" else self._txt2img(body))

    def _img2img(self, body):
        """A1111's img2img answer, as the extension makes it: no parser, a message; else the photo (the
        background kept, or repainted by a broken WebUI), the mask entry, and the mask preview after it."""
        problem = "no clothes parser is installed: put a segformer clothes parser in models/parser"
        if FakeWebUI.parser is None:
            info = {"extra_generation_params": {"AnyDressing problems": f"{problem}: generating without dressing"}}
            return {"images": body["init_images"], "parameters": {}, "info": json.dumps(info)}
        photo = Image.open(io.BytesIO(base64.b64decode(body["init_images"][0])))
        if FakeWebUI.parser == "repaints":
            photo = Image.new("RGB", photo.size, (1, 2, 3))
        params = {"AnyDressing model": "training-free", "AnyDressing mask": "from garments, grow 8"}
        images = [photo, Image.new("RGB", photo.size, (0, 0, 0))]
        encoded = []
        for image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            encoded.append(base64.b64encode(buffer.getvalue()).decode())
        return {"images": encoded, "parameters": {}, "info": json.dumps({"extra_generation_params": params})}

    def _txt2img(self, body):
        params, digest = {}, hashlib.sha256(str(body["seed"]).encode())
        args = body.get("alwayson_scripts", {}).get("AnyDressing", {}).get("args")
        if args:
            opts = from_api(args[0])
            if opts.problems:
                params["AnyDressing problems"] = "; ".join(opts.problems)
            else:
                params["AnyDressing model"] = "training-free"
                garments = json.dumps(args[0]["garments"]).encode()
                FakeWebUI.garments_sent.append(garments)
                digest.update(garments + (FakeWebUI.last if FakeWebUI.history_leaks else b""))
                FakeWebUI.last = garments
        if body["steps"] > 8:  # the interrupt check's long request
            FakeWebUI.interrupted.clear()
            FakeWebUI.step = 1
            FakeWebUI.interrupted.wait(5)
            FakeWebUI.step = 0
        side = round(body["width"] * (1.5 if body.get("enable_hr") else 1))
        image = Image.new("RGB", (side, side), (digest.digest()[0],) * 3)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        info = {"seed": body["seed"], "extra_generation_params": params}
        return {"images": [base64.b64encode(buffer.getvalue()).decode()], "parameters": body, "info": json.dumps(info)}


@pytest.fixture
def webui():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeWebUI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    FakeWebUI.history_leaks = FakeWebUI.broken_controlnet = FakeWebUI.reference_only = False
    FakeWebUI.parser = None
    FakeWebUI.garments_sent = []


def _run(url, capsys, *extra):
    from lib_anydressing.__main__ import main

    code = main(["selftest", "--url", url, "--size", "32", "--timeout", "20", *extra])
    return code, capsys.readouterr().out


def test_all_checks_pass_on_a_webui_that_behaves(webui, capsys):
    started = time.perf_counter()
    code, out = _run(webui, capsys, "--json")
    report = json.loads(out)
    assert code == 0, out
    statuses = {c["name"]: c["status"] for c in report["checks"]}
    assert statuses.pop("controlnet") == "SKIP"  # no ControlNet routes here
    assert statuses.pop("dress a photo") == "SKIP"  # no clothes parser
    assert set(statuses.values()) == {"PASS"} and "interrupt" in statuses and "model untouched" in statuses
    assert report["timings"]["ratio_warm"] > 0 and time.perf_counter() - started < 15


def test_features_that_depend_on_history_fail_with_what_to_do(webui, capsys):
    FakeWebUI.history_leaks = True
    code, out = _run(webui, capsys)
    assert code == 1
    failed = [line for line in out.splitlines() if line.strip().startswith("FAIL")]
    assert any("determinism" in line for line in failed) and "what to do" in out


def test_a_controlnet_that_fails_by_itself_is_skipped_and_the_rest_still_reported(webui, capsys):
    FakeWebUI.broken_controlnet = True
    code, out = _run(webui, capsys, "--json")
    statuses = {c["name"]: (c["status"], c["detail"]) for c in json.loads(out)["checks"]}
    assert code == 0 and statuses["controlnet"][0] == "SKIP" and "500" in statuses["controlnet"][1]
    assert statuses["model untouched"][0] == "PASS"


def test_timed_rounds_send_unseen_garments_then_the_same_again_and_time_reference_only(webui, capsys):
    FakeWebUI.reference_only = True
    code, out = _run(webui, capsys, "--json", "--repeats", "2")
    timings = json.loads(out)["timings"]
    assert code == 0
    assert {"dressed_cold_s", "dressed_warm_s", "reference_only_s", "ratio_reference_only"} <= set(timings)
    assert timings["rounds"] == 2
    sent = FakeWebUI.garments_sent
    once_seen = [g for g in set(sent) if sent.count(g) == 2 and sent[sent.index(g) + 1] == g]
    assert len(once_seen) == 2  # each round: a cold request with new garments, then the same request warm
    _, table = _run(webui, capsys)  # one round: the table says its figures are noisy
    assert "(one round: noisy" in next(line for line in table.splitlines() if line.strip().startswith("time:"))


@pytest.mark.parametrize(("parser", "status"), [("keeps", "PASS"), ("repaints", "FAIL")])
def test_photo_check_needs_the_mask_its_preview_and_the_photo_kept_outside(webui, capsys, parser, status):
    FakeWebUI.parser = parser
    code, out = _run(webui, capsys, "--json")
    check = next(c for c in json.loads(out)["checks"] if c["name"] == "dress a photo")
    assert check["status"] == status, check
    assert code == (0 if status == "PASS" else 1)
