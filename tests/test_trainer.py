"""The AnyDressing trainer on the real tiny ldm UNet / VAE and CLIP classes with random weights."""

from __future__ import annotations

import csv

import pytest
import torch

from lib_anydressing.anydressing_trainer import cli
from lib_anydressing.anydressing_trainer.config import ConfigError, TrainConfig
from lib_anydressing.anydressing_trainer.trainer import AnyDressingTrainer
from lib_anydressing.engine import Dresser, load_checkpoint
from lib_anydressing.files.images import canny_edges
from lib_anydressing.sd.random_models import tiny_stable_diffusion
from lib_anydressing.training.state import TrainingError

from same_run import assert_same_weights, torch_threads

SIZE = 64  # 64x64 images -> 8x8 latents: every UNet level has a token grid


def _item(seed: int, n: int = 2) -> dict:
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, SIZE, SIZE)
    for k in range(n):
        masks[k, k * SIZE // n : (k + 1) * SIZE // n] = 1  # garment k: a horizontal band
    person = torch.rand(3, SIZE, SIZE, generator=gen) * 2 - 1
    person[:, :, SIZE // 2 :] = 0.8  # an edge, so Canny finds something
    return {
        "person": person,
        "garments": torch.rand(n, 3, SIZE, SIZE, generator=gen) * 2 - 1,
        "masks": masks,
        "edges": canny_edges(person[None])[0, 0],
        "slots": torch.arange(n),
        "caption": "a shirt",
        "id": f"s{seed}",
    }


ITEMS = [_item(0), _item(1), _item(2)]


def _trainer(tmp_path, sd=None, items=ITEMS, dists=None, **overrides) -> AnyDressingTrainer:
    settings = {
        "size": [SIZE, SIZE],
        "garment_size": [SIZE, SIZE],
        "output_dir": str(tmp_path),
        "num_workers": 0,
        "save_every": 1000,
        "log_every": 1000,
        "slots": ["upper", "lower"],
        "device": "cpu",
        **overrides,
    }
    sd = sd or tiny_stable_diffusion(0)
    return AnyDressingTrainer(TrainConfig(**settings), sd, items, dists=dists, say=lambda _: None)


def _frozen_copy(sd) -> dict[str, dict[str, torch.Tensor]]:
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in sd.modules().items()}


def _log(tmp_path) -> list[dict[str, str]]:
    with (tmp_path / "loss_log.csv").open() as f:
        return list(csv.DictReader(f))


def test_igl_gradient_reaches_only_the_projections_and_garments_net(tmp_path):
    sd = tiny_stable_diffusion(0)
    trainer = _trainer(tmp_path, sd, loss_ldm=False, loss_hf=False, loss_perc=False, uncond_dropout=0.0)
    before = _frozen_copy(sd)
    with trainer.patched(), trainer.loss_scope():
        result = trainer.sample_losses(ITEMS[0])
        result.total.backward()
    assert result.loc.item() > 0 and result.ldm.item() == 0
    da = trainer.projections
    for name in da.layer_names:
        k, _ = da.pair(name)
        assert k.weight.grad is not None and k.weight.grad.abs().sum() > 0, name
    # V' reaches L_loc only through the queries of later layers: the last layer's V' gets nothing.
    last_v = da.pair(da.layer_names[-1])[1].weight.grad
    assert last_v is None or last_v.abs().sum() == 0
    assert da.pair(da.layer_names[0])[1].weight.grad.abs().sum() > 0
    gnet_grads = [p.grad for p in trainer.garments_net.unet.parameters() if p.grad is not None]
    assert gnet_grads and sum(g.abs().sum() for g in gnet_grads) > 0
    ups = [m.up.grad for m in trainer.trainable["lora"].modules() if hasattr(m, "up")]
    assert ups and all(g is not None for g in ups) and sum(g.abs().sum() for g in ups) > 0
    for module in sd.modules().values():
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    # A full optimiser step with every loss leaves DressingNet, VAE and text encoder bit-identical and unpatched.
    full = _trainer(tmp_path / "full", sd, uncond_dropout=0.0, eta=1000, gradient_checkpointing=True)
    full.train(steps=2)
    after = _frozen_copy(sd)
    for name, tensors in before.items():
        assert all(torch.equal(tensors[k], after[name][k]) for k in tensors), name
    assert not any("forward" in m.__dict__ for m in sd.unet.modules())
    assert float(_log(tmp_path / "full")[-1]["hf"]) > 0


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    trainer = _trainer(tmp_path, uncond_dropout=0.0, eta=1000)
    state = trainer.generator.get_state()
    grads = []
    for checkpointing in (False, True):
        trainer.cfg.gradient_checkpointing = checkpointing
        trainer.generator.set_state(state)
        trainer.optimizer.zero_grad(set_to_none=True)
        with trainer.patched(), trainer.loss_scope():
            trainer.sample_losses(ITEMS[1]).total.backward()
        grads.append({n: p.grad.clone() for n, p in trainer.trainable.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 100
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-4, msg=name)


def test_two_garment_toy_problem_learns_where_each_garment_goes(tmp_path):
    trainer = _trainer(
        tmp_path,
        tiny_stable_diffusion(0),
        items=ITEMS[:2],
        loss_ldm=False,
        loss_hf=False,
        loss_perc=False,
        uncond_dropout=0.0,
        cache_latents=True,
        lr=1e-3,
    )
    trainer.train(steps=100)
    loc = [float(r["loc"]) for r in _log(tmp_path)]
    assert len(loc) == 100
    first, last = sum(loc[:10]) / 10, sum(loc[-10:]) / 10
    assert last < 0.6 * first, (first, last)
    assert len(list((tmp_path / "latent_cache").rglob("*.safetensors"))) == 2


def test_gtl_only_for_timesteps_up_to_eta(tmp_path):
    for eta, expect in ((-1, False), (1000, True)):
        sd = tiny_stable_diffusion(0)
        calls = []
        decode = sd.decode_latents
        sd.decode_latents = lambda z, decode=decode, calls=calls: calls.append(z.shape[0]) or decode(z)
        trainer = _trainer(tmp_path / str(eta), sd, uncond_dropout=0.0, eta=eta)
        trainer.train(steps=3)
        rows = _log(tmp_path / str(eta))
        assert [float(r["hf"]) > 0 for r in rows] == [expect] * 3
        assert [int(r["texture_samples"]) for r in rows] == [int(expect)] * 3
        assert calls == ([1] * 3 if expect else [])


def test_loss_perc_off_ignores_a_given_dists(tmp_path):
    from torchvision.models.vgg import cfgs, make_layers

    from lib_anydressing.anydressing_trainer.dists import DISTS

    torch.manual_seed(0)
    dists = DISTS({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()})
    for perc in (True, False):
        _trainer(tmp_path / str(perc), dists=dists, uncond_dropout=0.0, eta=1000, loss_perc=perc).train(steps=1)
        row = _log(tmp_path / str(perc))[0]
        assert float(row["hf"]) > 0 and (float(row["perc"]) > 0) == perc, row


def test_saved_checkpoint_loads_in_the_engine_and_changes_dressed_outputs(tmp_path):
    sd = tiny_stable_diffusion(0)
    trainer = _trainer(tmp_path, sd, lr=1e-3, uncond_dropout=0.0)
    initial = trainer.save()
    trainer.train(steps=3)
    trained = sorted((tmp_path / "models").glob("*.safetensors"))[-1]
    assert trained != initial and trained.name == "anydressing_step0000003.safetensors"
    item = ITEMS[0]
    with torch.no_grad():
        garments = sd.encode_images(item["garments"])
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
        t = torch.tensor([500.0])
        context = sd.encode_text(["a shirt"])
        plain = sd.unet(x, t, context=context)
        outputs = []
        for path in (initial, trained):
            model = load_checkpoint(path)
            assert model.info.tap == "attn_output" and model.info.cross_attention == "skip"
            assert model.info.slots == ["upper", "lower"] and model.info.default_strength == 0.7
            assert model.lora.rank == 16 and model.info.lora_alpha == 16.0
            features = model.garments_net(sd.unet).extract(garments, slots=[0, 1])
            with Dresser(sd.unet, features, model.projections, strength=0.7):
                outputs.append(sd.unet(x, t, context=context))
        # The trainer's own modules give the loaded model's output: the file holds exactly what was trained.
        features = trainer.garments_net.extract(garments, slots=[0, 1])
        with Dresser(sd.unet, features, trainer.projections, strength=0.7):
            in_memory = sd.unet(x, t, context=context)
    torch.testing.assert_close(outputs[1], in_memory, atol=1e-6, rtol=1e-5)
    assert (outputs[0] - plain).abs().max() > 1e-4  # dressing acts
    assert (outputs[1] - outputs[0]).abs().max() > 1e-4  # and training changed what it does


RESUME_SETTINGS = {"gradient_accumulation": 2, "uncond_dropout": 0.3, "eta": 600, "lr": 1e-3}


def _split_run(tmp_path) -> AnyDressingTrainer:
    """Steps 1-3 on 1 thread (state saved at 2, step 3 logged then "lost"), resumed to step 4 on 2 threads:
    the resumed part carries another thread count's rounding, as on a machine where MKL's varies."""
    with torch_threads(1):
        _trainer(tmp_path, save_every=2, **RESUME_SETTINGS).train(steps=3)
    with torch_threads(2):
        resumed = _trainer(tmp_path, resume="latest", **RESUME_SETTINGS)
        resumed.train(steps=4)
    return resumed


def _check_same_run(straight_dir, straight: AnyDressingTrainer, resumed_dir, resumed: AnyDressingTrainer) -> None:
    assert resumed.step == 4
    assert_same_weights(straight.trainable.state_dict(), resumed.trainable.state_dict())
    log_a, log_b = _log(straight_dir), _log(resumed_dir)
    assert [r["step"] for r in log_b] == ["1", "2", "3", "4"]
    for row_a, row_b in zip(log_a, log_b, strict=True):  # logged to 6 digits: the last one may round either way
        assert row_a.keys() == row_b.keys()
        for key in row_a.keys() - {"step", "seconds"}:
            assert float(row_b[key]) == pytest.approx(float(row_a[key]), rel=1e-4, abs=1e-6), (row_a["step"], key)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("straight")
    with torch_threads(1):
        trainer = _trainer(folder, **RESUME_SETTINGS)
        trainer.train(steps=4)
    return folder, trainer


def test_resume_continues_the_same_run(tmp_path, straight_run):
    _check_same_run(*straight_run, tmp_path, _split_run(tmp_path))


def test_a_resume_that_loses_the_optimizer_state_fails_the_same_run_check(tmp_path, straight_run, monkeypatch):
    load = AnyDressingTrainer.resume

    def resume_with_fresh_optimizer(self, where):
        fresh = self.optimizer.state_dict()
        load(self, where)
        self.optimizer.load_state_dict(fresh)

    monkeypatch.setattr(AnyDressingTrainer, "resume", resume_with_fresh_optimizer)
    with pytest.raises(AssertionError, match="more than float rounding"):
        _check_same_run(*straight_run, tmp_path, _split_run(tmp_path))


def test_resume_into_fp16_loss_scaling(tmp_path, monkeypatch):
    """A state saved without fp16 (an empty scaler state) resumed by an fp16 run: the loss scale starts afresh;
    an unreadable scaler state is a TrainingError, not torch's raw error."""
    first = _trainer(tmp_path, save_every=1)
    first.train(steps=1)
    # The enabled GradScaler fp16 gets on CUDA (CPU-only torch would disable it on construction).
    monkeypatch.setattr(torch.cuda.amp.grad_scaler, "amp_definitely_not_available", lambda: False)
    said = []
    resumed = _trainer(tmp_path)
    resumed.say = said.append
    resumed.scaler = torch.cuda.amp.GradScaler()
    resumed.resume("latest")
    assert resumed.step == 1 and resumed.scaler.is_enabled()
    assert resumed.scaler.state_dict()["scale"] == 2.0**16  # torch's initial loss scale
    assert any("loss scale" in line for line in said)
    state = torch.load(tmp_path / "state" / "state.pt", weights_only=True)
    state["scaler"] = {"scale": 1024.0}  # no growth settings
    torch.save(state, tmp_path / "state" / "state.pt")
    broken = _trainer(tmp_path)
    broken.scaler = torch.cuda.amp.GradScaler()
    with pytest.raises(TrainingError, match="cannot be loaded"):
        broken.resume("latest")


def test_non_finite_loss_stops_before_touching_the_weights(tmp_path):
    bad = _item(3)
    bad["person"][0, 0, 0] = float("nan")
    trainer = _trainer(tmp_path, items=[bad], uncond_dropout=0.0)
    before = {k: v.clone() for k, v in trainer.trainable.state_dict().items()}
    with pytest.raises(TrainingError, match="not finite"):
        trainer.train(steps=2)
    after = trainer.trainable.state_dict()
    assert trainer.step == 0 and all(torch.equal(before[k], after[k]) for k in before)
    assert not (tmp_path / "state").exists()
    assert not any("forward" in m.__dict__ for m in trainer.sd.unet.modules())


def test_hf_uses_the_items_edge_map_and_captions_are_encoded_once(tmp_path, monkeypatch):
    from lib_anydressing.anydressing_trainer import trainer as trainer_module

    sd = tiny_stable_diffusion(0)
    encoded = []
    encode = sd.encode_text
    sd.encode_text = lambda prompts: encoded.append(prompts[0]) or encode(prompts)
    no_edges = [{**item, "edges": torch.zeros(SIZE, SIZE)} for item in ITEMS]
    trainer = _trainer(tmp_path, sd, no_edges, uncond_dropout=0.0, caption_dropout=0.0, eta=1000, loss_perc=False)
    trainer.train(steps=3)
    rows = _log(tmp_path)
    assert [int(r["texture_samples"]) for r in rows] == [1] * 3 and all(float(r["hf"]) == 0 for r in rows)
    assert encoded == ["a shirt"]  # three steps, one caption: encoded once
    want = encode(["a shirt"])
    assert torch.equal(trainer._text("a shirt"), want)
    monkeypatch.setattr(trainer_module, "TEXT_CACHE", 2)  # bounded: the least recently used caption goes
    for caption in ("a", "a shirt", "b", "a shirt", "a"):
        trainer._text(caption)
    assert encoded == ["a shirt", "a", "b", "a"]  # "b" pushed out "a", the older of the two


def test_train_command_from_a_single_file_checkpoint_and_a_manifest(tmp_path, capsys):
    from PIL import Image
    from safetensors.torch import save_file
    from support.synthetic import make_synthetic_dataset

    from lib_anydressing.sd.checkpoint import original_state_dict

    sd = tiny_stable_diffusion(0)
    save_file({k: v.contiguous() for k, v in original_state_dict(sd).items()}, str(tmp_path / "sd.safetensors"))
    (tmp_path / "tokenizer").mkdir()
    sd.tokenizer.save_vocabulary(str(tmp_path / "tokenizer"))
    make_synthetic_dataset(tmp_path / "data", n_samples=2, size=(SIZE, SIZE))
    config = tmp_path / "cfg.toml"
    config.write_text(
        '[model]\nsd_checkpoint = "sd.safetensors"\ntokenizer = "tokenizer"\nslots = ["upper", "lower"]\n'
        '[data]\nmanifest = "data/manifest.jsonl"\nsize = [64, 64]\ngarment_size = [64, 64]\nnum_workers = 0\n'
        '[train]\noutput_dir = "out"\nsteps = 2\nsample_every = 2\nsample_steps = 2\ndevice = "cpu"\n'
        "[loss]\neta = 1000\n"
    )
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    assert cli.main(parser.parse_args(["--config", str(config)])) == 0
    out = capsys.readouterr().out
    assert "2 of 2 samples usable" in out and "without L_perc" in out and "done: step 2" in out
    grid = Image.open(tmp_path / "out" / "samples" / "step0000002.png")
    assert grid.height == SIZE and grid.width > 3 * SIZE  # garments | target | generated
    assert [r["step"] for r in _log(tmp_path / "out")] == ["1", "2"]
    model = load_checkpoint(tmp_path / "out" / "models" / "anydressing_step0000002.safetensors")
    assert model.projections is not None and model.lora is not None and model.garments_net_weights
    config.write_text("[train]\nstepz = 3\n")
    with pytest.raises(ConfigError, match="stepz"):
        TrainConfig.from_toml(config)


def test_cli_reports_a_bad_config_without_a_traceback(tmp_path, capsys):
    config = tmp_path / "cfg.toml"
    config.write_text('[train]\nmixed_precision = "fp8"\n')
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser)
    assert cli.main(parser.parse_args(["--config", str(config)])) == 2
    assert "mixed_precision" in capsys.readouterr().out


def _rank_worker(rank: int, world: int, port: int, out: str) -> None:
    """One of `world` processes as torchrun starts them (its environment); Fabric joins them into DDP."""
    import os
    from pathlib import Path

    import torch.distributed as dist
    from safetensors.torch import save_file
    from torch.nn.parallel import DistributedDataParallel

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = _trainer(Path(out), save_every=2, uncond_dropout=0.0, lr=1e-3)
    assert isinstance(trainer.wrapped._forward_module, DistributedDataParallel) and trainer.world == world
    trainer.train(steps=2)
    weights = {k: v.contiguous() for k, v in trainer.trainable.state_dict().items()}
    save_file(weights, str(Path(out) / f"weights_rank{rank}.safetensors"))
    dist.destroy_process_group()


@pytest.mark.slow  # two processes
def test_two_processes_through_fabric_ddp_train_one_model_and_save_each_generator(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_rank_worker, args=(2, port, str(tmp_path)), nprocs=2)
    ranks = [load_file(str(tmp_path / f"weights_rank{r}.safetensors")) for r in range(2)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # one model, however the data was split
    initial = _trainer(tmp_path / "fresh").trainable.state_dict()
    assert any(not torch.equal(initial[k], ranks[0][k]) for k in initial)
    state = sorted(p.name for p in (tmp_path / "state").iterdir())
    assert state == ["generator_rank0.pt", "generator_rank1.pt", "state.pt", "weights.safetensors"]
    generators = [torch.load(tmp_path / "state" / f"generator_rank{r}.pt", weights_only=True) for r in range(2)]
    assert not torch.equal(*generators)  # each process draws its own timesteps and noise
    assert [r["step"] for r in _log(tmp_path)] == ["1", "2"]  # logged once, by process 0
