"""CLIP from a local folder (config.json + weights + processor files), never from a model hub.

The folder is what `save_pretrained` writes for a transformers CLIPModel and its CLIPProcessor, e.g.
a copy of openai/clip-vit-large-patch14: config.json, model.safetensors (or pytorch_model.bin),
preprocessor_config.json and the tokenizer files. The weights are read by `pretrained.load_pretrained`
(safetensors, or a pickle with weights_only=True), never with a plain torch.load.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from transformers import CLIPModel, CLIPProcessor

from ..files.pretrained import load_pretrained
from ..files.weights import WeightsFileError


class ClipLoadError(WeightsFileError):
    """A CLIP folder that cannot be used, with a message meant for the user."""


def load_clip_model(folder: Path) -> CLIPModel:
    """The CLIPModel of `folder`, in eval mode, on the CPU, float32."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ClipLoadError(f"'{folder}' has no config.json: give the folder of a saved transformers CLIPModel")
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise ClipLoadError(f"'{folder / 'config.json'}' is not a readable JSON object") from e
    if model_type != "clip":  # e.g. an image encoder alone (clip_vision_model): CLIP-T needs the text side too
        raise ClipLoadError(f"'{folder}' holds a '{model_type}' model, not a full CLIP (text and image)")
    return load_pretrained(folder, CLIPModel, error=ClipLoadError)


class ClipEncoder:
    """Unit-length CLIP text and image embeddings, so a dot product is the cosine."""

    def __init__(self, model: CLIPModel, processor: CLIPProcessor, device: str = "cpu", name: str = "") -> None:
        self.model = model.to(device)
        self.processor = processor
        self.device = device
        self.name = name

    @classmethod
    def from_folder(cls, folder: Path | str, device: str = "cpu") -> ClipEncoder:
        folder = Path(folder)
        model = load_clip_model(folder)
        try:
            processor = CLIPProcessor.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ClipLoadError(
                f"'{folder}' lacks the CLIP processor files (tokenizer, preprocessor_config.json)"
            ) from e
        return cls(model, processor, device, folder.name)

    @property
    def dim(self) -> int:
        return self.model.config.projection_dim

    @torch.no_grad()
    def texts(self, prompts: list[str]) -> Tensor:
        """(B, D): prompts longer than the text model's context are truncated, as CLIP was trained."""
        limit = self.model.config.text_config.max_position_embeddings
        tokens = self.processor.tokenizer(prompts, padding=True, truncation=True, max_length=limit, return_tensors="pt")
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return F.normalize(features.float(), dim=-1).cpu()

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> Tensor:
        """(B, D): the processor's own resize and centre crop, as CLIP scores are usually taken."""
        pixels = self.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt")
        features = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        return F.normalize(features.float(), dim=-1).cpu()
