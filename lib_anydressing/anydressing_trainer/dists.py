"""DISTS (Ding et al. 2020, "Image Quality Assessment: Unifying Structure and Texture Similarity"),
the perceptual distance of GTL's L_perc, on torchvision's own VGG16 class.

Written from the paper: the image (in [0, 1]; VGG16 alone sees it ImageNet-normalised) and the outputs of
VGG16's five stages (relu1_2 ... relu5_3, its max poolings replaced by L2 pooling over a 3x3 Hann window,
stride 2) give 1 + 64 + 128 + 256 + 512 + 512 = 1475 feature maps. For each map j, over its spatial positions,
    texture   l_j = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1)
    structure s_j = (2 cov_xy + c2) / (var_x + var_y + c2)
and D(x, y) = 1 - sum_j (alpha_j l_j + beta_j s_j), with sum(alpha) + sum(beta) = 1.

Weights come from local files only (nothing is downloaded): VGG16 in torchvision's state-dict layout
(`features.<i>.weight/bias`; `classifier.*` is ignored), and DISTS's learned alpha/beta from a file with
tensors `alpha` and `beta` of 1475 values each. The alpha/beta file is, in this order:
1. the `dists_weights` file the user gives;
2. torchmetrics' packaged copy (`torchmetrics/functional/image/dists_models/weights.pt`, torchmetrics >= 1.7):
   a well-kept library (pytorch_lightning, which the WebUI installs, depends on it), so preferred;
3. the PyPI package `DISTS_pytorch`'s copy (`DISTS_pytorch/weights.pt`), the authors' own release.
Packaged files are located without importing their package and read like any other (tensors only,
`weights_only`). With none of them every map gets the same weight (alpha_j = beta_j = 1 / 2950): still a
distance between texture statistics, but not the one the paper fitted to human judgements.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..files.weights import WeightsFileError, load_tensors

CHANNELS = (3, 64, 128, 256, 512, 512)
N_MAPS = sum(CHANNELS)
# Slices of torchvision's vgg16().features per stage; the max pooling before stages 2-5 is replaced.
_STAGES = ((0, 4), (5, 9), (10, 16), (17, 23), (24, 30))
_C1 = _C2 = 1e-6
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class DISTSWeightsError(WeightsFileError):
    """A VGG16 or alpha/beta file that cannot be used, with a message meant for the user."""


class L2Pool(nn.Module):
    """sqrt(g * x^2) per channel, g a normalised 3x3 Hann window, stride 2 (anti-aliased downsampling)."""

    def __init__(self) -> None:
        super().__init__()
        taps = torch.tensor([0.5, 1.0, 0.5])
        window = taps[:, None] * taps[None, :]
        self.register_buffer("window", (window / window.sum())[None, None], persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        g = self.window.expand(x.shape[1], 1, 3, 3)
        return (F.conv2d(x * x, g, stride=2, padding=1, groups=x.shape[1]) + 1e-12).sqrt()


class DISTS(nn.Module):
    """D(x, y) per image for x, y (B, 3, H, W) in [-1, 1]; frozen, differentiable in its inputs."""

    def __init__(self, vgg_state: dict[str, Tensor], alpha: Tensor | None = None, beta: Tensor | None = None) -> None:
        super().__init__()
        from torchvision.models import vgg16

        with torch.device("meta"):  # no random init of weights about to be replaced (VGG16 has 138M)
            features = vgg16(weights=None).features
        wanted = features.state_dict()
        given = {k.removeprefix("features."): v for k, v in vgg_state.items() if k.startswith("features.")}
        missing = sorted(set(wanted) - set(given))
        if missing:
            raise DISTSWeightsError(
                f"the VGG16 weights lack {len(missing)} tensors (e.g. features.{missing[0]}): "
                "expected torchvision's vgg16 state dict"
            )
        bad = [k for k in wanted if given[k].shape != wanted[k].shape]
        if bad:
            raise DISTSWeightsError(f"VGG16 tensor features.{bad[0]} has shape {tuple(given[bad[0]].shape)}")
        features.load_state_dict({k: given[k].float() for k in wanted}, assign=True)
        self.stages = nn.ModuleList(
            nn.Sequential(*([L2Pool()] if i else []), *features[start:end]) for i, (start, end) in enumerate(_STAGES)
        )
        self.fitted = alpha is not None and beta is not None  # False: uniform alpha/beta
        if not self.fitted:
            alpha = beta = torch.ones(N_MAPS)
        alpha, beta = alpha.flatten().float(), beta.flatten().float()
        if alpha.numel() != N_MAPS or beta.numel() != N_MAPS:
            raise DISTSWeightsError(f"DISTS alpha/beta must have {N_MAPS} values each, got {alpha.numel()}")
        if (alpha < 0).any() or (beta < 0).any():
            raise DISTSWeightsError("DISTS alpha/beta must be non-negative")
        total = alpha.sum() + beta.sum()
        self.register_buffer("alpha", alpha / total)
        self.register_buffer("beta", beta / total)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def feature_maps(self, x: Tensor) -> list[Tensor]:
        """The image in [0, 1] and the five stage outputs. The zeroth map is the image itself, not its
        ImageNet-normalised copy fed to VGG: as in the authors' code (and torchmetrics'), which alpha/beta
        were fitted with."""
        unit = (x + 1) / 2
        h = (unit - self.mean) / self.std
        maps = [unit]
        for stage in self.stages:
            h = stage(h)
            maps.append(h)
        return maps

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Always float32, autocast off: in fp16 the L2 pooling's 1e-12 rounds to 0 (sqrt(0) -> NaN gradient)
        and x^2 overflows, and in bf16 the statistics lose most of their digits."""
        with torch.autocast(x.device.type, enabled=False):
            return self._distance(x.float(), y.float())

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        similarity = x.new_zeros(x.shape[0])
        weights = zip(self.alpha.split(CHANNELS), self.beta.split(CHANNELS), strict=True)
        for fx, fy, (a, b) in zip(self.feature_maps(x), self.feature_maps(y), weights, strict=True):
            mx, my = fx.mean((2, 3)), fy.mean((2, 3))
            dx, dy = fx - mx[..., None, None], fy - my[..., None, None]
            vx, vy = (dx * dx).mean((2, 3)), (dy * dy).mean((2, 3))
            cov = (dx * dy).mean((2, 3))  # centred first: E[xy] - mx my cancels where the means dominate
            texture = (2 * mx * my + _C1) / (mx * mx + my * my + _C1)
            structure = (2 * cov + _C2) / (vx + vy + _C2)
            similarity = similarity + (texture * a).sum(1) + (structure * b).sum(1)
        return 1 - similarity


