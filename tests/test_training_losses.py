"""AnyDressing's losses against plain implementations of docs/method.md's formulas, written here, and DISTS
against torchmetrics' own implementation."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lib_anydressing.anydressing_trainer import losses
from lib_anydressing.anydressing_trainer.dists import DISTS, N_MAPS, DISTSWeightsError, load_dists
from lib_anydressing.files import images
from lib_anydressing.files.weights import load_tensors
from lib_anydressing.sd import diffusion


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def vgg_state():
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])  # torchvision's own VGG16 feature stack, random weights (no ImageNet file)
    return {f"features.{k}": v for k, v in features.state_dict().items()}  # DISTS reads only these


# --- L_LDM ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_targets_and_noise_estimate_invert_the_forward_process(prediction):
    x0, eps = torch.randn(3, 4, 5, 6, generator=_gen(1)), torch.randn(3, 4, 5, 6, generator=_gen(2))
    abar = torch.tensor([0.9, 0.5, 0.05], dtype=torch.float64).float()
    a = abar.view(-1, 1, 1, 1)
    z_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    target = diffusion.diffusion_target(x0, eps, abar, prediction)
    want = eps if prediction == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0  # v of Salimans & Ho
    torch.testing.assert_close(target, want)
    # A perfect prediction gives back the true noise and, in one step, the clean latent (GTL's z0_hat).
    noise = diffusion.predicted_noise(target, z_t, abar, prediction)
    torch.testing.assert_close(noise, eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(diffusion.predicted_x0(z_t, noise, abar), x0, atol=1e-4, rtol=1e-4)
    pred = target + 0.1
    assert losses.ldm_loss(pred, target).item() == pytest.approx(0.01, rel=1e-4)


# --- L_loc (IGL) ----------------------------------------------------------------------------------------------


def test_localization_loss_matches_the_formula():
    latent_hw = (4, 6)
    n = 2
    masks = (torch.rand(2, n, 32, 48, generator=_gen(3)) > 0.5).float()  # image frame: 8x the latent
    mass = {  # (B, T, N) at two token grids: 4x6 (twice, as layers of one UNet level share a grid) and 2x3
        "a": torch.rand(2, 24, n, generator=_gen(4)).softmax(-1),
        "b": torch.rand(2, 6, n, generator=_gen(5)).softmax(-1),
        "c": torch.rand(2, 24, n, generator=_gen(20)).softmax(-1),
    }
    got = losses.localization_loss(mass, masks, latent_hw)

    def block_mean(m, h, w):  # the mask's average over each token's pixels
        b, k, hh, ww = m.shape
        return m.reshape(b, k, h, hh // h, w, ww // w).mean((3, 5))

    want = 0.0
    for a, (h, w) in ((mass["a"], (4, 6)), (mass["b"], (2, 3)), (mass["c"], (4, 6))):
        m = block_mean(masks, h, w)
        for b in range(2):
            per_garment = [((a[b, :, k] - m[b, k].flatten()) ** 2).sum() for k in range(n)]
            want += sum(per_garment) / n / 2  # (1/N) sum_k ||A_k - M_k||^2, batch mean
    assert got.item() == pytest.approx(float(want), rel=1e-5)
    with pytest.raises(ValueError, match="record_attention_mass"):
        losses.localization_loss({}, masks, latent_hw)


# --- L_hf and Canny -------------------------------------------------------------------------------------------


def test_canny_marks_edges_of_the_target_only():
    image = -torch.ones(1, 3, 32, 32)
    image[:, :, :, 16:] = 1.0  # one vertical step at x = 16
    edges = images.canny_edges(image)
    assert edges.shape == (1, 1, 32, 32) and set(edges.unique().tolist()) <= {0.0, 1.0}
    cols = edges[0, 0].sum(0).nonzero().flatten().tolist()
    assert cols and all(14 <= c <= 17 for c in cols)
    assert images.canny_edges(torch.zeros(1, 3, 32, 32)).sum() == 0  # flat image: no edge


def test_high_frequency_loss_matches_the_formula():
    decoded = torch.rand(2, 3, 16, 16, generator=_gen(6)) * 2 - 1
    target = torch.rand(2, 3, 16, 16, generator=_gen(7)) * 2 - 1
    masks = (torch.rand(2, 3, 16, 16, generator=_gen(8)) > 0.5).float()
    edges = (torch.rand(2, 1, 16, 16, generator=_gen(9)) > 0.7).float()
    got = losses.high_frequency_loss(decoded, target, masks, edges)
    for b in range(2):
        terms = []
        for k in range(3):
            m_prime = masks[b, k] * edges[b, 0]
            i_hat, i = (decoded[b] + 1) / 2, (target[b] + 1) / 2
            terms.append(((i_hat * m_prime - i * m_prime) ** 2).sum())
        assert got[b].item() == pytest.approx(float(sum(terms) / 3), rel=1e-5)


# --- DISTS ----------------------------------------------------------------------------------------------------


def _torchmetrics_dists(vgg_state, monkeypatch):
    """torchmetrics' own DISTS as the oracle, on the same random VGG16: its DISTSNetwork asks torchvision for
    `vgg16(weights=VGG16_Weights.DEFAULT)` (a download), so the name is replaced in its module by a vgg16()
    holding these features. Its alpha/beta are its packaged ones. Run in float64, a closer reference."""
    from torchmetrics.functional.image import dists as tm_dists
    from torchvision.models import vgg16

    def seeded_vgg16(weights=None, **kwargs):
        assert weights is not None  # torchmetrics asks for the ImageNet weights: these stand in for them
        with torch.device("meta"):  # the 120M-value classifier is never used: not initialised
            model = vgg16(**kwargs)
        given = {k.removeprefix("features."): v.clone() for k, v in vgg_state.items()}
        model.features.load_state_dict(given, assign=True)
        return model

    monkeypatch.setattr(tm_dists, "vgg16", seeded_vgg16)
    return tm_dists.DISTSNetwork().double().eval()


def test_dists_matches_torchmetrics(vgg_state, monkeypatch):
    oracle = _torchmetrics_dists(vgg_state, monkeypatch)
    model = DISTS(vgg_state, oracle.alpha.detach().float(), oracle.beta.detach().float())
    assert model.fitted
    x = torch.rand(3, 3, 48, 40, generator=_gen(10)) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, 48, 40, generator=_gen(11))).clamp(-1, 1)
    z = torch.rand(3, 3, 48, 40, generator=_gen(12)) * 2 - 1  # unrelated images: a large distance
    for a, b in ((x, y), (x, z), (y, z)):
        got = model(a, b)  # ours takes [-1, 1]; torchmetrics [0, 1] (both then ImageNet-normalise)
        want = oracle(((a + 1) / 2).double(), ((b + 1) / 2).double())
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)  # measured: 1.6e-7
        assert (got > 1e-3).all()
    assert model(x, x).abs().max() < 1e-5
    # Gradients reach the image, none the frozen network.
    xg = x.clone().requires_grad_(True)
    model(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0 and all(p.grad is None for p in model.parameters())


def test_dists_alpha_beta_default_to_torchmetrics_file(vgg_state, tmp_path):
    """With no user file the alpha/beta are torchmetrics' packaged ones (when it ships them, torchmetrics
    >= 1.7), read with weights_only; a user file still comes first."""
    from torchmetrics.functional.image import dists as tm_dists

    from lib_anydressing.anydressing_trainer import dists as dists_module

    assert dists_module.packaged_alpha_beta().resolve() == tm_dists._PATH_WEIGHT_DISTS
    tm = load_tensors(tm_dists._PATH_WEIGHT_DISTS)
    vgg_file = tmp_path / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in vgg_state.items()}, str(vgg_file))
    model = load_dists(vgg_file)
    total = tm["alpha"].sum() + tm["beta"].sum()
    assert model.fitted
    torch.testing.assert_close(model.alpha, tm["alpha"].flatten() / total)
    torch.testing.assert_close(model.beta, tm["beta"].flatten() / total)
    user = tmp_path / "mine.pt"
    torch.save({"alpha": torch.ones(N_MAPS), "beta": torch.zeros(N_MAPS)}, user)
    torch.testing.assert_close(load_dists(vgg_file, user).alpha, torch.full((N_MAPS,), 1 / N_MAPS))


def test_dists_packaged_alpha_beta_order_and_no_import(tmp_path, monkeypatch):
    """torchmetrics' file before DISTS_pytorch's, each only when present; packages are found, not imported."""
    import subprocess
    import sys

    from lib_anydressing.anydressing_trainer import dists as dists_module

    fake = tmp_path / "site" / "DISTS_pytorch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise RuntimeError('imported')\n")
    torch.save({"alpha": torch.ones(N_MAPS), "beta": torch.ones(N_MAPS)}, fake / "weights.pt")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert dists_module._package_file("DISTS_pytorch", "weights.pt") == fake / "weights.pt"
    assert dists_module._package_file("DISTS_pytorch", "absent.pt") is None
    assert dists_module._package_file("no_such_package_here", "weights.pt") is None
    assert "DISTS_pytorch" not in sys.modules
    real = dists_module._package_file
    hidden: set[str] = set()
    monkeypatch.setattr(dists_module, "_package_file", lambda p, r: None if p in hidden else real(p, r))
    assert dists_module.packaged_alpha_beta().parts[-2:] == ("dists_models", "weights.pt")
    hidden.add("torchmetrics")
    assert dists_module.packaged_alpha_beta() == fake / "weights.pt"
    hidden.add("DISTS_pytorch")
    assert dists_module.packaged_alpha_beta() is None
    # Finding torchmetrics' file does not import torchmetrics (its import pulls in much of its metrics).
    code = (
        "import sys; from lib_anydressing.anydressing_trainer.dists import packaged_alpha_beta; "
        "assert packaged_alpha_beta() is not None; assert 'torchmetrics' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_dists_runs_in_float32_under_autocast(vgg_state):
    """The trainer calls DISTS inside autocast: bf16 statistics would lose most digits (the value here moves
    by ~30%), and fp16 would round the L2 pooling's epsilon away (sqrt(0): NaN gradient)."""
    model = DISTS(vgg_state)
    x = torch.rand(2, 3, 32, 32, generator=_gen(30)) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 32, 32, generator=_gen(31))).clamp(-1, 1)
    want = model(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(x, y)
        got_from_bf16 = model(x.bfloat16(), y.bfloat16())  # inputs already in the autocast dtype
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_from_bf16, model(x.bfloat16().float(), y.bfloat16().float()), atol=1e-6, rtol=1e-6)
    # A garment mask over an all-black prediction: every pixel -1, whole VGG channels exactly 0 after ReLU.
    black = torch.full((1, 3, 32, 32), -1.0, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = model(black, y[:1])
    d.sum().backward()
    assert torch.isfinite(d).all() and torch.isfinite(black.grad).all() and black.grad.abs().sum() > 0


def test_dists_files_and_uniform_fallback(vgg_state, tmp_path, monkeypatch):
    from lib_anydressing.anydressing_trainer import dists as dists_module

    monkeypatch.setattr(dists_module, "packaged_alpha_beta", lambda: None)
    vgg_file = tmp_path / "vgg16.safetensors"
    save_file({k: v.contiguous() for k, v in vgg_state.items()}, str(vgg_file))
    uniform = load_dists(vgg_file)
    assert not uniform.fitted
    torch.testing.assert_close(uniform.alpha, torch.full((N_MAPS,), 1 / (2 * N_MAPS)))
    ab_file = tmp_path / "weights.pt"
    alpha = torch.rand(1, N_MAPS, 1, 1, generator=_gen(14))
    torch.save({"alpha": alpha, "beta": alpha.flip(1)}, ab_file)
    fitted = load_dists(vgg_file, ab_file)
    assert fitted.fitted
    torch.testing.assert_close(fitted.alpha * (2 * alpha.sum()), alpha.flatten())
    broken = tmp_path / "vgg_broken.safetensors"
    save_file({k: v.contiguous() for k, v in vgg_state.items() if "features.28" not in k}, str(broken))
    with pytest.raises(DISTSWeightsError, match="features.28"):
        load_dists(broken)


def test_perceptual_loss_averages_dists_over_masked_garments(vgg_state):
    model = DISTS(vgg_state)
    decoded = torch.rand(1, 3, 32, 32, generator=_gen(15)) * 2 - 1
    target = torch.rand(1, 3, 32, 32, generator=_gen(16)) * 2 - 1
    masks = torch.zeros(1, 2, 32, 32)
    masks[0, 0, :16], masks[0, 1, 16:] = 1, 1
    got = losses.perceptual_loss(decoded, target, masks, model)
    per_k = []
    for k in range(2):
        m = masks[0, k]
        x = ((decoded[0] + 1) / 2 * m) * 2 - 1  # I_hat * M_k in [0, 1], passed to DISTS in [-1, 1]
        y = ((target[0] + 1) / 2 * m) * 2 - 1
        per_k.append(model(x[None], y[None]))
    assert got.item() == pytest.approx(float(sum(per_k) / 2), rel=1e-5)


# --- GTL: only t <= eta ---------------------------------------------------------------------------------------


def test_texture_loss_only_for_samples_at_or_below_eta():
    decoded_rows = []

    def decode(z):
        decoded_rows.append(z.shape[0])
        return torch.tanh(z.mean(1, keepdim=True).repeat(1, 3, 1, 1))  # a stand-in decoder: latents -> images

    z_t = torch.randn(3, 4, 8, 8, generator=_gen(17))
    eps = torch.randn(3, 4, 8, 8, generator=_gen(18))
    abar = torch.tensor([0.7, 0.4, 0.2])
    t = torch.tensor([350, 351, 10])
    target = torch.rand(3, 3, 8, 8, generator=_gen(19)) * 2 - 1
    target[:, :, :, 4:] = 1  # an edge for Canny
    masks = torch.ones(3, 1, 8, 8)
    edges = images.canny_edges(target)[:, 0]
    where = losses.TextureTarget(target, masks, edges)
    perc, hf = losses.texture_loss(decode, z_t, eps, abar, t, where, eta=350, hf=True)
    assert decoded_rows == [2] and perc.item() == 0  # rows 0 and 2 decoded; no DISTS given
    want = 0.0
    for b in (0, 2):
        a = abar[b]
        z0 = (z_t[b] - math.sqrt(1 - a) * eps[b]) / math.sqrt(a)
        image = decode(z0[None])[0]
        grey = cv2.cvtColor(((target[b] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy(), cv2.COLOR_RGB2GRAY)
        edge = torch.from_numpy(cv2.Canny(np.ascontiguousarray(grey), 100, 200) > 0).float()
        want += float(((((image + 1) / 2) * edge - ((target[b] + 1) / 2) * edge) ** 2).sum())
    assert hf.item() == pytest.approx(want / 3, rel=1e-5)  # the batch mean counts the t > eta row as 0
    decoded_rows.clear()
    none = losses.texture_loss(decode, z_t, eps, abar, torch.tensor([351, 999, 400]), where, eta=350)
    assert decoded_rows == [] and all(v.item() == 0 for v in none)
