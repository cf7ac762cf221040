"""The AnyDressing accordion built with A1111's own gradio (3.41.2): its values line up with the script's args.

`modules.ui_components` cannot be installed; the two classes used are mirrored from A1111 1.10:
InputAccordion is a hidden gr.Checkbox that opens a gr.Accordion, ToolButton a small gr.Button.
"""

from __future__ import annotations

import sys
import types

import pytest
from PIL import Image

gr = pytest.importorskip("gradio")

from lib_anydressing.generation.model_files import TRAINING_FREE  # noqa: E402
from lib_anydressing.generation.options import from_script_args, script_arg_names  # noqa: E402


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id")
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        self.accordion = gr.Accordion(
            **{**kwargs, "elem_id": self.accordion_id, "label": kwargs.get("label", "Accordion"), "open": value}
        )

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"


class ToolButton(gr.Button):
    def __init__(self, *args, **kwargs):
        kwargs.pop("tooltip", None)  # A1111 adds `tooltip` to gradio components; plain 3.41.2 lacks it
        super().__init__(*args, elem_classes=["tool"], **kwargs)

    def get_block_name(self):
        return "button"


@pytest.fixture
def ui(monkeypatch, tmp_path):
    fake = types.ModuleType("modules.ui_components")
    fake.InputAccordion, fake.ToolButton = InputAccordion, ToolButton
    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))
    monkeypatch.setitem(sys.modules, "modules.ui_components", fake)
    from lib_anydressing.webui import accordion as ui

    (tmp_path / "mine.safetensors").write_bytes(b"not a model")
    with gr.Blocks():
        components, fields = ui.build(lambda name: f"script_anydressing_{name}", 3, [tmp_path], lambda: [])
    return ui, components, fields


def test_components_follow_the_script_argument_order(ui):
    module, components, _ = ui
    names = script_arg_names(3)
    assert len(components) == len(names)
    defaults = [c.value for c in components]  # what the API fills in for missing args
    opts = from_script_args(defaults, 3)
    assert not opts.enabled and not opts.problems and opts.model == TRAINING_FREE
    values = dict(zip(names, defaults, strict=True))
    values.update(enabled=True, slot1_image=Image.new("RGB", (16, 16)))
    opts = from_script_args([values[n] for n in names], 3)
    assert opts.usable and len(opts.slots) == 1 and opts.slots[0].category == "lower"
    assert module.model_choices([]) == [TRAINING_FREE]


def test_infotext_fields_paste_values_the_components_accept(ui):
    _, components, fields = ui
    params = {"AnyDressing model": "mine [01234567]", "AnyDressing strength": "0.6", "AnyDressing range": "0.2-0.8",
              "AnyDressing garments": "1:dress:ab:1.3:box 0 0 1 0.5"}  # fmt: skip
    pasted = {c.elem_id: f(params) for c, f in fields}
    assert pasted["script_anydressing_model"] == "mine"
    assert pasted["script_anydressing_enabled-checkbox"] is True
    assert pasted["script_anydressing_slot0_category"] == "dress" and pasted["script_anydressing_slot0_y1"] == 0.5
    assert pasted["script_anydressing_slot1_category"] is None  # not in the infotext: left as it is
    assert (pasted["script_anydressing_gg"], pasted["script_anydressing_gg_scale"]) == (False, None)
    guided = {c.elem_id: f({**params, "AnyDressing garment guidance": "2.5"}) for c, f in fields}
    assert (guided["script_anydressing_gg"], guided["script_anydressing_gg_scale"]) == (True, 2.5)
    assert not any(c.elem_id.endswith(("_image", "_mask")) for c, _ in fields)
    for written in ("training-free", "training-free (no weights) [00000000]"):  # aliases: the dropdown's own value
        model = {c.elem_id: f({**params, "AnyDressing model": written}) for c, f in fields}["script_anydressing_model"]
        assert model == TRAINING_FREE
    dropdown = next(c for c, _ in fields if c.elem_id == "script_anydressing_model")
    assert dropdown.allow_custom_value  # a pasted model that is not installed stays visible, then is reported


def test_model_details_show_origin_and_problems(tmp_path):
    from lib_anydressing.generation.model_files import describe_model

    strength, text = describe_model(TRAINING_FREE, [])
    assert strength == 1.0 and "training-free" in text
    (tmp_path / "broken.safetensors").write_bytes(b"xx")
    strength, text = describe_model("broken", [tmp_path])
    assert strength is None and "not a readable safetensors file" in text


