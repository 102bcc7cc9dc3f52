"""Pins storage/authors_checkpoint.py: the DTR release's {"model", "ema", "opt", "config"} files load as data,
with model, routing, schedule and VAE taken from their OmegaConf config."""

import os
import subprocess
import sys

import pytest
import torch

import sample
from command_line import run_cli
from models import create_model
from models.routing import build_masks
from sampling.model_from_checkpoint import load_checkpoint
from storage.authors_checkpoint import load_with_omegaconf_config, release_settings
from test_extract_features import tiny_vae  # noqa: F401  (a local 2-level AutoencoderKL)

omegaconf = pytest.importorskip("omegaconf")  # only to WRITE a genuine file; reading needs no omegaconf
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def release_config(**routing):
    """The release's Hydra config as their train.py saves it (base_config.yaml + models/DiT.yaml)."""
    cfg = omegaconf.OmegaConf.create({
        "general": {"image_size": 64, "schedule_name": "cosine", "loss_weight_type": "uw", "vae": "mse",
                    "mixed_precision": True, "global_batch_size": 256},
        "optim": {"lr": 1e-4, "weight_decay": 0.0},
        "data": {"name": "ImageNet", "num_classes": 10, "is_uncond": 0},
        "models": {"name": "DiT-S/8", "param": {"num_classes": "${data.num_classes}", "latent_size": 8},
                   "routing": {"sharing_ratio": 0.6, "taskcount": 1000, "init_method": "DTR", **routing}},
        "logs": {"results_dir": "results/${data.name}/${general.schedule_name}_scheduling"},
    })
    omegaconf.OmegaConf.set_struct(cfg, True)  # as Hydra hands it to main()
    return cfg


def release_state_dict(model):
    """Our weights plus the release's per-block mask tables, blocks.{i}.routing._unit_mapping (float)."""
    state = dict(model.state_dict())
    for i, block in enumerate(model.blocks):
        state[f"blocks.{i}.routing._unit_mapping"] = block.routing.masks.float()
    return state


@pytest.fixture(scope="module")
def release_file(tmp_path_factory):
    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=8, num_classes=10, routing="dtr", alpha=4.0, beta=0.6)
    for p in model.final_layer.parameters():
        p.data.normal_(0, 0.02)  # so the output depends on the weights
    state = release_state_dict(model)
    path = tmp_path_factory.mktemp("release") / "0400000.pt"
    # "model" and "ema" share storage, so the file stays small
    torch.save({"model": state, "ema": state, "opt": {"state": {}, "param_groups": []},
                "config": release_config(), "uw": {"loss_scale": torch.zeros(8)}}, path)
    return str(path), model.eval()


def test_release_file_samples_with_its_config_settings(release_file):
    path, source = release_file
    model, settings = load_checkpoint(path)
    assert settings.model_name == "DiT-S/8" and settings.image_size == 64 and settings.weights == "ema"
    assert settings.diffusion_config["noise_schedule"] == "cosine"  # not official DiT's linear
    assert settings.vae == "stabilityai/sd-vae-ft-mse"
    assert model.num_classes == 10  # through the ${data.num_classes} interpolation
    assert model.routing_config() == {"routing": "dtr", "alpha": 4.0, "beta": 0.6, "routing_seed": 0}
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 990]), torch.tensor([1, 7])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), source(x, t, y))


def test_flags_must_agree_with_the_release_config(release_file):
    path, _ = release_file
    with pytest.raises(ValueError, match="--noise-schedule linear conflicts with the checkpoint's noise_schedule 'cosine'"):
        load_checkpoint(path, {"noise_schedule": "linear"})
    with pytest.raises(ValueError, match="--beta 0.8 conflicts with the checkpoint's beta 0.6"):
        load_checkpoint(path, {"beta": 0.8})
    model, settings = load_checkpoint(path, {"noise_schedule": "cosine", "model": "DiT-S/8"})
    assert settings.diffusion_config["noise_schedule"] == "cosine"


