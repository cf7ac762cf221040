"""Garment LoRA training on the real ldm UNet / VAE and a transformers CLIPTextModel (tiny, random weights).

References are computed here independently: the LoRA applied by merging up @ down * alpha / dim into a
copy of the weights (how the WebUI's Lora extension applies it), the masked loss as a plain formula.
"""

from __future__ import annotations

import copy
import importlib.util
import sys
import threading

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from lib_anydressing.garment_lora.captions import varied_caption
from lib_anydressing.garment_lora.kohya_lora import KohyaLoRA
from lib_anydressing.garment_lora.trainer import (
    GarmentLoRATrainer,
    TrainConfig,
    TrainResult,
    bucket_size,
    check_name,
    masked_mse,
    snr_weights,
    train_lora,
)
from lib_anydressing.sd.architectures import SD15_UNET
from lib_anydressing.sd.forward_patch import ForwardPatch
from lib_anydressing.sd.random_models import build_unet, tiny_stable_diffusion
from lib_anydressing.sd.training_patches import training_patches
from lib_anydressing.training.state import TrainingError

from same_run import assert_same_losses, assert_same_weights, torch_threads

SIDE = 64  # pixels; latents are 8x8
HIDDEN_ROWS = 16  # the top 16 pixel rows are transparent: latent rows 0-1 are outside the garment


@pytest.fixture(scope="module")
def model():
    return tiny_stable_diffusion(seed=2)


@pytest.fixture
def dataset(tmp_path):
    return _dataset(tmp_path / "data")


def _dataset(folder, outside_seed: int = 0):
    """3 noisy RGBA pictures; the RGB of the transparent rows comes from `outside_seed`."""
    folder.mkdir()
    rng, outside = np.random.default_rng(0), np.random.default_rng(outside_seed)
    for i in range(3):
        pixels = rng.integers(0, 256, (SIDE, SIDE, 4), dtype=np.uint8)
        pixels[..., 3] = 255
        pixels[:HIDDEN_ROWS, :, :3] = outside.integers(0, 256, (HIDDEN_ROWS, SIDE, 3), dtype=np.uint8)
        pixels[:HIDDEN_ROWS, :, 3] = 0
        Image.fromarray(pixels, "RGBA").save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(["shirt", "red shirt", "shirt, dress"][i])
    return folder


def _config(dataset, out, **kw) -> TrainConfig:
    values = {"resolution": SIDE, "rank": 4, "alpha": 2.0, "learning_rate": 3e-3, "epochs": 2, "save_every_epochs": 1}
    return TrainConfig(dataset_dir=dataset, output_dir=out, name="garment", **{**values, **kw})


def _snapshot(model):
    return {
        name: ({k: v.clone() for k, v in m.state_dict().items()}, [p.requires_grad for p in m.parameters()])
        for name, m in model.modules().items()
    }


def _assert_untouched(model, snapshot):
    for name, module in model.modules().items():
        state, flags = snapshot[name]
        assert all(torch.equal(v, state[k]) for k, v in module.state_dict().items()), name
        assert [p.requires_grad for p in module.parameters()] == flags, name
        assert not any("forward" in m.__dict__ for m in module.modules()), f"{name}: a patch was left on"


