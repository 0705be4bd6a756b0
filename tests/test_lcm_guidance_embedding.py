"""LCM-distilled UNets that take the guidance scale as an input (diffusers' `time_cond_proj_dim`, e.g. 256 in
LCM_Dreamshaper_v7): a random diffusers UNet with one, loaded into ours, gives the same outputs for the same w; a
whole `--sampler lcm` run gives diffusers' LatentConsistencyModelPipeline loop (LCMScheduler), with one UNet pass
per step; the checkpoint loader sets `time_cond_proj_dim` from the file."""

from __future__ import annotations

import pytest
import torch
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, UNet2DConditionModel
from torch import nn

from ldm.adapters.naming import unet_block_map
from ldm.files.checkpoints import CheckpointError, read_state_dict
from ldm.generation.generate import SampleSettings, solve
from ldm.generation.load import GUIDANCE_PROJ_KEY, build_model, load_config, with_unet_options_of
from ldm.models.diffusion.ddpm import linear_schedule
from ldm.modules.diffusionmodules.openaimodel import UNetModel, guidance_embedding
from ldm.speed.runtime import Runtime
from tests.test_parity_diffusers import (
    CONTEXT_DIM,
    TOL,
    UNET_CONFIGS,
    UNET_RENAMES,
    convert,
    diffusers_unet_config,
    randomize_,
    rel_err,
)

CFG = UNET_CONFIGS["sd1_like"]
PROJ_DIM = 16
KEY = "time_embedding.cond_proj.weight"  # diffusers' name, kept as is by its diffusers-to-original converter


def get_guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)


def diffusers_to_ours(sd: dict[str, torch.Tensor], ours: UNetModel) -> dict[str, torch.Tensor]:
    """diffusers' UNet keys -> ours: the parity test's mapping inverted; the guidance projection keeps its name."""
    keys = [k for k in ours.state_dict() if k != KEY]
    numbered = convert({k: torch.tensor(float(i)) for i, k in enumerate(keys)}, unet_block_map(
        CFG["channel_mult"], CFG["num_res_blocks"], CFG["attention_resolutions"]), UNET_RENAMES)  # fmt: skip
    inverse = {theirs: keys[int(v)] for theirs, v in numbered.items()}
    assert KEY in sd and len(inverse) == len(sd) - 1
    return {inverse.get(k, k): v for k, v in sd.items()}


def unet_pair() -> tuple[UNetModel, UNet2DConditionModel]:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        theirs = UNet2DConditionModel(**diffusers_unet_config(CFG), time_cond_proj_dim=PROJ_DIM).eval()
    randomize_(theirs, 5)
    ours = UNetModel(in_channels=4, out_channels=4, context_dim=CONTEXT_DIM, time_cond_proj_dim=PROJ_DIM, **CFG).eval()
    ours.load_state_dict(diffusers_to_ours(theirs.state_dict(), ours), strict=True)
    return ours, theirs


def test_guidance_embedding_equals_diffusers():
    w = torch.tensor([0.0, 0.5, 7.0, 14.0])
    for dim in (16, 256, 7):
        torch.testing.assert_close(guidance_embedding(w, dim), get_guidance_scale_embedding(w, dim))


@pytest.mark.parametrize("scale", [1.0, 4.0, 8.5])
def test_unet_with_guidance_input_equals_diffusers(scale):
    ours, theirs = unet_pair()
    g = torch.Generator().manual_seed(7)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, CONTEXT_DIM, generator=g)
    t = torch.tensor([19, 759])
    w_emb = get_guidance_scale_embedding(torch.full((2,), scale - 1.0), PROJ_DIM)
    with torch.no_grad():
        expected = theirs(x, t, encoder_hidden_states=context, timestep_cond=w_emb).sample
        got = ours(x, t, context, guidance_scale=scale)
        without = ours(x, t, context)  # no scale given: no guidance embedding, as diffusers without timestep_cond
        expected_without = theirs(x, t, encoder_hidden_states=context).sample
    assert rel_err(got, expected) < TOL
    assert rel_err(without, expected_without) < TOL
    assert rel_err(got, without) > 10 * TOL  # the embedding is not a no-op


class TinyModel(nn.Module):
    """What `solve` asks of a model: its UNet under model.diffusion_model, apply_model, alphas_cumprod."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.model = nn.Module()
        self.model.diffusion_model = unet
        self.register_buffer("alphas_cumprod", linear_schedule(1000, 0.00085, 0.012)["alphas_cumprod"])
        self.batches: list[int] = []
        unet.register_forward_hook(lambda m, args, out: self.batches.append(args[0].shape[0]))

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.model.diffusion_model(x, t, context=cond)


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_sampling_equals_diffusers_lcm_pipeline_loop(steps):
    """The LatentConsistencyModelPipeline's loop (UNet with timestep_cond, LCMScheduler.step) against `solve` with
    `--sampler lcm` at the same scale: equal latents, one UNet pass of the batch's size per step, no uncond."""
    ours, theirs = unet_pair()
    scale, n = 8.0, 2
    g = torch.Generator().manual_seed(3)
    x_T, cond = torch.randn(n, 4, 8, 8, generator=g), torch.randn(n, 77, CONTEXT_DIM, generator=g)
    sched = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    sched.set_timesteps(steps)
    w_emb = get_guidance_scale_embedding(torch.tensor(scale - 1).repeat(n), PROJ_DIM)
    latents, noise = x_T.clone(), torch.Generator().manual_seed(11)
    with torch.no_grad():
        for t in sched.timesteps:
            eps = theirs(latents, t, encoder_hidden_states=cond, timestep_cond=w_emb).sample
            latents, denoised = sched.step(eps, t, latents, generator=noise, return_dict=False)
    model = TinyModel(ours)
    s = SampleSettings(steps=steps, sampler="lcm", scale=scale, height=64, width=64, n_samples=n)
    uncond = torch.zeros_like(cond)  # given, as txt2img would: an embedded-guidance UNet must not use it
    with torch.no_grad():
        got = solve(model, s, cond, uncond, x_T, torch.Generator().manual_seed(11), progress=False)
    assert model.batches == [n] * steps
    assert ours.guidance_scale is None  # restored after the run
    torch.testing.assert_close(got, denoised, rtol=1e-4, atol=1e-4)


DIGITS = "configs/demo/digits.yaml"


def test_loader_sets_time_cond_proj_dim_from_the_file():
    config = load_config(DIGITS)
    sd, _ = read_state_dict(config.txt2img.ckpt)
    assert with_unet_options_of(config.model, sd) is config.model  # a normal checkpoint: the config as it is
    sd = {**sd, GUIDANCE_PROJ_KEY: torch.randn(64, 32)}
    model, _ = build_model(config.model, sd, Runtime(torch.device("cpu")))
    unet = model.model.diffusion_model
    assert unet.time_cond_proj_dim == 32
    assert torch.equal(unet.time_embedding.cond_proj.weight, sd[GUIDANCE_PROJ_KEY])
    assert "time_cond_proj_dim" not in config.model.params.unet_config.params  # the caller's config is not changed
    with pytest.raises(CheckpointError, match="no params.unet_config"):
        with_unet_options_of({"target": "x.Y", "params": {}}, sd)
