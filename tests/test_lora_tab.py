"""The training side of the 'Train garment LoRA' tab: the callback Start runs in its thread (a tiny real SD
model, a few steps), interrupt and resume through it, refusals before any model is touched, and the
WebUI loan's snapshot that gives the user's model back exactly."""

from __future__ import annotations

import json
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from lib_anydressing.garment_lora.dataset import BG_KEEP, ImportOptions, import_images
from lib_anydressing.sd.random_models import tiny_stable_diffusion
from lib_anydressing.segment.segmenter import Segmenter
from lib_anydressing.tabs.app import build_tabs
from lib_anydressing.tabs.lora_tab import TrainingJob, _loss_frame, run_training
from lib_anydressing.webui.lora_training import ModelSnapshot, hide_lowvram_hooks


class TinyHost:
    """A TrainingHost lending a tiny real SD1-shaped model, counting the loans."""

    uses_loaded_model = False

    def __init__(self, folder: Path, sd=None) -> None:
        self.folder, self.loans = folder, 0
        self.sd = sd or tiny_stable_diffusion(seed=3)

    def lora_dir(self) -> Path:
        return self.folder

    @contextmanager
    def model(self, checkpoint: str, tokenizer: str = ""):
        self.loans += 1
        yield self.sd

    def base_name(self, checkpoint: str) -> str:
        return "tiny"