def _fixed_loss(model, dataset, lora_file=None) -> float:
    """MSE of the prediction (noise, or v = sqrt(abar) noise - sqrt(1 - abar) x0) on fixed noise and
    timesteps, computed here without the trainer."""
    images = sorted(dataset.glob("*.png"))
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), np.float32)) for p in images])
    gen = torch.Generator().manual_seed(7)
    lora = None
    if lora_file is not None:
        lora = KohyaLoRA(model.unet, rank=4, alpha=1.0)
        lora.load_kohya(lora_file)
        lora.install()
    try:
        with torch.no_grad():
            # the trainer composites transparent pixels on white: do the same, independently
            alpha = torch.stack([torch.from_numpy(np.asarray(Image.open(p), np.float32)[..., 3:]) for p in images])
            rgb = pixels * alpha / 255 + 255 * (1 - alpha / 255)
            latents = model.encode_images((rgb / 127.5 - 1).permute(0, 3, 1, 2))
            context = model.encode_text([p.with_suffix(".txt").read_text() for p in images])
            total = 0.0
            for t in (100, 400, 700):
                noise = torch.randn(latents.shape, generator=gen)
                abar = model.alphas_cumprod[t].float()
                noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
                pred = model.unet(noisy, torch.full((3,), t), context=context)
                target = noise if model.prediction == "eps" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
                total += (pred - target)[:, :, 2:].square().mean().item()  # rows 0-1 are outside the garment
    finally:
        if lora is not None:
            lora.remove()
    return total / 3


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_overfits_three_images_and_leaves_the_model_as_found(model, dataset, tmp_path, prediction, monkeypatch):
    monkeypatch.setattr(model, "prediction", prediction)
    model.unet.input_blocks[0][0].weight.requires_grad_(True)  # a flag the user had set is put back as found
    before = _snapshot(model)
    start = _fixed_loss(model, dataset)
    progress = []
    config = _config(dataset, tmp_path / "out", epochs=40, batch_size=3, save_every_epochs=0, learning_rate=1e-2)
    result = train_lora(model, config, on_progress=progress.append)
    assert result.status == "done" and result.step == 40 == len(result.losses)
    _assert_untouched(model, before)
    model.unet.input_blocks[0][0].weight.requires_grad_(False)
    end = _fixed_loss(model, dataset, result.output)
    assert end < 0.7 * start, (start, end)  # here: eps 1.70 -> 1.07, v 1.17 -> 0.52
    assert [p.step for p in progress] == list(range(1, 41)) and progress[-1].eta_s == 0 and progress[0].sec_per_step > 0
    with safe_open(str(result.output), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0" and meta["ss_num_train_images"] == "3"
    assert meta["ss_num_epochs"] == "40" and meta["ss_resolution"] == "(64, 64)" and meta["ss_output_name"] == "garment"
    assert '"shirt": 2' in meta["ss_tag_frequency"]
    assert meta["modelspec.prediction_type"] == {"eps": "epsilon", "v": "v"}[prediction]
    assert meta["sshs_model_hash"] and meta["ss_learning_rate"] == "0.01"


def test_applied_file_changes_outputs_by_the_scaled_delta(model, dataset, tmp_path):
    """Patched from the file == the weights merged with up @ down * alpha / dim (the WebUI's way)."""
    result = train_lora(model, _config(dataset, tmp_path / "out", epochs=2, save_every_epochs=0))
    tensors = load_file(str(result.output))
    merged = copy.deepcopy(model.unet)
    lora = KohyaLoRA(model.unet, rank=4, alpha=99.0)
    lora.load_kohya(result.output)
    with torch.no_grad():
        for key, module in KohyaLoRA(merged, rank=4).targets.items():
            down, up = tensors[f"{key}.lora_down.weight"].float(), tensors[f"{key}.lora_up.weight"].float()
            scale = tensors[f"{key}.alpha"].item() / down.shape[0]
            assert scale == 2.0 / 4
            delta = up.flatten(1) @ down.flatten(1) * scale
            module.weight += delta.view(module.weight.shape)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([50, 600])
    with torch.no_grad():
        context = model.encode_text(["red shirt", "dress"])
        plain = model.unet(x, t, context=context)
        lora.install()
        patched = model.unet(x, t, context=context)
        lora.remove()
        want = merged(x, t, context=context)
    assert (patched - plain).abs().max() > 1e-3
    torch.testing.assert_close(patched, want, atol=1e-5, rtol=1e-4)


def test_masked_loss_ignores_everything_outside_the_alpha(model, dataset, tmp_path):
    """Transparent pixels' colours, and the prediction outside the mask, change neither loss nor LoRA."""
    plain = train_lora(model, _config(dataset, tmp_path / "a", epochs=1))
    other = _dataset(tmp_path / "recoloured", outside_seed=5)
    assert not np.array_equal(np.asarray(Image.open(other / "000.png")), np.asarray(Image.open(dataset / "000.png")))
    recoloured = train_lora(model, _config(other, tmp_path / "b", epochs=1))
    assert_same_losses(plain.losses, recoloured.losses)

    def garbage_outside(inner):
        def forward(*args, **kwargs):
            out = inner(*args, **kwargs).clone()
            out[:, :, :2] += 1e3  # latent rows 0-1: outside the garment
            return out

        return forward

    patch = ForwardPatch(model.unet, garbage_outside)
    try:
        disturbed = train_lora(model, _config(dataset, tmp_path / "c", epochs=1))
    finally:
        patch.restore()
    assert_same_losses(plain.losses, disturbed.losses)
    assert_same_weights(load_file(str(plain.output)), load_file(str(disturbed.output)))
    unmasked = train_lora(model, _config(dataset, tmp_path / "d", epochs=1, masked_loss=False))
    with pytest.raises(AssertionError, match="more than float rounding"):
        assert_same_losses(plain.losses, unmasked.losses)


def test_masked_mse_and_min_snr_match_their_formulas():
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 3, 5, generator=gen), torch.randn(2, 4, 3, 5, generator=gen)
    mask = torch.rand(2, 3, 5, generator=gen)
    want = []
    for b in range(2):
        cells = [(c, i, j) for c in range(4) for i in range(3) for j in range(5)]
        weighted = sum(mask[b, i, j] * (pred[b, c, i, j] - target[b, c, i, j]) ** 2 for c, i, j in cells)
        want.append(weighted / (4 * mask[b].sum()))
    weights = torch.tensor([0.5, 2.0])
    torch.testing.assert_close(masked_mse(pred, target, mask, weights), (want[0] * 0.5 + want[1] * 2.0) / 2)
    torch.testing.assert_close(masked_mse(pred, target, None), (pred - target).square().mean())
    abar = torch.tensor([0.99, 0.5, 0.01])
    snr = [0.99 / 0.01, 1.0, 0.01 / 0.99]
    torch.testing.assert_close(snr_weights(abar, 5.0, "eps"), torch.tensor([5 / snr[0], 1.0, 1.0]))
    torch.testing.assert_close(
        snr_weights(abar, 5.0, "v"), torch.tensor([5 / (snr[0] + 1), 1 / 2, snr[2] / (snr[2] + 1)])
    )
    assert snr_weights(abar, 0.0, "eps") is None


