"""What the always-visible script does at each point of a generation, on A1111 and Forge.

A1111: Dressing-Attention is installed on the UNet's attn1 modules in `process_batch`. Forge: a
clone of its UnetPatcher gets attn1 replace patches in `before_sampling` (Forge's
process_before_every_sampling, run for each hires pass), and replaces the user's for that sampling.

Cleanup points, because A1111 skips `postprocess` when sampling raises: every `process` first
removes what an earlier generation may have left; `postprocess` removes it; and `p.close()`, which
A1111 calls on every path (UI and API, success, error or interrupt), removes it too. On Forge the
user's UnetPatcher is put back in the same places.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from ..engine import AnyDressingModel, CheckpointError, GarmentsNet, load_checkpoint, remove_dressing
from ..engine.unet_layers import input_channels
from ..files.images import ImageInputError
from ..generation.garment_guidance import GarmentGuidance
from ..generation.infotext import PREFIX, PROBLEMS, infotext
from ..generation.infotext import key as infotext_key
from ..generation.model_files import TRAINING_FREE, resolve_model, short_hash
from ..generation.options import DressingOptions
from ..generation.photo_masks import PhotoMaskError
from ..generation.prepare import FeatureCache
from ..generation.session import DressingSession, HostContext
from ..segment.parser import ParserError
from . import forge, photo
from .forge import is_forge, unet_of

log = logging.getLogger("anydressing")


class WebUIEnv(Protocol):
    """The few things the controller asks the WebUI; `env.A1111Env` answers from `modules.*`."""

    def model_dirs(self) -> list[Path]: ...
    def offload_garments_net(self) -> bool: ...
    def cache_size(self) -> int: ...
    def image_encoder_dir(self) -> str | None: ...
    def refusal(self, p: Any) -> str | None: ...
    def device(self) -> torch.device: ...
    def dtype(self, p: Any) -> torch.dtype: ...
    def load_unet(self, p: Any) -> None: ...
    def autocast(self) -> AbstractContextManager: ...
    def encode(self, p: Any, images: Tensor) -> Tensor: ...
    def empty_prompt(self, p: Any) -> Tensor | None: ...
    def parser_dirs(self) -> list[Path]: ...
    def parser_name(self) -> str: ...


class Controller:
    """One per WebUI process: a loaded model, a feature cache, and the generation being dressed."""

    def __init__(self, env: WebUIEnv) -> None:
        self.env = env
        self.cache = FeatureCache(env.cache_size())
        self.session: DressingSession | None = None
        self.guidance: GarmentGuidance | None = None
        self.cfg_scale = 7.0
        self._nmask: Tensor | None = None
        self._model: tuple[tuple, AnyDressingModel, str] | None = None  # (file identity, model, short hash)
        self._garments_net: tuple[tuple, GarmentsNet] | None = None  # built once per model file and base weights
        self._pending: _Pending | None = None  # checked in process, installed in process_batch / before_sampling
        self._swaps: list[tuple[Any, Any, Any]] = []  # Forge: (forge_objects, the user's UnetPatcher, our clone)
        self.preview: Any = None  # the mask preview of a dressed photo, shown after the images

    def process(self, p: Any, opts: DressingOptions) -> None:
        """Before the batches: clean up, check everything that can be checked, load the model.

        Extraction waits for `process_batch` (A1111 activates the prompt's LoRAs in between) or, on
        Forge, for `before_sampling` (Forge merges them when it loads the UNet): training-free garment
        tokens must come from the same weights as the UNet they join.
        """
        unet = unet_of(p)
        self.finish(unet)
        for key in [k for k in p.extra_generation_params if k.startswith(PREFIX)]:
            del p.extra_generation_params[key]  # X/Y/Z cells share the dict: the previous cell's entries
        if not opts.enabled:
            return
        for problem in opts.problems:
            _problem(p, f"{PREFIX}: {problem}")
        if opts.problems:
            _problem(p, f"{PREFIX}: generating without dressing")
            return
        if not opts.slots:
            _problem(p, f"{PREFIX} is on but no garment image was given: generating without dressing")
            return
        refusal = self.env.refusal(p)
        if refusal:
            _problem(p, f"{PREFIX}: {refusal}: generating without dressing")
            return
        try:
            model, model_key, label = self._load(opts.model, p)
            channels = input_channels(unet)
            if channels not in (4, 9):
                raise ValueError(f"models with {channels} input channels (instruct-pix2pix) are not supported")
        except Exception as e:  # a bad file or an unforeseen error: a message, never a traceback in the UI
            self._fail(p, unet, e)
            return
        dressed_photo = None
        if opts.mask_from_garments:
            try:
                dirs, name = self.env.parser_dirs(), self.env.parser_name()
                dressed_photo = photo.mask_photo(p, opts, dirs, name, self.env.device())
            except (ParserError, PhotoMaskError, ImageInputError, ValueError) as e:
                _problem(p, f"{PREFIX}: {e}: generating without dressing")
                return
            p.extra_generation_params[infotext_key("mask_from_garments")] = photo.infotext_value(dressed_photo, opts)
        self._pending = _Pending(opts, model, model_key, label, dressed_photo)
        _close_with(p, lambda: self.finish(unet))

    def process_batch(self, p: Any) -> None:
        """A1111, after it activated this batch's LoRAs: extract (or reuse) garment features and install."""
        if self._pending is None or is_forge(p):
            return  # Forge merges LoRAs when it loads the UNet for sampling: see before_sampling
        unet = p.sd_model.model.diffusion_model
        self._dress(p, unet, lambda session: session.install(unet))

    def before_sampling(self, p: Any) -> None:
        """Forge, before each sampling: dress a clone of the UnetPatcher it is about to sample with."""
        if self._pending is None or not is_forge(p):
            return
        objects = p.sd_model.forge_objects
        clone = objects.unet.clone()
        self._swaps.append((objects, objects.unet, clone))
        objects.unet = clone  # loaded (LoRAs merged) and extracted from as the patcher that will sample
        unet = clone.model.diffusion_model
        if not self._dress(p, unet, lambda session: session.make_dresser(unet).prepare()):
            return
        try:  # _dress succeeded: the session and its Dresser are there
            forge.add_patches(clone, self.session.dresser)  # type: ignore[union-attr]
            scale = self._pending.opts.garment_guidance
            if scale is not None:  # Forge runs hires passes at their own CFG scale
                cfg = getattr(p, "hr_cfg", p.cfg_scale) if getattr(p, "is_hr_pass", False) else p.cfg_scale
                forge.add_garment_guidance(clone, scale, float(cfg))
        except Exception as e:
            self._fail(p, unet, e)

    def _dress(self, p: Any, unet: Any, install: Callable[[DressingSession], None]) -> bool:
        """Garment features for this batch's LoRA set (extracted or reused), then `install`.

        False when the generation goes on without dressing (the message is on p).
        """
        pending = self._pending
        if pending is None:
            return False
        networks = _networks_key(p)
        if self.session is not None and pending.networks == networks:
            return True  # the next batch or hires pass of the same generation: same features
        if self.session is not None:
            self.session.close()
            self.session = None
        first = pending.networks is None
        pending.networks = networks
        session = DressingSession(pending.model, pending.opts)
        try:
            self.cache.max_entries = self.env.cache_size()
            if pending.photo is not None:  # p.init has prepared the frame: the regions go onto it
                photo.place_regions(p, pending.photo, pending.opts)
            self.env.load_unet(p)
            with self.env.autocast():
                host = HostContext(
                    device=self.env.device(),
                    dtype=self.env.dtype(p),
                    encode=lambda images: self.env.encode(p, images),
                    empty_prompt=self.env.empty_prompt(p),
                    image_encoder_dir=self.env.image_encoder_dir(),
                    offload_garments_net=self.env.offload_garments_net(),
                )
                prepared = session.prepare(
                    self._garments_net_for(pending.model, pending.model_key, unet, p),
                    host,
                    target_wh=(p.width, p.height),
                    cache=self.cache,
                    model_key=f"{pending.model_key}:{networks}",
                )
            install(session)
        except Exception as e:  # out of memory, a device problem...: a message, never a traceback
            session.close()
            self._fail(p, unet, e)
            return False
        self.session = session
        self.cfg_scale = float(getattr(p, "cfg_scale", 7.0))
        self.guidance = (  # Forge: a post-CFG function on its UnetPatcher instead (see before_sampling)
            None
            if pending.opts.garment_guidance is None or is_forge(p)
            else GarmentGuidance(pending.opts.garment_guidance)
        )
        if first:
            for note in prepared.notes:
                p.comment(f"{PREFIX}: {note}")
            p.extra_generation_params.update(infotext(pending.opts, pending.label, session.strength))
            self.preview = pending.photo.preview if pending.photo is not None else None
        return True

    def _fail(self, p: Any, unet: Any, error: Exception) -> None:
        self.finish(unet)
        expected = (CheckpointError, FileNotFoundError, ImageInputError, ValueError, RuntimeError)
        if isinstance(error, expected):
            _problem(p, f"{PREFIX}: {error}: generating without dressing")
        else:
            _problem(p, f"{PREFIX}: unexpected {type(error).__name__}: {error}: generating without dressing")
            traceback.print_exception(error)

    def on_cfg_denoiser(self, params: Any) -> None:
        """A1111 calls this before each step's UNet calls: conditional rows come first in its batch."""
        if self.session is None:
            return
        cond = params.text_cond
        self._nmask = getattr(params.denoiser, "nmask", None)  # inpainting: only the generated area changes
        if self.guidance is not None and isinstance(cond, Tensor):
            n_dressed = self.guidance.expand(params)
        else:
            n_dressed = (next(iter(cond.values())) if isinstance(cond, dict) else cond).shape[0]
        self.session.on_step(params.sampling_step, params.total_sampling_steps, n_dressed)

    def on_cfg_denoised(self, params: Any) -> None:
        if self.session is not None and self.guidance is not None:
            self.guidance.collect(params.x)

    def on_cfg_after_cfg(self, params: Any) -> None:
        if self.session is not None and self.guidance is not None:
            params.x = self.guidance.correct(params.x, self.cfg_scale, self._nmask)

    def postprocess(self, p: Any, processed: Any) -> None:
        """After the images: a dressed photo's mask preview joins them (with the first image's infotext, as
        A1111's own "return mask" adds its mask), then everything comes off the UNet."""
        if self.preview is not None and getattr(processed, "images", None) is not None:
            processed.images.append(self.preview)
            if getattr(processed, "infotexts", None):
                processed.infotexts.append(processed.infotexts[0])
        self.finish(unet_of(p))

    def finish(self, unet: Any = None) -> None:
        """Take everything off the UNet: after a generation, an error, or when the script unloads."""
        if self.session is not None:
            self.session.close()
            self.session = None
        self._pending = None
        self.guidance = None
        self.preview = None
        for objects, original, clone in self._swaps:
            if objects.unet is clone:  # Forge: the user's UnetPatcher back in place, the clone dropped
                objects.unet = original
        self._swaps.clear()
        if unet is not None:
            remove_dressing(unet)

    def _garments_net_for(self, model: AnyDressingModel, model_key: str, unet: Any, p: Any) -> GarmentsNet:
        """Kept between generations; rebuilt when the model file or the base checkpoint changes
        (a partial GarmentsNet shares the base UNet's tensors)."""
        key = (model_key, id(unet), getattr(p.sd_model, "sd_model_hash", ""))
        if self._garments_net is None or self._garments_net[0] != key:
            self._garments_net = (key, model.garments_net(unet))
        return self._garments_net[1]

    def _load(self, name: str, p: Any) -> tuple[AnyDressingModel, str, str]:
        """(model, a key for the feature cache, the name + hash for the infotext).

        The key holds the base checkpoint too: training-free and partial GarmentsNets use its weights.
        """
        path = resolve_model(name, self.env.model_dirs())
        base = getattr(p.sd_model, "sd_model_hash", "")
        if path is None:
            return AnyDressingModel.training_free(), f"{TRAINING_FREE}:{base}", TRAINING_FREE
        stat = path.stat()
        key = (str(path), stat.st_mtime_ns, stat.st_size)
        if self._model is None or self._model[0] != key:
            self._model = (key, load_checkpoint(path), short_hash(path))
            self.cache.clear()
        return self._model[1], f"{key}:{base}", f"{path.stem} [{self._model[2]}]"


@dataclass
class _Pending:
    opts: DressingOptions
    model: AnyDressingModel
    model_key: str
    label: str
    photo: photo.DressedPhoto | None = None  # img2img with 'mask from garments'
    networks: str | None = None  # the LoRA set the installed features were extracted with


def _problem(p: Any, comment: str) -> None:
    """A comment under the image in the UI, an infotext entry (A1111 1.10's API answer, `info`, carries the
    infotext and extra_generation_params but not the comments), and a warning on the WebUI's console."""
    p.comment(comment)
    log.warning(comment)
    text = comment.removeprefix(f"{PREFIX}: ")
    earlier = p.extra_generation_params.get(PROBLEMS)
    p.extra_generation_params[PROBLEMS] = f"{earlier}; {text}" if earlier else text


def _networks_key(p: Any) -> str:
    """The extra networks A1111 activated for this batch (LoRAs and their weights), as a cache key."""
    data = getattr(p, "extra_network_data", None) or {}
    return repr(sorted((name, [tuple(map(str, x.items)) for x in params]) for name, params in data.items()))


def _close_with(p: Any, cleanup: Callable[[], None]) -> None:
    """Run `cleanup` when A1111 closes `p`, which it does even when sampling raised."""
    original = p.close

    def close() -> None:
        try:
            cleanup()
        finally:
            original()

    p.close = close