@pytest.fixture
def dataset(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    for i, colour in enumerate([(220, 20, 20), (20, 200, 40), (30, 30, 220)]):
        im = Image.new("RGBA", (80, 80), (0, 0, 0, 0))
        ImageDraw.Draw(im).ellipse((10 + i, 8, 70, 72), fill=(*colour, 255))
        im.save(src / f"p{i}.png")
    out = tmp_path / "dataset"
    options = ImportOptions(size=64, background=BG_KEEP)
    import_images(sorted(src.iterdir()), out, options, Segmenter(), lambda _p: "zxq, shirt")
    return out


def _settings(dataset: Path, out: Path, **changes) -> dict:
    values = {
        "dataset_dir": str(dataset), "name": "tiny_shirt", "overwrite": False, "out_dir": str(out), "checkpoint": "",
        "tokenizer": "",
        "rank": 4, "alpha": 4, "network": "lora", "epochs": 2, "learning_rate": 1e-3, "batch_size": 1, "resolution": 64,
        "mixed_precision": "fp32", "gradient_checkpointing": False, "train_text_encoder": False,
        "min_snr_gamma": 5.0, "noise_offset": 0.0, "masked_loss": True, "buckets": False, "sample_every_epochs": 2,
        "caption_dropout": 0.0, "shuffle_tags": False, "keep_tags": 1, "reg_dir": "", "reg_repeats": 1,
        "tensorboard": False,
        "sample_prompt": "", "resume": True, "trigger": "zxq", "class_word": "shirt",
    }  # fmt: skip
    return {**values, **changes}


def _run(job: TrainingJob, host, settings) -> str:
    assert job.start(lambda j: run_training(j, host, settings))
    job.wait(120)
    assert not job.running
    return job.view.message


def test_start_trains_in_a_thread_and_reports_the_saved_file(tmp_path, dataset):
    host, job = TinyHost(tmp_path / "Lora"), TrainingJob()
    before = {k: v.clone() for k, v in host.sd.unet.state_dict().items()}
    message = _run(job, host, _settings(dataset, tmp_path / "Lora"))
    saved = tmp_path / "Lora" / "tiny_shirt.safetensors"
    assert message.startswith("✅ Saved") and str(saved) in message and "<lora:tiny_shirt:1> zxq, shirt" in message
    tensors = load_file(saved)
    assert any(k.startswith("lora_unet_") and k.endswith(".lora_up.weight") for k in tensors)
    assert all(not k.startswith("lora_te_") for k in tensors)
    v = job.view
    assert v.step == v.total == 6, "3 images x 2 epochs at batch 1"
    assert [s for s, _ in v.losses] == list(range(1, 7)) and all(np.isfinite(loss) for _, loss in v.losses)
    assert len(v.samples) == 1 and Path(v.samples[0][0]).is_file() and v.samples[0][1] == "epoch 2"
    assert "Step **6 / 6**" in v.progress_text()
    plot = gr.LinePlot(x="step", y="loss").postprocess(_loss_frame([*v.losses, (7, float("nan"))]))
    points = json.loads(plot["plot"])["datasets"].popitem()[1]
    assert [(p["step"], p["loss"]) for p in points] == [(s, pytest.approx(loss)) for s, loss in v.losses]
    assert all(torch.equal(before[k], t) for k, t in host.sd.unet.state_dict().items()), "base weights untouched"
    assert not any("forward" in m.__dict__ for m in host.sd.unet.modules()), "the LoRA came off"

    again = _run(job, host, _settings(dataset, tmp_path / "Lora", resume=False))
    assert again.startswith("⚠ Training stopped:") and "exists" in again, "no overwrite without the checkbox"


def test_interrupt_then_start_again_resumes(tmp_path, dataset, monkeypatch):
    from lib_anydressing.tabs import lora_tab

    host, job = TinyHost(tmp_path / "Lora"), TrainingJob()
    settings = _settings(dataset, tmp_path / "Lora", epochs=1, sample_every_epochs=0)
    train_lora = lora_tab.train_lora

    def interrupted_during_step_1(model, config, *, on_progress, stop):
        def progress(p):  # Interrupt pressed while step 1 runs: the trainer stops after it
            on_progress(p)
            stop.set()

        return train_lora(model, config, on_progress=progress, stop=stop)

    monkeypatch.setattr(lora_tab, "train_lora", interrupted_during_step_1)
    assert job.start(lambda j: run_training(j, host, settings))
    job.wait(120)
    monkeypatch.setattr(lora_tab, "train_lora", train_lora)
    assert job.view.message.startswith("⏸ Interrupted at step 1/3") and "resume" in job.view.message
    assert (tmp_path / "Lora" / "tiny_shirt-state").is_dir()
    message = _run(job, host, settings)
    assert message.startswith("✅ Saved"), message
    assert len(job.view.losses) == 3, "the resumed run carries the first step's loss on"


def test_bad_settings_are_refused_before_the_model_is_lent(tmp_path, dataset):
    host, job = TinyHost(tmp_path / "Lora"), TrainingJob()
    for name in ("../escape", "a/b", ""):
        message = _run(job, host, _settings(dataset, tmp_path / "Lora", name=name))
        assert message.startswith("⚠ Training stopped:") and "not a usable LoRA name" in message
    assert host.loans == 0
    message = _run(job, host, _settings(tmp_path / "nowhere", tmp_path / "Lora"))
    assert "does not exist" in message
    loans = host.loans
    with pytest.MonkeyPatch.context() as m:
        m.setitem(sys.modules, "lycoris.modules.loha", None)  # lycoris-lora absent
        message = _run(job, host, _settings(dataset, tmp_path / "Lora", network="loha"))
    assert "network type 'loha' needs the lycoris-lora package (pip install lycoris-lora" in message
    assert host.loans == loans
    assert not (tmp_path / "Lora").exists() or not any((tmp_path / "Lora").iterdir())


def test_one_run_at_a_time():
    job, release = TrainingJob(), threading.Event()
    assert job.start(lambda j: (release.wait(10), "first")[1])
    assert not job.start(lambda j: "second"), "a second Start while one runs is refused"
    release.set()
    job.wait(10)
    assert job.view.message == "first"
    assert job.start(lambda j: (_ for _ in ()).throw(KeyError("boom")))
    job.wait(10)
    assert job.view.message.startswith("⚠ Training failed: KeyError") and not job.view.running


def test_the_webui_loan_gives_the_model_back_exactly(tmp_path, dataset):
    """The snapshot taken around a loan undoes a real training run plus what a trainer could leave behind:
    another dtype, train mode, requires_grad, an instance forward, a hook, a replaced submodule."""
    sd = tiny_stable_diffusion(seed=5)
    model = torch.nn.Module()  # named like A1111's LatentDiffusion where the loan looks
    model.first_stage_model, model.parts = sd.vae, torch.nn.ModuleDict({"unet": sd.unet, "te": sd.text_encoder})
    fired = []
    block = sd.unet.input_blocks[1]
    handle = block.register_forward_pre_hook(lambda m, a: fired.append(1))  # like A1111's lowvram hooks
    sd.vae.encode = sd.vae.encode  # the instance wrapper lowvram puts on the VAE
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [(p.requires_grad, p.dtype) for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    snapshot = ModelSnapshot.take(model)
    hide_lowvram_hooks(model)
    assert not block._forward_pre_hooks and "encode" not in sd.vae.__dict__
    try:
        settings = _settings(dataset, tmp_path / "Lora", epochs=1, sample_every_epochs=0)
        assert _run(TrainingJob(), TinyHost(tmp_path / "Lora", sd), settings).startswith("✅")
        model.to(torch.bfloat16).train().requires_grad_(True)
        sd.unet.out[2].forward = lambda x: x
        sd.unet.input_blocks[0][0] = torch.nn.Identity()
        raise RuntimeError("the trainer failed")
    except RuntimeError:
        pass
    finally:
        snapshot.restore()
    assert all(torch.equal(reference[k], v) and reference[k].dtype == v.dtype for k, v in model.state_dict().items())
    assert [(p.requires_grad, p.dtype) for p in model.parameters()] == flags
    assert [m.training for m in model.modules()] == modes
    assert "forward" not in sd.unet.out[2].__dict__ and isinstance(sd.unet.input_blocks[0][0], torch.nn.Conv2d)
    assert block._forward_pre_hooks and "encode" in sd.vae.__dict__
    sd.unet(torch.randn(1, 4, 8, 8), torch.tensor([10]), context=torch.randn(1, 77, 64))
    assert fired, "the hook is back and runs"
    handle.remove()


def test_the_tab_builds_with_both_sub_tabs(tmp_path):
    blocks = build_tabs(lambda: [], tmp_path, lora_host=TinyHost(tmp_path / "Lora"))
    labels = {getattr(b, "label", None) for b in blocks.blocks.values()}
    assert {"Segment garment", "Train garment LoRA", "LoRA name", "Trigger word", "Rank (dim)"} <= labels


def test_standalone_trains_from_a_checkpoint_file_and_a_tokenizer_folder(tmp_path, dataset):
    from safetensors.torch import save_file

    from lib_anydressing.sd.checkpoint import original_state_dict
    from lib_anydressing.tabs.lora_tab import CheckpointHost

    sd = tiny_stable_diffusion(seed=7)
    save_file({k: v.contiguous() for k, v in original_state_dict(sd).items()}, tmp_path / "tiny.safetensors")
    sd.tokenizer.save_pretrained(tmp_path / "tokenizer")
    host = CheckpointHost(tmp_path / "unused")
    settings = _settings(dataset, tmp_path / "out", epochs=1, sample_every_epochs=0, checkpoint=str(tmp_path /
                         "tiny.safetensors"), tokenizer=str(tmp_path / "tokenizer"))  # fmt: skip
    job = TrainingJob()
    message = _run(job, host, settings)
    assert message.startswith("✅ Saved") and (tmp_path / "out" / "tiny_shirt.safetensors").is_file(), message
    assert _run(job, host, {**settings, "checkpoint": ""}).endswith("give the path of an SD1.x checkpoint to train on")


def test_presets_set_the_resolution_and_fall_back_to_fp32_without_cuda():
    from lib_anydressing.tabs.lora_tab import TrainingControls

    on_gpu, on_cpu = TrainingControls(None, [], cuda=True), TrainingControls(None, [], cuda=False)
    assert on_gpu.preset("SDXL 12 GB") == (1, "bf16", True, 1024)  # SDXL's VAE overflows in fp16
    assert on_gpu.preset("8 GB") == (1, "fp16", True, 512)
    assert on_cpu.preset("SDXL 16+ GB") == (2, "fp32", True, 1024)