def _unet_calls_fail_from(model, call: int, failure):
    count = {"n": 0}

    def make(inner):
        def forward(*args, **kwargs):
            count["n"] += 1
            return failure(inner(*args, **kwargs)) if count["n"] >= call else inner(*args, **kwargs)

        return forward

    return ForwardPatch(model.unet, make)


@pytest.mark.parametrize(("cache", "calls"), [(True, 3), (False, 6)])
def test_cached_latents_encode_each_image_once(model, dataset, tmp_path, monkeypatch, cache, calls):
    count = []
    hook = model.vae.encoder.register_forward_pre_hook(lambda module, args: count.append(len(args[0])))
    try:
        train_lora(model, _config(dataset, tmp_path / "out", cache_latents=cache))  # 2 epochs x 3 images
    finally:
        hook.remove()
    assert len(count) == calls and set(count) == {1}


def test_nan_loss_stops_cleanly_keeping_the_last_good_checkpoint(model, dataset, tmp_path):
    before = _snapshot(model)
    patch = _unet_calls_fail_from(model, 5, lambda out: out * float("nan"))  # 3 steps per epoch: NaN in epoch 2
    try:
        result = train_lora(model, _config(dataset, tmp_path / "out", epochs=3))
    finally:
        patch.restore()
    assert result.status == "nan" and "NaN" in result.message and "garment-000001" in result.message
    assert result.step == 4 and result.output is None and not (tmp_path / "out" / "garment.safetensors").exists()
    kept = load_file(str(result.last_checkpoint))
    assert result.last_checkpoint.name == "garment-000001.safetensors"
    assert all(torch.isfinite(v).all() for v in kept.values())
    _assert_untouched(model, before)


def test_an_exception_leaves_the_model_bit_identical(model, dataset, tmp_path):
    before = _snapshot(model)

    def boom(out):
        raise RuntimeError("CUDA out of memory (simulated)")

    patch = _unet_calls_fail_from(model, 2, boom)
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            train_lora(model, _config(dataset, tmp_path / "out", gradient_checkpointing=True))
    finally:
        patch.restore()
    _assert_untouched(model, before)


