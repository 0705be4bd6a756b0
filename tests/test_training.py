"""Training smoke tests: a few steps of each demo stage through `main.py` on a slice of the data.

Each stage must lower its loss on a fixed batch with fixed noise, and its `last.ckpt` must load back
(through the safe reader) into the inference model with the original key layout.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.data.digits import DigitsDataset, caption_variants, collate
from ldm.files.checkpoints import read_state_dict

from .conftest import REPO

sys.path.insert(0, str(REPO))
import main as train_main  # noqa: E402

AE_CONFIG = REPO / "configs" / "demo" / "digits-autoencoder.yaml"
LDM_CONFIG = REPO / "configs" / "demo" / "digits.yaml"
STEPS = 12
SMALL = [
    f"lightning.trainer.max_steps={STEPS}",
    "lightning.trainer.log_every_n_steps=1",
    "lightning.trainer.enable_progress_bar=false",
    "lightning.trainer.enable_model_summary=false",
    "data.params.batch_size=16",
    "data.params.limit=64",
]


def fixed_batch() -> dict:
    data = DigitsDataset("train", limit=16)
    return collate([data[i] for i in range(16)])


def ae_loss(module, batch) -> float:
    with torch.no_grad():
        posterior = module.encode(batch["image"])
        return float((module.decode(posterior.mode()) - batch["image"]).abs().mean())


def ldm_loss(module, batch) -> float:
    torch.manual_seed(0)
    with torch.no_grad():
        return float(module.loss(batch, drop_captions=False))


def load_module(config_path: Path, overrides: list[str], ckpt: Path | None):
    config = OmegaConf.merge(OmegaConf.load(config_path), OmegaConf.from_dotlist(overrides))
    torch.manual_seed(23)
    module = train_main.build_module(config)
    if ckpt is not None:
        sd, _ = read_state_dict(ckpt)
        module.load_state_dict(sd, strict=True)
    return module.eval()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("logs")
    rc = train_main.main(["--base", str(AE_CONFIG), "-t", "-l", str(logs), "--threads", "1", *SMALL])
    assert rc == 0
    return logs / "digits-autoencoder" / "checkpoints" / "last.ckpt"


def test_autoencoder_stage_lowers_its_loss(stage1):
    batch = fixed_batch()
    before = ae_loss(load_module(AE_CONFIG, [], None), batch)
    after = ae_loss(load_module(AE_CONFIG, [], stage1), batch)
    assert after < 0.8 * before, (before, after)
    sd, info = read_state_dict(stage1)
    assert info["global_step"] == STEPS
    assert {k.split(".")[0] for k in sd} == {"encoder", "decoder", "quant_conv", "post_quant_conv"}


def test_diffusion_stage_lowers_its_loss_and_loads_into_txt2img_model(stage1, tmp_path):
    logs = tmp_path / "logs"
    overrides = [f"training.params.first_stage_ckpt={stage1}", "training.params.use_ema=true"]
    rc = train_main.main(["--base", str(LDM_CONFIG), "-t", "-l", str(logs), "--threads", "1", *SMALL, *overrides])
    assert rc == 0
    last = logs / "digits" / "checkpoints" / "last.ckpt"
    batch = fixed_batch()
    before = ldm_loss(load_module(LDM_CONFIG, overrides, None), batch)
    trained = load_module(LDM_CONFIG, overrides, last)
    assert ldm_loss(trained, batch) < 0.9 * before
    sd, info = read_state_dict(last)
    assert info["global_step"] == STEPS
    # The first stage stayed frozen at stage 1's weights.
    stage1_sd, _ = read_state_dict(stage1)
    for key, value in stage1_sd.items():
        assert torch.equal(sd["first_stage_model." + key], value), key
    # Rows of tokens no caption uses are zero (and stayed so while the text encoder trained); the others not.
    emb = sd["cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"]
    used = trained.cond_stage_model.tokenize(caption_variants(3))
    assert emb[used.unique()].abs().sum(1).gt(0).all()
    assert int(emb.abs().sum(1).gt(0).sum()) < 100
    # The EMA twin of every UNet weight is stored in the original LitEma layout.
    unet_keys = [k for k in sd if k.startswith("model.diffusion_model.")]
    assert all("model_ema." + k[len("model.") :].replace(".", "") in sd for k in unet_keys)
    # And the file is what the inference model loads.
    from ldm.generation.load import load_model
    from ldm.speed.runtime import Runtime

    model = load_model(OmegaConf.load(LDM_CONFIG), last, Runtime(torch.device("cpu")), verbose=False)
    assert torch.equal(model.model.diffusion_model.out[2].weight, sd["model.diffusion_model.out.2.weight"])


def test_resume_continues_the_step_count(stage1, tmp_path):
    logs = tmp_path / "logs"
    args = ["-l", str(logs), "--threads", "1", *SMALL]
    assert train_main.main(["--base", str(AE_CONFIG), "-t", "-n", "run", *args]) == 0
    more = [a if not a.startswith("lightning.trainer.max_steps") else f"lightning.trainer.max_steps={STEPS + 4}"
            for a in args]
    assert train_main.main(["-r", str(logs / "run"), "-t", *more]) == 0
    _, info = read_state_dict(logs / "run" / "checkpoints" / "last.ckpt")
    assert info["global_step"] == STEPS + 4


def test_bad_invocations_are_one_line_errors(tmp_path, capsys):
    assert train_main.main(["-t"]) == 2
    assert "give a config with --base" in capsys.readouterr().err
    assert train_main.main(["--base", str(tmp_path / "nope.yaml"), "-t"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert train_main.main(["-r", str(tmp_path / "nothing"), "-t"]) == 2
    assert "cannot resume" in capsys.readouterr().err
    assert train_main.main(["--base", str(AE_CONFIG), "--bogus"]) == 2
    assert "unknown argument" in capsys.readouterr().err


def test_tiny_autoencoder_is_distilled_from_the_demo_vae(tmp_path):
    """configs/demo/digits-taesd.yaml: the student's loss against the frozen teacher falls, and its checkpoint holds
    the student alone, in the layout `load_taesd` reads (what models/demo/digits-taesd.safetensors was made from)."""
    from ldm.models.taesd import load_taesd

    config = REPO / "configs" / "demo" / "digits-taesd.yaml"
    rc = train_main.main(["--base", str(config), "-t", "-l", str(tmp_path), "--threads", "1", *SMALL,
                          "training.params.base_learning_rate=3e-3"])  # fmt: skip
    assert rc == 0
    ckpt = tmp_path / "digits-taesd" / "checkpoints" / "last.ckpt"
    sd, info = read_state_dict(ckpt)
    assert info["global_step"] == STEPS and {k.split(".")[0] for k in sd} == {"encoder", "decoder"}
    module = train_main.build_module(OmegaConf.load(config))
    batch = fixed_batch()
    with torch.no_grad():
        before = module.loss(batch)[0]
        module.load_state_dict(sd)
        after = module.loss(batch)[0]
    assert after < 0.8 * before, (before, after)
    tiny = load_taesd([ckpt], encoder_blocks=(1, 2, 2), decoder_blocks=(2, 2, 1))
    assert tiny.decode(torch.zeros(1, 4, 8, 8)).shape == (1, 3, 32, 32)
