"""Garment LoRA: train a kohya-format LoRA from a few photos of one garment, for `<lora:name:1>` in the WebUI."""