# Packages shipping DISTS's alpha/beta, first found wins: (package, file inside its directory).
PACKAGED_ALPHA_BETA = (
    ("torchmetrics", "functional/image/dists_models/weights.pt"),
    ("DISTS_pytorch", "weights.pt"),
)


def _package_file(package: str, relative: str) -> Path | None:
    """`relative` inside an installed package's directory, found without importing the package."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):  # a broken install counts as absent
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def packaged_alpha_beta() -> Path | None:
    """The first alpha/beta file of PACKAGED_ALPHA_BETA whose package is installed (see module doc)."""
    for package, relative in PACKAGED_ALPHA_BETA:
        path = _package_file(package, relative)
        if path is not None:
            return path
    return None


def load_dists(vgg16_path: str | Path, alpha_beta_path: str | Path | None = None) -> DISTS:
    """DISTS from local files; alpha/beta default to a packaged file, else uniform (see module doc)."""
    vgg = load_tensors(vgg16_path, error=DISTSWeightsError, wrappers=("state_dict",))
    path = alpha_beta_path or packaged_alpha_beta()
    if path is None:
        return DISTS(vgg)
    ab = load_tensors(path, error=DISTSWeightsError)
    if "alpha" not in ab or "beta" not in ab:
        raise DISTSWeightsError(f"'{Path(path).name}' has no 'alpha' and 'beta' tensors")
    return DISTS(vgg, ab["alpha"], ab["beta"])
