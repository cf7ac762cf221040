"""The AnyDressing engine: GarmentsNet feature extraction and Dressing-Attention, free of any WebUI import.

Typical use::

    model = load_checkpoint(path)            # or AnyDressingModel.training_free()
    features = model.garments_net(unet).extract(garment_latents)
    with Dresser(unet, features, model.projections, strength=0.7) as dresser:
        dresser.cond_rows = [0]              # rows that see the garments; the rest stay plain
        ...sample...
"""

from .checkpoint import AnyDressingModel, CheckpointError, ModelInfo, load_checkpoint, save_checkpoint
from .dresser import Dresser, remove_dressing
from .garments_net import GarmentFeatures, GarmentsNet
from .gfe_lora import GarmentLoRA
from .projections import DressingProjections
from .unet_layers import architecture, self_attention_layers

__all__ = [
    "AnyDressingModel",
    "CheckpointError",
    "Dresser",
    "DressingProjections",
    "GarmentFeatures",
    "GarmentLoRA",
    "GarmentsNet",
    "ModelInfo",
    "architecture",
    "load_checkpoint",
    "remove_dressing",
    "save_checkpoint",
    "self_attention_layers",
]
