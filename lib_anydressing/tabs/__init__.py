"""The AnyDressing tab's gradio UI, built by one function for the WebUI and for `python -m lib_anydressing ui`."""