def _split_run(model, config, stop_at: int) -> tuple[TrainResult, list[int]]:
    """Stopped after step `stop_at` on 1 thread, resumed on 2: the resumed part carries another thread
    count's rounding, as on a machine where MKL's varies. Returns the resumed result and its steps."""
    stop = threading.Event()

    def stop_there(progress):
        if progress.step == stop_at:
            stop.set()

    with torch_threads(1):
        first = train_lora(model, config, on_progress=stop_there, stop=stop)
    assert first.status == "interrupted" and first.step == stop_at and first.output is None
    assert (config.output_dir / "garment-state").is_dir()
    steps = []
    with torch_threads(2):
        second = train_lora(model, config, on_progress=lambda p: steps.append(p.step))
    return second, steps


def _check_same_run(whole: TrainResult, resumed: TrainResult) -> None:
    assert resumed.status == "done"
    assert_same_losses(whole.losses, resumed.losses)
    assert_same_weights(load_file(str(whole.output)), load_file(str(resumed.output)))


@pytest.mark.parametrize(("accumulation", "stop_at", "rest"), [(1, 4, [5, 6]), (2, 3, [4])])
def test_resume_continues_from_the_saved_step_and_matches_an_uninterrupted_run(
    model, dataset, tmp_path, accumulation, stop_at, rest
):
    """3 images, batch 1: 3 steps per epoch, or 2 with 2 batches accumulated (the last step gathers one)."""
    before = _snapshot(model)
    with torch_threads(1):
        whole = train_lora(model, _config(dataset, tmp_path / "whole", grad_accumulation=accumulation))
    config = _config(dataset, tmp_path / "split", grad_accumulation=accumulation)
    second, steps = _split_run(model, config, stop_at)
    _assert_untouched(model, before)
    assert steps == rest
    _check_same_run(whole, second)
    assert not (tmp_path / "split" / "garment-state").exists()  # finished: nothing left to resume
    halt = threading.Event()
    train_lora(model, _config(dataset, tmp_path / "again"), on_progress=lambda p: halt.set(), stop=halt)
    with pytest.raises(TrainingError, match="other settings"):
        train_lora(model, _config(dataset, tmp_path / "again", rank=8))
    _assert_untouched(model, before)


def test_a_resume_that_loses_the_optimizer_state_fails_the_same_run_check(model, dataset, tmp_path, monkeypatch):
    with torch_threads(1):
        whole = train_lora(model, _config(dataset, tmp_path / "whole"))
    load = GarmentLoRATrainer.resume

    def load_with_fresh_optimizer(self, where):
        fresh = self.optimizer.state_dict()
        load(self, where)
        self.optimizer.load_state_dict(fresh)

    monkeypatch.setattr(GarmentLoRATrainer, "resume", load_with_fresh_optimizer)
    second, _ = _split_run(model, _config(dataset, tmp_path / "split"), 4)
    with pytest.raises(AssertionError, match="more than float rounding"):
        _check_same_run(whole, second)


def test_text_encoder_lora_trains_and_is_saved(model, dataset, tmp_path):
    before = _snapshot(model)
    result = train_lora(model, _config(dataset, tmp_path / "out", train_text_encoder=True, epochs=1))
    tensors = load_file(str(result.output))
    te_up = [v for k, v in tensors.items() if k.startswith("lora_te_") and "lora_up" in k]
    assert len(te_up) == 12 and all(v.abs().max() > 0 for v in te_up)  # 2 layers x 6 targets, all trained
    _assert_untouched(model, before)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", "", " ", ".hidden", "c:\\x", "x" * 101])
def test_bad_names_are_refused(name):
    with pytest.raises(TrainingError, match="not a usable LoRA name"):
        check_name(name)


def test_existing_output_is_not_overwritten_without_consent(model, dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "garment.safetensors").write_bytes(b"the user's file")
    with pytest.raises(TrainingError, match="exists"):
        train_lora(model, _config(dataset, out))
    assert (out / "garment.safetensors").read_bytes() == b"the user's file"
    assert check_name(" my shirt.v2.safetensors ") == "my shirt.v2"