def test_config_becomes_plain_data_without_omegaconf(release_file):
    path, _ = release_file
    # a fresh interpreter where `import omegaconf` fails: nothing of OmegaConf may be needed to read the file
    code = ("import sys; sys.modules['omegaconf'] = None\n"
            "from storage.authors_checkpoint import load_with_omegaconf_config\n"
            f"c = load_with_omegaconf_config({path!r})['config']\n"
            "assert type(c) is dict and c['models']['param']['num_classes'] == 10, c\n"
            "assert c['logs']['results_dir'] == 'results/${data.name}/${general.schedule_name}_scheduling'\n"
            "assert 'omegaconf' not in {m.split('.')[0] for m in sys.modules if sys.modules[m] is not None}\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))


class RunsCode:
    """An object whose unpickling would run a shell command."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_code_in_a_release_file_is_refused_not_run(tmp_path):
    marker = tmp_path / "ran"
    cfg = release_config()
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "ema": {}, "config": cfg, "extra": RunsCode(marker)}, path)
    with pytest.raises(Exception, match="os.system|posix.system"):
        load_checkpoint(str(path))
    assert not marker.exists()


def test_release_routing_tables_default_raw_state_dicts_to_dtr_and_cosine(tmp_path):
    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=8, num_classes=1000, routing="dtr")  # the release's alpha 4, beta 0.8
    torch.save(release_state_dict(model), tmp_path / "release_raw.pt")
    loaded, settings = load_checkpoint(str(tmp_path / "release_raw.pt"), {"model": "DiT-S/8", "image_size": 64})
    assert settings.diffusion_config["noise_schedule"] == "cosine"
    assert loaded.routing_config()["routing"] == "dtr"
    torch.save(model.state_dict(), tmp_path / "plain_raw.pt")  # no tables: official DiT's settings
    loaded, settings = load_checkpoint(str(tmp_path / "plain_raw.pt"), {"model": "DiT-S/8", "image_size": 64})
    assert settings.diffusion_config["noise_schedule"] == "linear" and loaded.routing_config()["routing"] == "none"


def test_release_settings_map_the_release_names():
    config = {"models": {"name": "DiT-L/2", "param": {"num_classes": "${data.num_classes}"},
                         "routing": {"sharing_ratio": 0.8, "init_method": "random"}},
              "general": {"image_size": 256, "schedule_name": "linear", "vae": "ema"}}
    # an interpolation whose target is missing stays unresolved, so num_classes is left to flags
    assert release_settings(config) == {"model": "DiT-L/2", "num_classes": None, "image_size": 256,
                                        "routing": "random", "alpha": 4.0, "beta": 0.8,
                                        "noise_schedule": "linear", "vae": "ema"}
    assert release_settings({"model": {"name": "DiT-L/2"}})["model"] == "DiT-L/2"  # the ANT release's layout
    with pytest.raises(ValueError, match="init_method 'MaTL'"):
        release_settings({"models": {"routing": {"init_method": "MaTL"}}})


def test_plain_files_still_load_through_the_same_reader(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "plain.pt")
    assert torch.equal(load_with_omegaconf_config(tmp_path / "plain.pt")["w"], torch.arange(3.0))


SMALL = dict(hidden_size=64, depth=2, num_heads=2)  # DiT-S/8 made small: --model-arg on the command line
SMALL_ARGS = [a for k, v in SMALL.items() for a in ("--model-arg", f"{k}={v}")]


@pytest.fixture(scope="module")
def release_rtr_file(tmp_path_factory):
    """A release R-TR file: masks drawn unseeded there (here: a seed our loader does not know), stored per block."""
    torch.manual_seed(0)
    model = create_model("DiT-S/8", input_size=8, num_classes=10, routing="random", beta=0.6, routing_seed=1234,
                         **SMALL)
    for p in model.final_layer.parameters():
        p.data.normal_(0, 0.02)
    state = release_state_dict(model)
    path = tmp_path_factory.mktemp("release_rtr") / "0400000.pt"
    torch.save({"model": state, "ema": state, "opt": {"state": {}, "param_groups": []},
                "config": release_config(init_method="random")}, path)
    return str(path), model.eval(), state


def test_release_rtr_file_samples_with_the_masks_it_stores(release_rtr_file, tmp_path, tiny_vae):
    path, source, state = release_rtr_file
    model, _ = load_checkpoint(path, {"model_args": SMALL})
    assert model.routing_config()["routing"] == "random"
    for i, block in enumerate(model.blocks):  # the file's tables, not the ones routing_seed 0 would build
        assert torch.equal(block.routing.masks, state[f"blocks.{i}.routing._unit_mapping"].bool())
    assert not torch.equal(model.blocks[0].routing.masks, build_masks("random", 1000, 64, beta=0.6, seed=0).bool())
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 990]), torch.tensor([1, 7])
    with torch.no_grad():
        assert torch.equal(model(x, t, y), source(x, t, y))
    # the command a user runs: it samples, with no traceback
    code, stderr = run_cli(sample.main, sample.build_parser(), [
        "--ckpt", path, "--vae", tiny_vae[0], "--num-sampling-steps", "2", "--class-labels", "3",
        "--samples-per-class", "1", "--out", tmp_path / "grid.png", *SMALL_ARGS], "sample.py")
    assert code == 0 and "error" not in stderr and os.path.isfile(tmp_path / "grid.png")


def test_our_seeded_rtr_and_stored_tables_of_other_routing(release_rtr_file, tmp_path):
    _, _, state = release_rtr_file
    ours = create_model("DiT-S/8", input_size=8, num_classes=10, routing="random", beta=0.6, routing_seed=5, **SMALL)
    ours.load_state_dict(create_model("DiT-S/8", input_size=8, num_classes=10, routing="random", beta=0.6,
                                      routing_seed=5, **SMALL).state_dict())  # our files store no tables: seeded
    assert torch.equal(ours.blocks[1].routing.masks, build_masks("random", 1000, 64, beta=0.6, seed=6).bool())
    # the release's R-TR tables as a raw state_dict default to DTR, which they are not: one line, and a way out
    torch.save(state, tmp_path / "raw.pt")
    argv = ["--ckpt", tmp_path / "raw.pt", "--model", "DiT-S/8", "--image-size", "64", "--num-classes", "10",
            "--beta", "0.6", "--out", tmp_path / "grid.png", *SMALL_ARGS]
    code, stderr = run_cli(sample.main, sample.build_parser(), argv, "sample.py")
    assert code == 2 and len(stderr.splitlines()) == 1
    assert stderr.startswith(f"sample.py: error: cannot load {tmp_path / 'raw.pt'}: checkpoint routing masks "
                             "blocks.0.routing._unit_mapping")
    assert stderr.endswith("(--routing random takes the masks stored in the file)\n")
    model, _ = load_checkpoint(str(tmp_path / "raw.pt"), {"model": "DiT-S/8", "image_size": 64, "num_classes": 10,
                                                          "beta": 0.6, "routing": "random", "model_args": SMALL})
    assert torch.equal(model.blocks[0].routing.masks, state["blocks.0.routing._unit_mapping"].bool())
    assert not os.path.exists(tmp_path / "grid.png")
