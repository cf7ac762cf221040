"""The AnyDressing accordion of txt2img/img2img. Builds components only: cheap and side-effect free,
because the API calls `ui()` too, to read the defaults."""

from __future__ import annotations

from typing import Any

import gradio as gr

from ..engine.token_pool import POOL_CHOICES
from ..garments import CATEGORIES
from ..generation.model_files import TRAINING_FREE, describe_model, list_models
from ..generation.options import REGIONS, script_arg_names
from .infotext import pasted


def model_choices(dirs) -> list[str]:
    return [TRAINING_FREE, *list_models(dirs)]


SLOT_IMAGES: dict[str, list[Any]] = {}  # "txt2img"/"img2img" -> garment image components, for Send buttons


def build(elem_id, n_slots: int, dirs, refresh, tab: str = "txt2img") -> tuple[list[Any], list[tuple[Any, str]]]:
    """(components in `script_arg_names` order, infotext fields). The garment images are also
    recorded in SLOT_IMAGES[tab], so the Segment tab (built later) can send cutouts to them."""
    from modules.ui_components import InputAccordion, ToolButton

    components: dict[str, Any] = {}
    with InputAccordion(False, label="AnyDressing", elem_id=elem_id("enabled")) as enabled:
        components["enabled"] = enabled
        with gr.Row():
            model = gr.Dropdown(model_choices(dirs), value=TRAINING_FREE, label="Model", elem_id=elem_id("model"))
            refresh_button = ToolButton("\U0001f504", elem_id=elem_id("refresh"), tooltip="Refresh the model list")
            refresh_button.click(lambda: gr.update(choices=refresh()), outputs=[model])
            components["model"] = model
        details = gr.Markdown(describe_model(TRAINING_FREE, dirs)[1], elem_id=elem_id("model_details"))
        with gr.Row():
            components["strength"] = gr.Slider(
                0.0, 2.0, 1.0, step=0.05, label="Strength (lambda)", elem_id=elem_id("strength")
            )
            components["start"] = gr.Slider(0.0, 1.0, 0.0, step=0.01, label="Start", elem_id=elem_id("start"))
            components["end"] = gr.Slider(0.0, 1.0, 1.0, step=0.01, label="End", elem_id=elem_id("end"))
        # .input, not .change: a pasted infotext sets the model and its strength; the default must not win
        model.input(lambda name: _describe(name, dirs), inputs=[model], outputs=[components["strength"], details])
        with gr.Row():
            components["resolution"] = gr.Slider(
                0, 1024, 0, step=64, label="Garment resolution (0: follow the image)", elem_id=elem_id("resolution")
            )
            components["detail"] = gr.Slider(
                0.25, 4.0, 1.0, step=0.25, label="Garment detail (with resolution 0)", elem_id=elem_id("detail")
            )
            components["fine_pool"] = gr.Radio(
                [str(s) for s in POOL_CHOICES], value="2", label="Pool finest-layer garment tokens (s x s)",
                elem_id=elem_id("fine_pool"),
            )  # fmt: skip
        with gr.Row():
            components["garment_guidance_enabled"] = gr.Checkbox(
                False, label="Garment guidance (separate scale, one more UNet row per image)", elem_id=elem_id("gg")
            )
            components["garment_guidance"] = gr.Slider(
                0.0, 10.0, 2.5, step=0.1, label="Garment guidance scale", elem_id=elem_id("gg_scale")
            )
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
                            value=CATEGORIES[i % 2],
                            label=f"{garment} category",
                            elem_id=elem_id(f"slot{i}_category"),
                        )
                        components[f"slot{i}_weight"] = gr.Slider(
                            0.0, 2.0, 1.0, step=0.05, label=f"{garment} weight", elem_id=elem_id(f"slot{i}_weight")
                        )
                        components[f"slot{i}_region"] = gr.Radio(
                            list(REGIONS), value="none", label=f"{garment} region", elem_id=elem_id(f"slot{i}_region")
                        )
                    with gr.Row():
                        for corner, default in (("x0", 0.0), ("y0", 0.0), ("x1", 1.0), ("y1", 1.0)):
                            components[f"slot{i}_box_{corner}"] = gr.Number(
                                default, label=f"{garment} box {corner}", elem_id=elem_id(f"slot{i}_{corner}")
                            )
    SLOT_IMAGES[tab] = [components[f"slot{i}_image"] for i in range(n_slots)]
    ordered = [components[name] for name in script_arg_names(n_slots)]
    fields = [(component, _paste(name, n_slots)) for name, component in components.items() if _pastable(name)]
    return ordered, fields


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
