"""A LoRA on the UNet's transformer blocks (and optionally the CLIP text encoder), saved in kohya's
format so the WebUI's Lora extension (and other tools) load it with `<lora:name:1>` and no
"failed to match keys".

Targets are kohya's: every Linear and 1x1 Conv inside the UNet's transformer blocks
(proj_in, proj_out, attn1/attn2 q/k/v/out, the feed-forward), keyed `lora_unet_<diffusers module
path>` for SD1.x and `lora_unet_<sgm module path>` for SDXL (kohya's SDXL UNet keeps the original
names); in the text encoder every Linear of the attention and MLP of each layer (q/k/v/out_proj, fc1/fc2),
keyed `lora_te_<transformers module path>` (SDXL: `lora_te1_` CLIP-L, `lora_te2_` bigG). Each key has
`.lora_down.weight`, `.lora_up.weight` and `.alpha`. The LoRA runs as a forward patch on the user's modules
and comes off exactly; it is never merged into the weights.

The LyCORIS network types (LoCon, LoHa, LoKr) come from the maintained `lycoris-lora` package when it
is installed (3.x: its 4.x needs torch >= 2.4, newer than the WebUIs'): its modules hold the factors,
compute each delta and name the file's tensors (`hada_w1_a`, `lokr_w1`, ...), as LyCORIS files the
WebUIs' Lora loaders read. They also cover the ResBlocks and the down/up-samplers, 3x3 convolutions
included, as LyCORIS's presets do. Plain LoRA stays this module's own code.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save, save_file
from torch import Tensor, nn

from ..sd.forward_patch import ForwardPatch
from ..sd.sdxl import SdxlText
from ..sd.unet_keys import ldm_to_diffusers

TRANSFORMER_PARENTS = ("input_blocks", "middle_block", "output_blocks")
TEXT_PREFIX = "lora_te"  # lora_te_ (SD1.x), lora_te1_ / lora_te2_ (SDXL)
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")
# network type -> the lycoris-lora module class (None: this module's LoRALayer)
NETWORKS: dict[str, str | None] = {
    "lora": None,
    "locon": "lycoris.modules.locon:LoConModule",
    "loha": "lycoris.modules.loha:LohaModule",
    "lokr": "lycoris.modules.lokr:LokrModule",
}
LYCORIS_INSTALL = "pip install lycoris-lora==3.4.0 toml"


def lycoris_missing(network: str) -> str | None:
    """Why `network` cannot be trained here (the package it needs is absent), or None."""
    if NETWORKS.get(network) is None:
        return None
    try:
        importlib.import_module(NETWORKS[network].split(":")[0])
    except Exception as e:  # ImportError, or a lycoris release that needs a newer torch
        return f"network type '{network}' needs the lycoris-lora package ({LYCORIS_INSTALL}): {e}"
    return None


def target_modules(unet: nn.Module, *, resnets: bool = False, sdxl: bool = False) -> dict[str, nn.Module]:
    """kohya name -> module, for every Linear / 1x1 Conv inside the UNet's SpatialTransformers; with `resnets`
    also every Linear / Conv of its ResBlocks and down/up-samplers (LyCORIS's targets). `sdxl`: named by
    the module's own (sgm) path, as kohya names SDXL LoRAs."""
    targets = {}
    for name, module in unet.named_modules():
        parts = name.split(".")
        if parts[0] not in TRANSFORMER_PARENTS:
            continue
        transformer = hasattr(module, "transformer_blocks")
        conv_block = hasattr(module, "in_layers") or type(module).__name__ in ("Downsample", "Upsample")
        if not transformer and not (resnets and conv_block):
            continue
        for sub_name, sub in module.named_modules():
            is_linear = isinstance(sub, nn.Linear)
            is_conv = isinstance(sub, nn.Conv2d) and (not transformer or sub.kernel_size == (1, 1))
            if sub_name and (is_linear or is_conv):
                path = f"{name}.{sub_name}" if sdxl else ldm_to_diffusers(f"{name}.{sub_name}.")[:-1]
                targets["lora_unet_" + path.replace(".", "_")] = sub
    return targets


def text_target_modules(text_encoder: nn.Module) -> dict[str, nn.Module]:
    """kohya name -> module, for the attention and MLP Linears of every layer of a transformers CLIPTextModel;
    SDXL's pair (SdxlText) as kohya names it: `lora_te1_` for CLIP-L, `lora_te2_` for bigG."""
    encoders = (
        [("lora_te1_", text_encoder.clip_l), ("lora_te2_", text_encoder.clip_g)]
        if isinstance(text_encoder, SdxlText)
        else [("lora_te_", text_encoder)]
    )
    targets = {}
    for prefix, encoder in encoders:
        for name, module in encoder.named_modules():
            if (
                isinstance(module, nn.Linear)
                and name.startswith("text_model.encoder.layers.")
                and name.endswith(TEXT_TARGETS)
            ):
                targets[prefix + name.replace(".", "_")] = module
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

    def file_tensors(self) -> dict[str, Tensor]:
        return {"lora_down.weight": self.lora_down.weight, "lora_up.weight": self.lora_up.weight, "alpha": self.alpha}

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        with torch.no_grad():
            self.lora_down.weight.copy_(tensors["lora_down.weight"])
            self.lora_up.weight.copy_(tensors["lora_up.weight"])
        self.set_alpha(tensors["alpha"].item())


class LycorisLayer(nn.Module):
    """One lycoris-lora module on `base`: the package computes the delta, and its state dict is the file's
    layout for this key. The module is never applied to `base` (no `apply_to`): KohyaLoRA patches."""

    def __init__(self, key: str, base: nn.Module, network: str, rank: int, alpha: float) -> None:
        super().__init__()
        module_path, class_name = str(NETWORKS[network]).split(":")
        module_class = getattr(importlib.import_module(module_path), class_name)
        self.net = module_class(key, base, multiplier=1.0, lora_dim=rank, alpha=alpha)
        self.network = network

    def delta(self, x: Tensor, multiplier: float) -> Tensor:
        """The base layer's own operation (linear, or conv with its stride and padding) on the weight
        difference, as the package's own (non-bypass) forward computes it. Not its bypass path, which
        breaks on some LoKr convolutions, nor get_diff_weight, which scales LoHa/LoKr twice (3.4.0)."""
        net = self.net
        if self.network == "locon":
            diff = net.make_weight(x.device) * net.scale
        else:
            diff = net.get_weight(net.shape) * net.scalar
        return net.op(x.to(diff.dtype), diff * multiplier, **net.kw_dict)

    def file_tensors(self) -> dict[str, Tensor]:
        return dict(self.net.state_dict())

    def load_file_tensors(self, tensors: dict[str, Tensor]) -> None:
        self.net.load_state_dict(tensors)


class KohyaLoRA(nn.Module):
    """The LoRA (or LyCORIS) layers for one UNet (and optionally its text encoder); `install()` / `remove()`
    patch and unpatch their modules. `multiplier` scales every delta, like the weight in `<lora:name:weight>`."""

    def __init__(
        self, unet: nn.Module, rank: int = 16, alpha: float = 8.0, text_encoder: nn.Module | None = None,
        network: str = "lora", *, sdxl: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        if network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, not {network!r}")
        self.targets = target_modules(unet, resnets=network != "lora", sdxl=sdxl)
        if not self.targets:
            raise ValueError("this UNet has no transformer blocks to put a LoRA on")
        if text_encoder is not None:
            text = text_target_modules(text_encoder)
            if not text:
                raise ValueError("this text encoder has no CLIP encoder layers to put a LoRA on")
            self.targets.update(text)
        self.layers = nn.ModuleDict(
            {
                k: LoRALayer(m, rank, alpha) if network == "lora" else LycorisLayer(k, m, network, rank, alpha)
                for k, m in self.targets.items()
            }
        )
        self.rank, self.alpha, self.network, self.sdxl = rank, alpha, network, sdxl
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
        return {
            f"{key}.{name}": t.detach().contiguous().cpu()
            for key, layer in self.layers.items()
            for name, t in layer.file_tensors().items()
        }

    def save(self, path: str | Path, metadata: dict[str, str] | None = None, dtype: torch.dtype | None = None) -> None:
        """Write the kohya file; `metadata` adds to / overrides the ss_* and modelspec.* defaults.

        `dtype` by default fp16, as kohya saves, but fp32 for LoHa and LoKr: A1111 multiplies their factors
        in the file's precision, and its torch (2.1.2) has no fp16 matrix product on the CPU, so an fp16
        LoHa is skipped there ("Networks with errors"); LoRA and LoCon factors it converts first.
        """
        if dtype is None:
            dtype = torch.float32 if self.network in ("loha", "lokr") else torch.float16
        tensors = {
            k: v.to(dtype) if v.is_floating_point() and v.ndim else v for k, v in self.kohya_state_dict().items()
        }
        text = any(k.startswith(TEXT_PREFIX) for k in tensors)
        lycoris = {"ss_network_module": "lycoris.kohya", "ss_network_args": self._network_args()}
        meta = {
            **({"ss_network_module": "networks.lora"} if self.network == "lora" else lycoris),
            "ss_network_dim": str(self.rank),
            "ss_network_alpha": str(self.alpha),
            "ss_network_train_unet_only": str(not text),
            "ss_base_model_version": "sdxl_base_v1-0" if self.sdxl else "sd_v1",
            "modelspec.sai_model_spec": "1.0.0",
            "modelspec.architecture": f"{'stable-diffusion-xl-v1-base' if self.sdxl else 'stable-diffusion-v1'}/lora",
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
        for key, layer in self.layers.items():
            layer.load_file_tensors({name: tensors[f"{key}.{name}"] for name in layer.file_tensors()})
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})

    def _network_args(self) -> str:
        """kohya's ss_network_args for a LyCORIS run: the algorithm, and the conv rank (= the linear one)."""
        return json.dumps({"algo": self.network, "conv_dim": str(self.rank), "conv_alpha": str(self.alpha)})