@pytest.mark.slow  # a real browser
def test_cutout_sent_from_the_segment_tab_lands_in_a_garment_slot(ui, tmp_path):
    """A1111 builds each tab as its own Blocks and renders them into one page; so does this test."""
    import socket

    from browser import CHROMIUM, browser_page, upload_and_click_garment, write_photo

    pytest.importorskip("playwright.sync_api")
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed")
    from lib_anydressing.tabs.app import build_tabs
    from lib_anydressing.tabs.segment_tab import SendTarget
    from lib_anydressing.webui import accordion as script_ui

    with gr.Blocks() as txt2img:
        script_ui.build(lambda name: f"script_txt2img_anydressing_{name}", 2, [tmp_path], lambda: [], "txt2img")
    targets = [SendTarget(f"txt2img garment {i + 1}", [c]) for i, c in enumerate(script_ui.SLOT_IMAGES["txt2img"])]
    tab = build_tabs(lambda: [], tmp_path / "out", targets)
    with gr.Blocks() as page_blocks, gr.Tabs():
        with gr.Tab("txt2img"):
            txt2img.render()
        with gr.Tab("AnyDressing"):
            tab.render()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    page_blocks.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True)
    write_photo(tmp_path / "photo.png")
    try:
        with browser_page(f"http://127.0.0.1:{port}/", height=1400) as page:
            page.locator("button", has_text="AnyDressing").first.click()  # gradio 3 tabs are buttons
            upload_and_click_garment(page, tmp_path / "photo.png")
            page.locator("#anydressing_segment_send_to input").click()
            page.locator("#anydressing_segment_send_to li", has_text="txt2img garment 2").click()
            page.get_by_role("button", name="Send", exact=True).click()
            slot = page.locator("#script_txt2img_anydressing_slot1_image img")
            slot.wait_for(state="attached", timeout=30000)
            assert page.locator("#script_txt2img_anydressing_slot0_image img").count() == 0
    finally:
        page_blocks.close()


# A1111's ui_loadsave (v1.10.1) restated: it walks the tab's block tree; a leaf with a label is saved
# under "<tab>/<label>/<field>" (a labelless Button under its value; elem_id is used only for Tabs),
# prefixed "customscript/<script file>/" for the components a script's ui() returned. The first
# component to claim a key stores its value there; every later one with that key gets that value.
_SAVED_FIELDS = {
    gr.Slider: ("visible", "value", "minimum", "maximum", "step"),
    gr.Radio: ("visible", "value"),
    gr.Checkbox: ("visible", "value"),
    gr.Textbox: ("visible", "value"),
    gr.Number: ("visible", "value"),
    gr.Dropdown: ("visible", "value"),
    gr.Button: ("visible",),
    ToolButton: ("visible",),
    InputAccordion: ("value",),
}


def _load_ui_config(block, tab: str, settings: dict) -> dict[str, set[int]]:
    """Apply `settings` (the ui-config.json) as A1111 does; returns each key's components (by id)."""
    owners: dict[str, set[int]] = {}

    def add(path: str, x) -> None:
        for name in _SAVED_FIELDS.get(type(x), ()):
            key = f"{path}/{name}"
            if getattr(x, "custom_script_source", None) is not None:
                key = f"customscript/{x.custom_script_source}/{key}"
            owners.setdefault(key, set()).add(id(x))
            if key not in settings:
                settings[key] = getattr(x, name)
            elif name == "value" and not isinstance(x, InputAccordion):
                setattr(x, name, settings[key])

    def walk(x) -> None:
        if hasattr(x, "children"):
            for child in x.children:
                walk(child)
        elif getattr(x, "label", None) is not None:
            add(f"{tab}/{x.label}", x)
        elif isinstance(x, gr.Button) and x.value is not None:
            add(f"{tab}/{x.value}", x)

    walk(block)
    return owners


def test_each_slot_keeps_its_own_saved_ui_defaults(ui, tmp_path):
    from lib_anydressing.garments import CATEGORIES

    module = ui[0]
    with gr.Blocks() as blocks:
        components, _ = module.build(lambda name: f"script_txt2img_anydressing_{name}", 4, [tmp_path], lambda: [])
    for component in components:  # what scripts.create_script_ui_inner does with ui()'s result
        component.custom_script_source = "anydressing.py"
    settings: dict = {}
    owners = _load_ui_config(blocks, "txt2img", settings)
    shared = {key: len(ids) for key, ids in owners.items() if len(ids) > 1}
    assert not shared, f"components sharing a ui-config.json key: {shared}"
    values = dict(zip(script_arg_names(4), (c.value for c in components), strict=True))
    assert [values[f"slot{i}_category"] for i in range(4)] == [CATEGORIES[i % 2] for i in range(4)]
    labels = [c.label for c in components]  # the images too, though ui_loadsave does not save them
    assert len(set(labels)) == len(labels)

    slot1_category = components[script_arg_names(4).index("slot1_category")]
    settings[next(k for k, ids in owners.items() if ids == {id(slot1_category)} and k.endswith("/value"))] = "dress"
    with gr.Blocks() as again:  # the next start-up: a saved default reaches its own slot only
        components, _ = module.build(lambda name: f"script_txt2img_anydressing_{name}", 4, [tmp_path], lambda: [])
    for component in components:
        component.custom_script_source = "anydressing.py"
    _load_ui_config(again, "txt2img", settings)
    values = dict(zip(script_arg_names(4), (c.value for c in components), strict=True))
    assert [values[f"slot{i}_category"] for i in range(4)] == ["upper", "dress", "upper", "lower"]
