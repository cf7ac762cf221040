"""An image's generation parameters in A1111's text form, stored in the PNG the way the WebUI stores them, so
PNG Info / drag-and-drop onto txt2img fills the same settings (AnyDressing's entries included).

The form, as A1111 1.10.1 (82a973c0) writes it in processing.create_infotext: the prompt, a
"Negative prompt: " line when there is one, then one line of "Key: value" entries joined by ", ", a value
holding ',', ':' or a newline written as a JSON string (infotext_utils.quote). It goes in the PNG's "parameters"
text chunk (images.save_image_with_geninfo).
"""

from __future__ import annotations

import io
import json

from PIL import Image
from PIL.PngImagePlugin import PngInfo


def quote(value: object) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else text


def parameters_text(prompt: str, negative_prompt: str, entries: dict[str, object]) -> str:
    line = ", ".join(f"{key}: {quote(value)}" for key, value in entries.items() if value is not None)
    negative = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def png_bytes(image: Image.Image, parameters: str) -> bytes:
    info = PngInfo()
    info.add_text("parameters", parameters)
    out = io.BytesIO()
    image.save(out, format="PNG", pnginfo=info)
    return out.getvalue()
