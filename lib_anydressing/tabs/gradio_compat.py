"""The differences between gradio 3 (A1111 1.10) and gradio 4 (Forge) that the tabs meet."""

from __future__ import annotations

import gradio as gr

GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


def js_argument(code: str) -> dict[str, str]:
    """Browser-side code for an event: gradio 3 calls the argument `_js`, gradio 4 `js` (and rejects `_js`,
    which only Forge's own shim rewrites)."""
    return {"js" if GRADIO_4 else "_js": code}


def plot_size(width: int, height: int) -> dict[str, int]:
    """A plot's size: gradio 3 takes width and height; gradio 4's plots fill their column and warn about
    `width` (4.40: "unexpected argument for LinePlot")."""
    return {"height": height} if GRADIO_4 else {"width": width, "height": height}
