"""The WebUI adapter: the only part of lib_anydressing that talks to the WebUI (`modules.*`, in env.py)."""
