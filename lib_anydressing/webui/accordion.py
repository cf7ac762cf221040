"""The AnyDressing accordion of txt2img/img2img. Builds components only: cheap and side-effect free,
because the API calls `ui()` too, to read the defaults."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..garments import CATEGORIES
from ..generation.infotext import pasted
from ..generation.model_files import TRAINING_FREE, describe_model, list_models
from ..generation.options import DressingArgs, GarmentArgs, option, script_arg_names


def model_choices(dirs) -> list[str]:
    return [TRAINING_FREE, *list_models(dirs)]


SLOT_IMAGES: dict[str, list[Any]] = {}  # "txt2img"/"img2img" -> garment image components, for Send buttons
SLOT_CATEGORIES: dict[str, list[Any]] = {}  # the same for the category dropdowns (Split outfit sends both)


def build(
    elem_id, n_slots: int, dirs, refresh, tab: str = "txt2img", parser_status: str = ""
) -> tuple[list[Any], list[tuple[Any, str]]]:
    """(components in `script_arg_names` order, infotext fields). The garment images and categories are
    also recorded in SLOT_IMAGES[tab] / SLOT_CATEGORIES[tab], so the Segment tab (built later) can send
    cutouts to them. The photo-mask options show in img2img only (`parser_status` says which parser)."""
    from modules.ui_components import InputAccordion, ToolButton

    components: dict[str, Any] = {}
    with InputAccordion(False, label=option(DressingArgs, "enabled")["label"], elem_id=elem_id("enabled")) as enabled:
        components["enabled"] = enabled
        with gr.Row():
            label = option(DressingArgs, "model")["label"]
            model = gr.Dropdown(  # a pasted model that is not installed stays shown, and is reported when used
                model_choices(dirs), value=TRAINING_FREE, label=label, elem_id=elem_id("model"), allow_custom_value=True
            )
            refresh_button = ToolButton("\U0001f504", elem_id=elem_id("refresh"), tooltip="Refresh the model list")
            refresh_button.click(lambda: gr.update(choices=refresh()), outputs=[model])
            components["model"] = model
        details = gr.Markdown(describe_model(TRAINING_FREE, dirs)[1], elem_id=elem_id("model_details"))
        with gr.Row():
            for name in ("strength", "start", "end"):
                components[name] = _slider(DressingArgs, name, elem_id=elem_id(name))
        # .input, not .change: a pasted infotext sets the model and its strength; the default must not win
        model.input(lambda name: _describe(name, dirs), inputs=[model], outputs=[components["strength"], details])
        with gr.Row():
            for name in ("resolution", "detail"):
                components[name] = _slider(DressingArgs, name, elem_id=elem_id(name))
            pool = option(DressingArgs, "fine_pool")
            components["fine_pool"] = gr.Radio(
                [str(s) for s in pool["choices"]], value=str(pool["default"]), label=pool["label"],
                elem_id=elem_id("fine_pool"),
            )  # fmt: skip
        with gr.Row():
            components["garment_guidance_enabled"] = gr.Checkbox(
                False, label="Garment guidance (separate scale, one more UNet row per image)", elem_id=elem_id("gg")
            )
            components["garment_guidance"] = _slider(DressingArgs, "garment_guidance", elem_id=elem_id("gg_scale"))
        with gr.Row(visible=tab == "img2img"):  # txt2img has them too, hidden: one argument order for both
            for name in ("mask_from_garments", "mask_face_hair"):
                spec = option(DressingArgs, name)
                components[name] = gr.Checkbox(spec["default"], label=spec["label"], elem_id=elem_id(name))
            components["mask_grow"] = _slider(DressingArgs, "mask_grow", elem_id=elem_id("mask_grow"))
        gr.Markdown(parser_status, visible=tab == "img2img", elem_id=elem_id("parser_status"))
        with gr.Tabs():
            for i in range(n_slots):
                garment = f"Garment {i + 1}"  # in every label: A1111 saves UI defaults by label (ui-config.json)
                with gr.Tab(garment):
                    with gr.Row():
                        components[f"slot{i}_image"] = gr.Image(
                            label=f"{garment} (RGBA cutouts: alpha is the mask)",
                            type="pil",
                            image_mode="RGBA",
                            elem_id=elem_id(f"slot{i}_image"),
                        )
                        components[f"slot{i}_mask"] = gr.Image(
                            label=f"{garment} mask (optional)", type="pil", elem_id=elem_id(f"slot{i}_mask")
                        )
                    with gr.Row():
                        components[f"slot{i}_category"] = gr.Dropdown(
                            list(CATEGORIES),
                            value=CATEGORIES[i % 2],  # tops and bottoms alternate: the usual outfit
                            label=f"{garment} {option(GarmentArgs, 'category')['label']}",
                            elem_id=elem_id(f"slot{i}_category"),
                        )
                        components[f"slot{i}_weight"] = _slider(
                            GarmentArgs, "weight", elem_id=elem_id(f"slot{i}_weight"), prefix=f"{garment} "
                        )
                        region = option(GarmentArgs, "region")
                        components[f"slot{i}_region"] = gr.Radio(
                            list(region["choices"]), value=region["default"], label=f"{garment} {region['label']}",
                            elem_id=elem_id(f"slot{i}_region"),
                        )  # fmt: skip
                    with gr.Row():
                        for corner in option(GarmentArgs, "box")["box"]:
                            components[f"slot{i}_box_{corner}"] = gr.Number(
                                float(corner.endswith("1")),  # the whole image: 0, 0, 1, 1
                                label=f"{garment} box {corner}",
                                elem_id=elem_id(f"slot{i}_{corner}"),
                            )
    SLOT_IMAGES[tab] = [components[f"slot{i}_image"] for i in range(n_slots)]
    SLOT_CATEGORIES[tab] = [components[f"slot{i}_category"] for i in range(n_slots)]
    ordered = [components[name] for name in script_arg_names(n_slots)]
    fields = [(component, _paste(name, n_slots)) for name, component in components.items() if _pastable(name)]
    return ordered, fields


def _slider(model, name: str, *, elem_id: str, prefix: str = "") -> Any:
    """The field's slider: its declared UI range and step, starting at its UI value or default."""
    spec = option(model, name)
    low, high, step, *start = spec["ui"]
    value = start[0] if start else spec["default"]
    return gr.Slider(low, high, value, step=step, label=prefix + spec["label"], elem_id=elem_id)


def _describe(name: str, dirs) -> tuple[Any, str]:
    strength, text = describe_model(name, dirs)
    return (gr.update() if strength is None else strength), text


def _pastable(name: str) -> bool:
    return not name.endswith(("_image", "_mask"))


def _paste(name: str, n_slots: int):
    """A1111 calls this with the pasted parameters; None (a field the infotext lacks) keeps the value."""

    def value(params: dict) -> Any:
        return pasted(params, n_slots).get(name)

    return value
