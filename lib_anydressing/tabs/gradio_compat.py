"""The differences between gradio 3 (A1111 1.10) and gradio 4 (Forge) that the tabs meet."""

from __future__ import annotations

import gradio as gr

GRADIO_4 = int(gr.__version__.split(".")[0]) >= 4


def js_argument(code: str) -> dict[str, str]:
    """Browser-side code for an event: gradio 3 calls the argument `_js`, gradio 4 `js` (and rejects `_js`,
    which only Forge's own shim rewrites)."""
    return {"js" if GRADIO_4 else "_js": code}