def test_ldm_checkpointing_flags_are_replaced_by_one_that_reaches_the_lora():
    """The WebUI's SD1 config turns ldm's reentrant checkpoint on; it would starve a patched LoRA of gradients."""
    unet = build_unet(SD15_UNET, model_channels=32, context_dim=64, use_checkpoint=True)
    lora = KohyaLoRA(unet, rank=2, alpha=2).install()
    with torch.no_grad():
        for layer in lora.layers.values():
            layer.lora_up.weight.normal_(std=0.05)
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([300]), torch.randn(1, 77, 64)

    def grads(**kw):
        lora.zero_grad()
        with training_patches(unet, **kw):
            unet(x, t, context=c).square().mean().backward()
        return torch.cat(
            [p.grad.flatten() if p.grad is not None else torch.zeros(p.numel()) for p in lora.parameters()]
        )

    plain = grads(gradient_checkpointing=False, sdpa=False)
    assert plain.abs().max() > 0 and (plain != 0).float().mean() > 0.5
    torch.testing.assert_close(grads(gradient_checkpointing=True, sdpa=False), plain)
    torch.testing.assert_close(grads(gradient_checkpointing=True, sdpa=True), plain, atol=1e-6, rtol=1e-4)
    lora.remove()
    assert all(m.checkpoint for m in unet.modules() if type(m).__name__ == "BasicTransformerBlock")
    assert all(m.use_checkpoint for m in unet.modules() if type(m).__name__ == "ResBlock")


