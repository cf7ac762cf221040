"""A LoRA on the UNet's transformer blocks (and optionally the CLIP text encoder), saved in kohya's
format so the WebUI's Lora extension (and other tools) load it with `<lora:name:1>` and no
"failed to match keys".

Targets are kohya's for SD1.x: every Linear and 1x1 Conv inside the UNet's transformer blocks
(proj_in, proj_out, attn1/attn2 q/k/v/out, the feed-forward), keyed `lora_unet_<diffusers module
path>`; in the text encoder every Linear of the attention and MLP of each layer (q/k/v/out_proj,
fc1/fc2), keyed `lora_te_<transformers module path>`. Each key has `.lora_down.weight`,
`.lora_up.weight` and `.alpha`. The LoRA runs as a forward patch on the user's modules and comes
off exactly; it is never merged into the weights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn

from ..sd.forward_patch import ForwardPatch
from ..sd.unet_keys import ldm_to_diffusers

TRANSFORMER_PARENTS = ("input_blocks", "middle_block", "output_blocks")
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")


def target_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """kohya name -> module, for every Linear / 1x1 Conv inside the UNet's SpatialTransformers."""
    targets = {}
    for name, module in unet.named_modules():
        parts = name.split(".")
        if parts[0] not in TRANSFORMER_PARENTS or not hasattr(module, "transformer_blocks"):
            continue
        for sub_name, sub in module.named_modules():
            is_linear = isinstance(sub, nn.Linear)
            is_pointwise = isinstance(sub, nn.Conv2d) and sub.kernel_size == (1, 1)
            if sub_name and (is_linear or is_pointwise):
                diffusers = ldm_to_diffusers(f"{name}.{sub_name}")
                targets["lora_unet_" + diffusers.replace(".", "_")] = sub
    return targets


def text_target_modules(text_encoder: nn.Module) -> dict[str, nn.Module]:
    """kohya name -> module, for the attention and MLP Linears of every layer of a transformers CLIPTextModel."""
    targets = {}
    for name, module in text_encoder.named_modules():
        if (
            isinstance(module, nn.Linear)
            and name.startswith("text_model.encoder.layers.")
            and name.endswith(TEXT_TARGETS)
        ):
            targets["lora_te_" + name.replace(".", "_")] = module
    return targets


def kohya_hashes(tensors: dict[str, Tensor], metadata: dict[str, str]) -> dict[str, str]:
    """sshs_model_hash: sha256 of the file's tensor data (everything after the header), the "addnet" hash
    the WebUI computes for a LoRA; sshs_legacy_hash: kohya's older short hash of 64 KiB at 1 MiB, taken
    over the file as written with the ss_* metadata only (as kohya's scripts do)."""
    ss_only = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    data = save(tensors, metadata=ss_only)
    header = 8 + int.from_bytes(data[:8], "little")
    return {
        "sshs_model_hash": hashlib.sha256(data[header:]).hexdigest(),
        "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }


class LoRALayer(nn.Module):
    """delta(x) = up(down(x)) * alpha / rank, as kohya defines it; up starts at zero.

    The alpha buffer is what the file stores; `scale` (alpha / rank) is kept as a Python float, so the
    ~200 deltas of a UNet forward never read the buffer back from the GPU (a sync each)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float) -> None:
        super().__init__()
        if isinstance(base, nn.Conv2d):
            self.lora_down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=5**0.5)
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.rank = rank
        self.scale = float(alpha) / rank

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # load_state_dict (a resumed run) may bring another alpha
        self.scale = self.alpha.item() / self.rank

    def set_alpha(self, alpha: float) -> None:
        self.alpha.fill_(alpha)
        self.scale = float(alpha) / self.rank

    def delta(self, x: Tensor, multiplier: float) -> Tensor:
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * (multiplier * self.scale)


class KohyaLoRA(nn.Module):
    """The LoRA layers for one UNet (and optionally its text encoder); `install()` / `remove()` patch and
    unpatch their modules. `multiplier` scales every delta, like the weight in `<lora:name:weight>`."""

    def __init__(
        self, unet: nn.Module, rank: int = 16, alpha: float = 8.0, text_encoder: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.targets = target_modules(unet)
        if not self.targets:
            raise ValueError("this UNet has no transformer blocks to put a LoRA on")
        if text_encoder is not None:
            text = text_target_modules(text_encoder)
            if not text:
                raise ValueError("this text encoder has no CLIP encoder layers to put a LoRA on")
            self.targets.update(text)
        self.layers = nn.ModuleDict({k: LoRALayer(m, rank, alpha) for k, m in self.targets.items()})
        self.rank, self.alpha = rank, alpha
        self.multiplier = 1.0
        self._patches: list[ForwardPatch] = []

    def install(self) -> KohyaLoRA:
        self.remove()
        for key, module in self.targets.items():
            layer = self.layers[key]

            def make(inner, layer=layer):
                def forward(x: Tensor, *args, **kwargs) -> Tensor:
                    out = inner(x, *args, **kwargs)  # its dtype (autocast, fp16 model) is the one to keep
                    return out + layer.delta(x, self.multiplier).to(out.dtype)

                return forward

            self._patches.append(ForwardPatch(module, make))
        return self

    def remove(self) -> None:
        for patch in reversed(self._patches):
            patch.restore()
        self._patches.clear()

    def kohya_state_dict(self) -> dict[str, Tensor]:
        out = {}
        for key, layer in self.layers.items():
            out[f"{key}.lora_down.weight"] = layer.lora_down.weight.detach().contiguous().cpu()
            out[f"{key}.lora_up.weight"] = layer.lora_up.weight.detach().contiguous().cpu()
            out[f"{key}.alpha"] = layer.alpha.detach().cpu()
        return out

    def save(self, path: str | Path, metadata: dict[str, str] | None = None, dtype=torch.float16) -> None:
        """Write the kohya file; `metadata` adds to / overrides the ss_* and modelspec.* defaults."""
        tensors = {
            k: v.to(dtype) if v.is_floating_point() and v.ndim else v for k, v in self.kohya_state_dict().items()
        }
        text = any(k.startswith("lora_te_") for k in tensors)
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": str(self.alpha),
            "ss_network_train_unet_only": str(not text),
            "ss_base_model_version": "sd_v1",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": "stable-diffusion-v1/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": Path(path).stem,
            **(metadata or {}),
        }
        meta.update(kohya_hashes(tensors, meta))
        save_file(tensors, str(path), metadata=meta)

    def load_kohya(self, path: str | Path) -> dict[str, str]:
        """Load weights saved by `save` (or by kohya for the same targets); returns the metadata."""
        tensors = load_file(str(path))
        expected = set(self.kohya_state_dict())
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"LoRA keys differ: {len(missing)} missing (e.g. {missing[:2]}), {len(extra)} extra")
        with torch.no_grad():
            for key, layer in self.layers.items():
                layer.lora_down.weight.copy_(tensors[f"{key}.lora_down.weight"])
                layer.lora_up.weight.copy_(tensors[f"{key}.lora_up.weight"])
                layer.set_alpha(tensors[f"{key}.alpha"].item())
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
