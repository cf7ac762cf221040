"""CLIP-AS: LAION's "improved aesthetic predictor" head on CLIP ViT-L/14 image embeddings.

The public weights (e.g. sac+logos+ava1-l14-linearMSE.pth) are a state dict of a plain stack of
linear layers, 768 -> 1024 -> 128 -> 64 -> 16 -> 1, with dropouts (0.2, 0.2, 0.1) between the first
four and no activation, so its keys are layers.{0,2,4,6,7}.{weight,bias}. It was trained on the
L2-normalised image embedding of OpenAI's CLIP ViT-L/14 (`encode_image`, i.e. transformers'
`get_image_features`: the projected 768-d embedding); it scores roughly 1-10.
"""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F
from torch import Tensor, nn

from ..files.weights import WeightsFileError, load_tensors


class AestheticLoadError(WeightsFileError):
    """An aesthetic predictor file that cannot be used, with a message meant for the user."""


class AestheticHead(nn.Module):
    def __init__(self, dim: int = 768) -> None:
        super().__init__()
        self.dim = dim
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        """(B, dim) CLIP image embeddings, normalised here whatever their length -> (B,) scores."""
        return self.layers(F.normalize(embeddings.float(), dim=-1)).squeeze(-1)


def load_aesthetic_head(path: Path | str) -> AestheticHead:
    state_dict = load_tensors(path, error=AestheticLoadError, wrappers=("state_dict",))
    first = state_dict.get("layers.0.weight")
    if first is None or first.ndim != 2:
        raise AestheticLoadError(f"'{Path(path).name}' is not an improved-aesthetic-predictor state dict")
    head = AestheticHead(first.shape[1])
    try:
        head.load_state_dict(state_dict)
    except RuntimeError as e:
        detail = " ".join(str(e).split())[:300]
        raise AestheticLoadError(f"'{Path(path).name}' has another layer layout: {detail}") from e
    return head.float().eval().requires_grad_(False)
