"""The batch command's ControlNet: a file in the WebUI extensions' original layout loads through diffusers'
converter into diffusers' ControlNetModel; its residuals on the ldm UNet give what diffusers' own UNet gives
with the same residuals."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from lib_anydressing.batch.control import ControlNetError, control_residuals, load_controlnet
from lib_anydressing.sd.architectures import SD15_UNET
from lib_anydressing.sd.random_models import build_unet, reinitialise
from lib_anydressing.sd.unet_keys import convert_unet, diffusers_to_ldm

diffusers = pytest.importorskip("diffusers")

SIZES = {
    "block_out_channels": (32, 64, 128, 128),
    "layers_per_block": 2,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
}  # fmt: skip  (diffusers' attention_head_dim: SD1.x's head count)


def _original_layout(model) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel's weights as the original ControlNet files name them (control_model.*):
    the encoder under the ldm UNet's names, input_hint_block 0..14 (convs at even indices), zero_convs.N.0,
    middle_block_out.0."""
    hint = {"conv_in": 0, **{f"blocks.{i}": 2 * (i + 1) for i in range(6)}, "conv_out": 14}
    out = {}
    for key, value in model.state_dict().items():
        name, _, param = key.rpartition(".")
        if key.startswith("controlnet_cond_embedding."):
            new = f"input_hint_block.{hint[name.split('.', 1)[1]]}.{param}"
        elif key.startswith("controlnet_down_blocks."):
            new = f"zero_convs.{name.split('.')[1]}.0.{param}"
        elif key.startswith("controlnet_mid_block."):
            new = f"middle_block_out.0.{param}"
        else:
            new = diffusers_to_ldm(key)
        out["control_model." + new] = value.contiguous()
    return out


@pytest.fixture(scope="module")
def controlnet():
    model = diffusers.ControlNetModel(**SIZES).eval()
    reinitialise(model, seed=21)
    return model


def test_an_original_layout_file_loads_into_the_same_controlnet(controlnet, tmp_path):
    save_file(_original_layout(controlnet), str(tmp_path / "control_pose.safetensors"))
    loaded = load_controlnet(tmp_path / "control_pose.safetensors")
    want = controlnet.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in want.items())
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, str(tmp_path / "diffusers.safetensors"))
    again = load_controlnet(tmp_path / "diffusers.safetensors")  # diffusers' own layout loads as it is
    assert all(torch.equal(again.state_dict()[k], v) for k, v in want.items())


def test_a_file_that_is_no_controlnet_is_named(tmp_path):
    save_file({"lora_unet_x.lora_down.weight": torch.zeros(1)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ControlNetError, match="lora.safetensors' is not a ControlNet"):
        load_controlnet(tmp_path / "lora.safetensors")


def test_residuals_on_the_ldm_unet_match_diffusers_unet(controlnet):
    d_unet = diffusers.UNet2DConditionModel(sample_size=16, **SIZES).eval()
    reinitialise(d_unet, seed=22)
    l_unet = build_unet(SD15_UNET, model_channels=32, num_res_blocks=2, context_dim=64)
    l_unet.load_state_dict(convert_unet(d_unet.state_dict()), strict=True)
    x, t, ctx = torch.randn(2, 4, 16, 24), torch.tensor([10, 900]), torch.randn(2, 7, 64)
    hint = torch.rand(2, 3, 128, 192)
    with torch.no_grad():
        down, mid = controlnet(x, t, ctx, hint, conditioning_scale=0.8, return_dict=False)
        want = d_unet(x, t, ctx, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        plain = l_unet(x, t, context=ctx)
        residuals: dict[str, object] = {"down": list(down), "mid": mid}
        with control_residuals(l_unet, residuals):
            got = l_unet(x, t, context=ctx)
        after = l_unet(x, t, context=ctx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert (got - plain).abs().mean() > 1e-3  # the control does change the prediction
    assert torch.equal(after, plain)  # and comes off completely


def test_dress_batch_with_a_pose_image(controlnet, tmp_path):
    import hashlib
    import json
    from pathlib import Path

    from PIL import Image, ImageDraw
    from support.checkpoints import write_tiny_checkpoint
    from test_batch import TOP, _a1111_parse

    from lib_anydressing.__main__ import main as cli

    checkpoint, tokenizer = write_tiny_checkpoint(tmp_path)
    control = tmp_path / "control_pose.safetensors"
    save_file(_original_layout(controlnet), str(control))
    pose = Image.new("RGB", (96, 160), "black")
    ImageDraw.Draw(pose).line([(48, 20), (48, 100), (20, 150)], fill=(255, 0, 0), width=6)  # a stick figure
    pose.save(tmp_path / "pose.png")
    job = {"prompt": "a person", "garments": [TOP], "seed": 3, "width": 128, "height": 128, "steps": 3}
    lines = [{**job, "id": "posed", "pose": "pose.png", "pose_weight": 0.9}, {**job, "id": "free"},
             {**job, "id": "nopose", "pose": "missing.png"}]  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    files = ["--manifest", str(tmp_path / "jobs.jsonl"), "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer)]
    out = tmp_path / "out"
    assert cli(["dress-batch", *files, "--out", str(out), "--controlnet", str(control), "--device", "cpu"]) == 1
    records = {r["id"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    assert records["posed"]["status"] == records["free"]["status"] == "ok"
    assert records["nopose"]["status"] == "failed" and "pose image: no file" in records["nopose"]["problems"][0]
    posed, free = (Image.open(out / f"{name}-3.png") for name in ("posed", "free"))
    assert posed.tobytes() != free.tobytes()  # the pose steers the image
    with open(control, "rb") as f:  # the WebUI's ControlNet names models by the quick hash: 64 KiB at 1 MiB
        f.seek(0x100000)
        quick = hashlib.sha256(f.read(0x10000)).hexdigest()[:8]
    unit = _a1111_parse(posed.info["parameters"])["ControlNet 0"]
    assert unit.startswith(f"Module: none, Model: control_pose [{quick}], Weight: 0.9,")
    assert "ControlNet 0" not in free.info["parameters"]
    no_control = tmp_path / "out2"
    assert cli(["dress-batch", *files, "--out", str(no_control), "--device", "cpu"]) == 1
    failed = [json.loads(x) for x in (no_control / "results.jsonl").read_text().splitlines()]
    assert "no ControlNet model (--controlnet FILE)" in str([r for r in failed if r["id"] == "posed"])
    assert Path(no_control / "free-3.png").is_file()
