"""Training: garment LoRAs for the WebUI (kohya format)."""
