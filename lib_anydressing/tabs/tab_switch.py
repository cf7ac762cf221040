"""Browser code run after a Send button: the chosen target's WebUI tab switch (switch_to_txt2img() and the
like), by the label chosen in the dropdown; the WebUI's switch_to_* may be absent (standalone)."""

from __future__ import annotations

import json


def switch_tab_js(calls: dict[str, str]) -> str:
    """A js function of the chosen label that runs `calls[label]`, if any, and returns no outputs."""
    table = json.dumps(calls)
    return (
        "(label) => { const call = " + table + "[label]; if (call) { try { new Function(call)(); }"
        " catch (e) { console.warn(e); } } return []; }"
    )
