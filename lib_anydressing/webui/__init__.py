"""The WebUI adapter: the only part of lib_anydressing that talks to the WebUI: A1111's and Forge's
`modules.*` (env.py, ui.py, lora_training.py) and Forge's own `backend.*` (env.py, forge.py), each
imported inside the functions that need it, so the rest is importable and tested without a WebUI."""