def test_samples_every_epoch_and_aspect_buckets_never_mix_sizes(model, tmp_path):
    """A tall photo gets its own bucket (about resolution^2 pixels, sides multiples of 64); a batch holds one
    size only; a sample image is written at each epoch end."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(3)
    for i, (w, h) in enumerate([(128, 128), (120, 136), (64, 200)]):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text("shirt")
    assert bucket_size(64, 200, 128) == (64, 256) and bucket_size(120, 136, 128) == (128, 128)
    shapes = []

    def record(inner):
        def forward(x, *args, **kwargs):
            if torch.is_grad_enabled():  # training steps, not the sampler
                shapes.append(tuple(x.shape))
            return inner(x, *args, **kwargs)

        return forward

    before = _snapshot(model)
    patch = ForwardPatch(model.unet, record)
    try:
        config = _config(data, tmp_path / "out", resolution=128, buckets=True, batch_size=2, sample_every_epochs=1)
        progress = []
        result = train_lora(model, config.copy(update={"sample_steps": 2}), on_progress=progress.append)
    finally:
        patch.restore()
    _assert_untouched(model, before)
    assert sorted(shapes) == sorted([(2, 4, 16, 16), (1, 4, 32, 8)] * 2)  # per epoch: the 2 squares, the tall one
    assert (
        [p.sample.name for p in progress if p.sample]
        == ["epoch0001.png", "epoch0002.png"]
        == [s.name for s in result.samples]
    )
    assert Image.open(result.samples[0]).size == (128, 128)


def test_resume_is_refused_when_a_setting_that_changes_the_run_differs(model, dataset, tmp_path):
    """Precision, noise offset (extra random draws), min-SNR and learning rates change what the resumed steps
    compute: such a resume is refused, naming the setting, and the saved state is kept."""
    before = _snapshot(model)
    halt = threading.Event()
    first = train_lora(model, _config(dataset, tmp_path / "out"), on_progress=lambda p: halt.set(), stop=halt)
    assert first.status == "interrupted" and first.step == 1
    state = (tmp_path / "out" / "garment-state" / "state.pt").read_bytes()
    changes = {"mixed_precision": "bf16", "noise_offset": 0.1, "min_snr_gamma": 5.0, "learning_rate": 1e-3}
    for key, value in changes.items():
        with pytest.raises(TrainingError, match="other settings") as refused:
            train_lora(model, _config(dataset, tmp_path / "out", **{key: value}))
        assert f"{key}: " in str(refused.value) and f"{value} now" in str(refused.value)
        assert [k for k in changes if f"{k}: " in str(refused.value)] == [key]  # only the one that changed
    assert (tmp_path / "out" / "garment-state" / "state.pt").read_bytes() == state
    _assert_untouched(model, before)
    resumed = train_lora(model, _config(dataset, tmp_path / "out", epochs=1))  # epochs may change
    assert resumed.status == "done" and resumed.step == 3


@pytest.mark.parametrize(("encoder", "settings"), [("encode_images", {}), ("encode_text", {"cache_latents": False})])
def test_stop_during_latent_caching_or_caption_encoding_interrupts_before_training(
    model, dataset, tmp_path, monkeypatch, encoder, settings
):
    """Encoding the dataset before the first step can take minutes (and holds the WebUI's queue): the stop flag
    ends it after the current image, with no step taken, nothing written and the model as found."""
    before = _snapshot(model)
    stop, calls, unet_calls = threading.Event(), [], []
    original = getattr(model, encoder)

    def encode_then_stop(*args, **kwargs):
        calls.append(1)
        stop.set()
        return original(*args, **kwargs)

    monkeypatch.setattr(model, encoder, encode_then_stop)
    patch = ForwardPatch(model.unet, lambda inner: lambda *a, **k: unet_calls.append(1) or inner(*a, **k))
    try:
        result = train_lora(model, _config(dataset, tmp_path / "out", **settings), stop=stop)
    finally:
        patch.restore()
    assert result.status == "interrupted" and "preparing" in result.message
    assert result.step == 0 and result.output is None and result.last_checkpoint is None and result.losses == []
    assert len(calls) == 1 and unet_calls == []  # 3 images: stopped after the first, before any UNet call
    assert list((tmp_path / "out").iterdir()) == []
    _assert_untouched(model, before)


def test_varied_captions_follow_kohyas_rules_on_known_captions():
    """Dropout drops the whole caption; shuffling keeps the first `keep` tags and permutes the rest; nothing is
    drawn for an option that is off (a run without them keeps its random stream)."""
    caption = "zxq, shirt, red, striped, long sleeves"
    gen = torch.Generator().manual_seed(0)
    assert varied_caption(caption, gen, dropout=0.0, shuffle=False, keep=1) == caption
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # no draw
    seen = [varied_caption(caption, gen, dropout=0.0, shuffle=True, keep=2) for _ in range(200)]
    assert all(s.split(", ")[:2] == ["zxq", "shirt"] for s in seen)
    assert all(sorted(s.split(", ")) == sorted(caption.split(", ")) for s in seen)
    assert len({s for s in seen}) == 6  # the 3! orders of the three free tags all occur
    again = torch.Generator().manual_seed(0)
    varied_caption(caption, again, dropout=0.0, shuffle=False, keep=1)
    assert [varied_caption(caption, again, dropout=0.0, shuffle=True, keep=2) for _ in range(200)] == seen  # seeded
    dropped = [varied_caption(caption, gen, dropout=0.3, shuffle=False, keep=1) for _ in range(4000)]
    assert abs(dropped.count("") / 4000 - 0.3) < 0.03 and set(dropped) == {"", caption}


def test_training_with_varied_captions_encodes_each_steps_caption(model, dataset, tmp_path, monkeypatch):
    """With caption dropout 1 every step encodes the empty caption (nothing cached); the settings are part of
    the run's fingerprint and of the LoRA's metadata."""
    encoded = []
    encode = model.encode_text
    monkeypatch.setattr(model, "encode_text", lambda p: encoded.append(p) or encode(p))
    result = train_lora(model, _config(dataset, tmp_path / "out", epochs=1, caption_dropout=1.0, shuffle_tags=True))
    assert result.status == "done" and result.step == 3
    assert encoded == [[""]] * 3  # one step per image (batch 1), each with the dropped caption
    with safe_open(str(result.output), "pt") as f:
        meta = f.metadata()
    assert (meta["ss_caption_dropout_rate"], meta["ss_shuffle_caption"], meta["ss_keep_tokens"]) == ("1.0", "True", "1")


@pytest.mark.parametrize(("repeats", "reg_per_epoch"), [(1, 2), (2, 3)])
def test_regularisation_images_join_each_epoch_in_proportion(
    model, dataset, tmp_path, monkeypatch, repeats, reg_per_epoch
):
    """3 training images and 2 regularisation images: each epoch has every training image once and as many
    regularisation images, each at most `reg_repeats` times (2 with repeats 1, 3 of the pool of 4 with 2)."""
    reg = _dataset(tmp_path / "reg", outside_seed=1)
    (reg / "002.png").unlink()
    (reg / "002.txt").unlink()
    seen: list[list[int]] = []
    loss = GarmentLoRATrainer.batch_loss
    monkeypatch.setattr(
        GarmentLoRATrainer, "batch_loss", lambda self, batch: seen.append(list(batch)) or loss(self, batch)
    )
    config = _config(dataset, tmp_path / "out", epochs=2, reg_dir=reg, reg_repeats=repeats)
    result = train_lora(model, config)
    per_epoch = 3 + reg_per_epoch
    assert result.status == "done" and result.step == 2 * per_epoch and len(seen) == 2 * per_epoch
    for epoch in (seen[:per_epoch], seen[per_epoch:]):
        indices = [i for batch in epoch for i in batch]
        assert sorted(i for i in indices if i < 3) == [0, 1, 2]
        reg_used = [i for i in indices if i >= 3]
        assert len(reg_used) == reg_per_epoch and max(reg_used.count(i) for i in reg_used) <= repeats
    with safe_open(str(result.output), "pt") as f:
        assert (f.metadata()["ss_num_train_images"], f.metadata()["ss_num_reg_images"]) == ("3", "2")
    with pytest.raises(TrainingError, match="aspect buckets off"):
        train_lora(model, _config(dataset, tmp_path / "b", reg_dir=reg, buckets=True))


def test_tensorboard_log_holds_each_steps_loss_and_refuses_to_start_without_the_package(
    model, dataset, tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = train_lora(model, _config(dataset, tmp_path / "out", epochs=1, tensorboard=True))
    events = EventAccumulator(str(tmp_path / "out" / "garment-tensorboard"))
    events.Reload()
    logged = events.Scalars("loss")
    assert [e.step for e in logged] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx(result.losses, rel=1e-6)  # float32 in the event file
    assert [e.value for e in events.Scalars("lr")] == pytest.approx([3e-3] * 3)
    before = _snapshot(model)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(TrainingError, match="pip install tensorboard"):
        train_lora(model, _config(dataset, tmp_path / "again", tensorboard=True))
    _assert_untouched(model, before)


def test_a_loha_trains_and_leaves_the_model_as_found(model, dataset, tmp_path):
    """LoHa through lycoris-lora: the loss falls (here 2.06 -> 1.20), the file holds LoHa's tensors and says
    so in its metadata."""
    before = _snapshot(model)
    config = _config(dataset, tmp_path / "out", network="loha", epochs=10, batch_size=3, learning_rate=1e-2)
    result = train_lora(model, config)
    assert result.status == "done"
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    _assert_untouched(model, before)
    keys = load_file(str(result.output)).keys()
    assert any(k.endswith(".hada_w1_a") for k in keys) and not any(k.endswith(".lora_down.weight") for k in keys)
    with safe_open(str(result.output), framework="pt") as f:
        assert f.metadata()["ss_network_module"] == "lycoris.kohya"


@pytest.mark.parametrize("network", ["locon", "loha", "lokr"])
def test_a_lycoris_network_without_the_package_starts_nothing(dataset, tmp_path, monkeypatch, network):
    monkeypatch.setitem(sys.modules, f"lycoris.modules.{network}", None)  # an import of it now fails
    with pytest.raises(TrainingError, match=f"network: network type '{network}' needs the lycoris-lora package"):
        _config(dataset, tmp_path / "out", network=network)  # the settings themselves are refused
    assert not (tmp_path / "out").exists()


def test_a_lokr_run_resumes_to_the_same_weights(model, dataset, tmp_path):
    """The lycoris-lora modules' own state_dict hooks survive the resume state: stopped after step 2 and
    resumed, a LoKr run ends where the uninterrupted one does."""
    with torch_threads(1):
        whole = train_lora(model, _config(dataset, tmp_path / "whole", network="lokr"))
    second, steps = _split_run(model, _config(dataset, tmp_path / "split", network="lokr"), stop_at=2)
    assert steps == [3, 4, 5, 6]
    _check_same_run(whole, second)
