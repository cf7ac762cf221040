"""The AnyDressing trainer (GarmentsNet, GFE LoRAs, Dressing-Attention projections: docs/method.md),
its dataset builder, losses and bench. Garment LoRAs for the WebUI are trained by `garment_lora`."""
