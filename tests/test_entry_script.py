"""scripts/anydressing.py itself, loaded as the WebUI loads it, with the `modules` surface it touches
mirrored from A1111 1.10.1 (82a973c0): modules/scripts.py (Script, AlwaysVisible, scripts_data) and
modules/script_callbacks.py (the on_* registration functions). Each hook must reach the controller."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest

from lib_anydressing.webui.controller import Controller

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "anydressing.py"
CALLBACKS = ("on_before_ui", "on_cfg_denoiser", "on_cfg_denoised", "on_cfg_after_cfg", "on_ui_settings",
             "on_script_unloaded")  # fmt: skip


@pytest.fixture
def loaded(monkeypatch):
    """The script module, and the callbacks it registered by name."""
    registered: dict[str, list] = {name: [] for name in CALLBACKS}
    scripts = types.ModuleType("modules.scripts")
    scripts.Script = type("Script", (), {})
    scripts.AlwaysVisible = object()
    scripts.scripts_data = []
    callbacks = types.ModuleType("modules.script_callbacks")
    for name in CALLBACKS:
        setattr(callbacks, name, registered[name].append)
    modules = types.ModuleType("modules")
    modules.scripts, modules.script_callbacks = scripts, callbacks
    shared = types.SimpleNamespace(opts=types.SimpleNamespace(anydressing_max_slots=3))
    modules.shared = shared
    for name, module in (("modules", modules), ("modules.scripts", scripts), ("modules.script_callbacks", callbacks),
                         ("modules.shared", shared)):  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    spec = importlib.util.spec_from_file_location("anydressing_entry", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module, registered


def test_each_webui_hook_reaches_the_controller(loaded, monkeypatch):
    module, registered = loaded
    assert isinstance(module.controller, Controller)
    calls = []
    for name in ("process", "process_batch", "before_sampling", "finish"):
        monkeypatch.setattr(module.controller, name, lambda *a, name=name: calls.append((name, a)))
    script = module.AnyDressingScript()
    assert script.show(False) is sys.modules["modules.scripts"].AlwaysVisible and script.title() == "AnyDressing"
    unet = object()
    p = types.SimpleNamespace(sd_model=types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=unet)))
    p.anydressing_xyz = {"strength": 0.3}  # an X/Y/Z cell's value wins over the UI's
    script.process(p, {"enabled": True, "garments": [], "strength": 0.9})
    script.process_batch(p, batches=1)
    script.process_before_every_sampling(p)
    script.postprocess(p, object())
    assert [name for name, _ in calls] == ["process", "process_batch", "before_sampling", "finish"]
    (got_p, opts) = calls[0][1]
    assert got_p is p and opts.enabled and opts.strength == 0.3
    assert calls[3][1] == (unet,)  # the UNet that sampled, so the dressing comes off it
    assert all(len(functions) == 1 for functions in registered.values())
    assert registered["on_cfg_denoiser"][0] == module.controller.on_cfg_denoiser
    assert registered["on_cfg_denoised"][0] == module.controller.on_cfg_denoised
    assert registered["on_cfg_after_cfg"][0] == module.controller.on_cfg_after_cfg
    registered["on_script_unloaded"][0]()
    assert calls[-1] == ("finish", ())
