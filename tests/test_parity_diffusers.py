"""Numerical parity of our UNet and KL autoencoder with diffusers' independent implementations.

Small random configs, float32 on the CPU. Our model gets deterministic random weights (norm scales and
offsets away from 1/0, every "zero-initialised" output conv non-zero), its state dict is renamed to
diffusers' keys by the mapping in ldm.adapters.naming (UNet) and here (VAE), loaded into the diffusers model
with strict=True, and both models run on the same inputs. diffusers is a test-only dependency and is imported
unconditionally: a missing install is an error, never a silent skip.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import pytest
import torch
from diffusers import AutoencoderKL as DiffusersAutoencoderKL
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from diffusers.models.attention_processor import AttnProcessor
from torch import nn

from ldm.adapters.naming import UNET_RENAMES as NAMING_RENAMES
from ldm.adapters.naming import unet_block_map
from ldm.models.autoencoder import AutoencoderKL
from ldm.modules.diffusionmodules.openaimodel import UNetModel

TOL = 1e-4  # relative L2 error, float32
BROKEN_MIN = 10 * TOL  # a deliberately wrong mapping must miss the tolerance by at least 10x
CONTEXT_DIM = 32

StateDict = dict[str, torch.Tensor]
BlockMap = dict[str, tuple[str, str]]  # our key prefix -> (diffusers key prefix, kind of block)


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """These models are tiny: intra-op threads only add overhead, and on small shared VMs (2 vCPUs)
    the multi-threaded first call per shape was seen to take seconds instead of tens of ms."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all()
    denom = theirs.norm()
    assert denom > 0
    return ((ours - theirs).norm() / denom).item()


def randomize_(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter from a seeded generator.

    Norm weights are 1 + 0.1*randn and their biases 0.1*randn (so a skipped or swapped norm shows),
    other biases 0.1*randn, weights randn / sqrt(fan_in) so activations stay O(1) through the net.
    """
    g = torch.Generator().manual_seed(seed)
    seen = 0
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                noise = torch.randn(p.shape, generator=g)
                if isinstance(module, nn.GroupNorm | nn.LayerNorm):
                    p.copy_((1.0 if name == "weight" else 0.0) + 0.1 * noise)
                elif p.ndim == 1:
                    p.copy_(0.1 * noise)
                else:
                    p.copy_(noise / p[0].numel() ** 0.5)
                seen += 1
    assert seen == len(list(model.parameters()))


def convert(sd: StateDict, block_map: BlockMap, renames: dict[str, Sequence[tuple[str, str]]]) -> StateDict:
    """Rename our keys to diffusers' ones: one block prefix must match each key exactly, then the
    rest of the key goes through the renames of that block's kind (first matching leading part)."""
    out: StateDict = {}
    for key, value in sd.items():
        prefixes = [p for p in block_map if key.startswith(p)]
        assert len(prefixes) == 1, f"{key}: matched by {prefixes}"
        ours = prefixes[0]
        theirs, kind = block_map[ours]
        rest = key[len(ours) :]
        for old, new in renames.get(kind, ()):
            if rest.startswith(old):
                rest = new + rest[len(old) :]
                break
        if kind == "vae_attn" and rest.startswith(("to_q.", "to_k.", "to_v.", "to_out.0.")) and value.ndim == 4:
            value = value[:, :, 0, 0]  # 1x1 conv -> Linear
        new_key = theirs + rest
        assert new_key not in out, f"two keys map to {new_key}"
        out[new_key] = value
    return out


# ----------------------------------------------------------------------------- UNet

UNET_CONFIGS: dict[str, dict[str, Any]] = {
    # SD v1 layout in miniature: attention on every level but the last, 2 res blocks, fixed head count.
    "sd1_like": dict(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=2,
        attention_resolutions=(1, 2),
        num_heads=2,
        transformer_depth=1,
    ),
    # Attention on every level, fixed head width (SD 2 style head count per level), deeper transformers.
    "head_channels": dict(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        num_head_channels=16,
        transformer_depth=2,
    ),
}

# The UNet block map lives in ldm.adapters.naming (LoRA files name layers in either layout); it is checked here,
# against diffusers' own converter and by running both models.
UNET_RENAMES = NAMING_RENAMES


def make_our_unet(cfg: dict[str, Any], seed: int = 0) -> UNetModel:
    model = UNetModel(in_channels=4, out_channels=4, context_dim=CONTEXT_DIM, **cfg).eval()
    randomize_(model, seed)
    return model


def diffusers_unet_config(cfg: dict[str, Any]) -> dict[str, Any]:
    channels = tuple(cfg["model_channels"] * m for m in cfg["channel_mult"])
    attn = [2**level in cfg["attention_resolutions"] for level in range(len(channels))]
    if "num_head_channels" in cfg:
        heads = tuple(c // cfg["num_head_channels"] for c in channels)
    else:
        heads = (cfg["num_heads"],) * len(channels)
    return dict(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        center_input_sample=False,
        flip_sin_to_cos=True,
        freq_shift=0,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
        only_cross_attention=False,
        block_out_channels=channels,
        layers_per_block=cfg["num_res_blocks"],
        downsample_padding=1,
        mid_block_scale_factor=1,
        act_fn="silu",
        norm_num_groups=32,
        norm_eps=1e-5,
        cross_attention_dim=CONTEXT_DIM,
        transformer_layers_per_block=cfg["transformer_depth"],
        attention_head_dim=heads,  # diffusers' name for the number of heads (SD v1 semantics)
        use_linear_projection=False,
        upcast_attention=False,
        resnet_time_scale_shift="default",
    )


def unet_to_diffusers(model: UNetModel, cfg: dict[str, Any]) -> StateDict:
    block_map = unet_block_map(cfg["channel_mult"], cfg["num_res_blocks"], cfg["attention_resolutions"])
    return convert(model.state_dict(), block_map, UNET_RENAMES)


def make_unet_pair(
    name: str,
    sabotage: Callable[[StateDict], None] | None = None,
    classic_attention: bool = False,
    **config_overrides: Any,
) -> tuple[UNetModel, UNet2DConditionModel]:
    cfg = UNET_CONFIGS[name]
    ours = make_our_unet(cfg)
    with torch.random.fork_rng():  # diffusers' own init, all of it overwritten by the strict load
        torch.manual_seed(1234)
        theirs = UNet2DConditionModel(**{**diffusers_unet_config(cfg), **config_overrides}).eval()
    sd = unet_to_diffusers(ours, cfg)
    if sabotage is not None:
        sabotage(sd)
    theirs.load_state_dict(sd, strict=True)
    if classic_attention:
        theirs.set_attn_processor(AttnProcessor())
    return ours, theirs


@cache
def unet_pair(name: str, classic_attention: bool = False) -> tuple[UNetModel, UNet2DConditionModel]:
    """The correctly mapped pair, built once per session (the tests only run it under no_grad)."""
    return make_unet_pair(name, classic_attention=classic_attention)


def unet_inputs(h: int, w: int, seed: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, h, w, generator=g)
    context = torch.randn(2, 77, CONTEXT_DIM, generator=g)
    return x, context


def run_unets(ours: UNetModel, theirs: UNet2DConditionModel, h: int, w: int, timesteps: torch.Tensor) -> float:
    x, context = unet_inputs(h, w)
    with torch.no_grad():
        a = ours(x, timesteps, context)
        b = theirs(x, timesteps, encoder_hidden_states=context).sample
    assert a.shape == (2, 4, h, w)
    return rel_err(a, b)


TIMESTEPS = {
    "int64": torch.tensor([1, 999], dtype=torch.int64),
    "fractional": torch.tensor([0.5, 500.25]),
}


UNET_CASES = {  # (timesteps, height, width)
    "int64-square": ("int64", 16, 16),
    "int64-nonsquare": ("int64", 16, 24),
    "fractional-square": ("fractional", 16, 16),
}


@pytest.mark.parametrize("case", list(UNET_CASES))
@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_matches_diffusers(name: str, case: str) -> None:
    ts, h, w = UNET_CASES[case]
    ours, theirs = unet_pair(name)
    err = run_unets(ours, theirs, h, w, TIMESTEPS[ts])
    assert err < TOL, f"relative error {err:.3e}"


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_matches_diffusers_classic_attention(name: str) -> None:
    """Same with diffusers' explicit softmax(QK^T * scale)V processor instead of SDPA, so the check
    does not rest on both sides calling the same fused kernel."""
    ours, theirs = unet_pair(name, classic_attention=True)
    err = run_unets(ours, theirs, 16, 24, TIMESTEPS["int64"])
    assert err < TOL, f"relative error {err:.3e}"


def _swap(sd: StateDict, a: str, b: str) -> None:
    assert sd[a].shape == sd[b].shape
    sd[a], sd[b] = sd[b], sd[a]


def _reverse_skip_concat(sd: StateDict) -> None:
    """Input channels of the first up-block conv in the wrong order, as if the skip were concatenated first."""
    key = "up_blocks.0.resnets.0.conv1.weight"
    w = sd[key]
    half = w.shape[1] // 2  # lowest level: h and the skip have the same width
    sd[key] = torch.cat([w[:, half:], w[:, :half]], dim=1)


UNET_SABOTAGE: dict[str, Callable[[StateDict], None]] = {
    "resnet_norm1_norm2": lambda sd: _swap(
        sd, "down_blocks.0.resnets.0.norm1.weight", "down_blocks.0.resnets.0.norm2.weight"
    ),
    "transformer_norm2_norm3": lambda sd: _swap(
        sd,
        "mid_block.attentions.0.transformer_blocks.0.norm2.bias",
        "mid_block.attentions.0.transformer_blocks.0.norm3.bias",
    ),
    "self_cross_attention_v": lambda sd: _swap(
        sd,
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v.weight",
    ),
    "skip_concat_order": _reverse_skip_concat,
}


@pytest.mark.parametrize("sabotage", list(UNET_SABOTAGE))
def test_unet_parity_catches_a_broken_mapping(sabotage: str) -> None:
    ours, theirs = make_unet_pair("sd1_like", sabotage=UNET_SABOTAGE[sabotage])
    err = run_unets(ours, theirs, 16, 16, TIMESTEPS["int64"])
    assert err > BROKEN_MIN, f"sabotaged mapping still matches: {err:.3e}"


def test_unet_parity_catches_wrong_timestep_embedding() -> None:
    """[sin, cos] instead of SD's [cos, sin] must show."""
    ours, theirs = make_unet_pair("sd1_like", flip_sin_to_cos=False)
    err = run_unets(ours, theirs, 16, 16, TIMESTEPS["int64"])
    assert err > BROKEN_MIN, f"wrong timestep embedding still matches: {err:.3e}"


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_unet_mapping_agrees_with_diffusers_converter(name: str) -> None:
    """Cross-check of our key mapping against diffusers' own single-file (LDM checkpoint) converter."""
    cfg = UNET_CONFIGS[name]
    ours = make_our_unet(cfg)
    mine = unet_to_diffusers(ours, cfg)
    ckpt = {f"model.diffusion_model.{k}": v for k, v in ours.state_dict().items()}
    theirs = convert_ldm_unet_checkpoint(ckpt, diffusers_unet_config(cfg))
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        assert torch.equal(mine[k], theirs[k]), k


# ----------------------------------------------------------------------------- autoencoder

VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # SD v1's VAE in miniature: no attention outside the mid blocks.
    "sd1_like": dict(
        double_z=True,
        z_channels=4,
        resolution=32,
        in_channels=3,
        out_ch=3,
        ch=32,
        ch_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(),
        dropout=0.0,
    ),
    # Attention inside the lowest-resolution level too, two res blocks per level (three in the decoder).
    "level_attention": dict(
        double_z=True,
        z_channels=4,
        resolution=32,
        in_channels=3,
        out_ch=3,
        ch=32,
        ch_mult=(1, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        dropout=0.0,
    ),
}
EMBED_DIM = 4

VAE_RENAMES = {
    "resnet": (("nin_shortcut.", "conv_shortcut."),),
    "vae_attn": (
        ("norm.", "group_norm."),
        ("q.", "to_q."),
        ("k.", "to_k."),
        ("v.", "to_v."),
        ("proj_out.", "to_out.0."),
    ),
}


def vae_block_map(dd: dict[str, Any]) -> BlockMap:
    levels, n, attn_res = len(dd["ch_mult"]), dd["num_res_blocks"], dd["attn_resolutions"]
    m: BlockMap = {
        "quant_conv.": ("quant_conv.", "plain"),
        "post_quant_conv.": ("post_quant_conv.", "plain"),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in."] = (f"{part}.conv_in.", "plain")
        m[f"{part}.mid.block_1."] = (f"{part}.mid_block.resnets.0.", "resnet")
        m[f"{part}.mid.attn_1."] = (f"{part}.mid_block.attentions.0.", "vae_attn")
        m[f"{part}.mid.block_2."] = (f"{part}.mid_block.resnets.1.", "resnet")
        m[f"{part}.norm_out."] = (f"{part}.conv_norm_out.", "plain")
        m[f"{part}.conv_out."] = (f"{part}.conv_out.", "plain")
    for i in range(levels):
        res = dd["resolution"] // 2**i
        for j in range(n):
            m[f"encoder.down.{i}.block.{j}."] = (f"encoder.down_blocks.{i}.resnets.{j}.", "resnet")
            if res in attn_res:
                m[f"encoder.down.{i}.attn.{j}."] = (f"encoder.down_blocks.{i}.attentions.{j}.", "vae_attn")
        if i != levels - 1:
            m[f"encoder.down.{i}.downsample.conv."] = (f"encoder.down_blocks.{i}.downsamplers.0.conv.", "plain")
        up = levels - 1 - i  # our decoder.up is indexed by resolution level, diffusers' in execution order
        for j in range(n + 1):
            m[f"decoder.up.{i}.block.{j}."] = (f"decoder.up_blocks.{up}.resnets.{j}.", "resnet")
            if res in attn_res:
                m[f"decoder.up.{i}.attn.{j}."] = (f"decoder.up_blocks.{up}.attentions.{j}.", "vae_attn")
        if i != 0:
            m[f"decoder.up.{i}.upsample.conv."] = (f"decoder.up_blocks.{up}.upsamplers.0.conv.", "plain")
    return m


def diffusers_vae_config(dd: dict[str, Any]) -> dict[str, Any]:
    assert dd["z_channels"] == EMBED_DIM  # diffusers has a single latent width for both
    attn = [dd["resolution"] // 2**i in dd["attn_resolutions"] for i in range(len(dd["ch_mult"]))]
    return dict(
        in_channels=dd["in_channels"],
        out_channels=dd["out_ch"],
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)),
        block_out_channels=tuple(dd["ch"] * m for m in dd["ch_mult"]),
        layers_per_block=dd["num_res_blocks"],  # the decoder builds layers_per_block + 1 resnets per level
        act_fn="silu",
        latent_channels=dd["z_channels"],
        norm_num_groups=32,
        sample_size=dd["resolution"],
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
    )


def make_our_vae(dd: dict[str, Any], seed: int = 0) -> AutoencoderKL:
    model = AutoencoderKL(dd, EMBED_DIM).eval()
    randomize_(model, seed)
    return model


def make_vae_pair(
    name: str, sabotage: Callable[[StateDict], None] | None = None, classic_attention: bool = False
) -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    dd = VAE_CONFIGS[name]
    ours = make_our_vae(dd)
    with torch.random.fork_rng():
        torch.manual_seed(1234)
        theirs = DiffusersAutoencoderKL(**diffusers_vae_config(dd)).eval()
    sd = convert(ours.state_dict(), vae_block_map(dd), VAE_RENAMES)
    if sabotage is not None:
        sabotage(sd)
    theirs.load_state_dict(sd, strict=True)
    if classic_attention:
        theirs.set_attn_processor(AttnProcessor())
    return ours, theirs


@cache
def vae_pair(name: str, classic_attention: bool = False) -> tuple[AutoencoderKL, DiffusersAutoencoderKL]:
    return make_vae_pair(name, classic_attention=classic_attention)


def vae_encode_errs(ours: AutoencoderKL, theirs: DiffusersAutoencoderKL, h: int, w: int) -> tuple[float, float]:
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        post = ours.encode(x)
        dist = theirs.encode(x).latent_dist
    return rel_err(post.mean, dist.mean), rel_err(post.logvar, dist.logvar)


def vae_decode_err(ours: AutoencoderKL, theirs: DiffusersAutoencoderKL, h: int, w: int) -> float:
    z = torch.randn(1, EMBED_DIM, h, w, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = ours.decode(z)
        b = theirs.decode(z).sample
    assert a.shape == (1, 3, h * 2 ** (len(ours.decoder.up) - 1), w * 2 ** (len(ours.decoder.up) - 1))
    return rel_err(a, b)


@pytest.mark.parametrize("classic_attention", [False, True], ids=["sdpa", "classic_attention"])
@pytest.mark.parametrize("hw", [(32, 32), (32, 48)], ids=["square", "nonsquare"])
@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_encode_matches_diffusers(name: str, hw: tuple[int, int], classic_attention: bool) -> None:
    ours, theirs = vae_pair(name, classic_attention)
    mean_err, logvar_err = vae_encode_errs(ours, theirs, *hw)
    assert mean_err < TOL, f"posterior mean relative error {mean_err:.3e}"
    assert logvar_err < TOL, f"posterior logvar relative error {logvar_err:.3e}"


@pytest.mark.parametrize("classic_attention", [False, True], ids=["sdpa", "classic_attention"])
@pytest.mark.parametrize("hw", [(8, 8), (8, 12)], ids=["square", "nonsquare"])
@pytest.mark.parametrize("name", list(VAE_CONFIGS))
def test_vae_decode_matches_diffusers(name: str, hw: tuple[int, int], classic_attention: bool) -> None:
    ours, theirs = vae_pair(name, classic_attention)
    err = vae_decode_err(ours, theirs, *hw)
    assert err < TOL, f"decode relative error {err:.3e}"


def _vae_swap_norms(sd: StateDict) -> None:
    for part in ("encoder", "decoder"):
        _swap(sd, f"{part}.mid_block.resnets.0.norm1.weight", f"{part}.mid_block.resnets.0.norm2.weight")


def _vae_swap_q_k(sd: StateDict) -> None:
    for part in ("encoder", "decoder"):
        _swap(sd, f"{part}.mid_block.attentions.0.to_q.weight", f"{part}.mid_block.attentions.0.to_k.weight")


def _vae_transpose_v(sd: StateDict) -> None:
    """As if the 1x1 conv -> Linear reshape had been done as a transpose."""
    for part in ("encoder", "decoder"):
        key = f"{part}.mid_block.attentions.0.to_v.weight"
        sd[key] = sd[key].t().contiguous()


VAE_SABOTAGE: dict[str, Callable[[StateDict], None]] = {
    "resnet_norm1_norm2": _vae_swap_norms,
    "attention_q_k": _vae_swap_q_k,
    "attention_v_transposed": _vae_transpose_v,
}


@pytest.mark.parametrize("sabotage", list(VAE_SABOTAGE))
def test_vae_parity_catches_a_broken_mapping(sabotage: str) -> None:
    ours, theirs = make_vae_pair("sd1_like", sabotage=VAE_SABOTAGE[sabotage])
    mean_err, _ = vae_encode_errs(ours, theirs, 32, 32)
    dec_err = vae_decode_err(ours, theirs, 8, 8)
    assert mean_err > BROKEN_MIN, f"sabotaged mapping still matches on encode: {mean_err:.3e}"
    assert dec_err > BROKEN_MIN, f"sabotaged mapping still matches on decode: {dec_err:.3e}"


@pytest.mark.parametrize("name", [n for n, dd in VAE_CONFIGS.items() if not dd["attn_resolutions"]])
def test_vae_mapping_agrees_with_diffusers_converter(name: str) -> None:
    """Cross-check of our key mapping (and conv -> Linear reshape) against diffusers' own single-file
    (LDM checkpoint) converter. That converter knows no attention outside the mid blocks, so only the
    SD v1 layouts are compared."""
    dd = VAE_CONFIGS[name]
    ours = make_our_vae(dd)
    mine = convert(ours.state_dict(), vae_block_map(dd), VAE_RENAMES)
    ckpt = {f"first_stage_model.{k}": v for k, v in ours.state_dict().items()}
    theirs = convert_ldm_vae_checkpoint(ckpt, diffusers_vae_config(dd))
    assert sorted(mine) == sorted(theirs)
    for k in mine:
        assert mine[k].shape == theirs[k].shape and torch.equal(mine[k], theirs[k]), k


def test_unet_runs_with_bfloat16_weights_on_the_cpu():
    """GroupNorm32 computes in float32 whatever the weights' dtype (the CPU kernel refuses mixed dtypes)."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(
        in_channels=4,
        out_channels=4,
        model_channels=32,
        attention_resolutions=[1],
        num_res_blocks=1,
        channel_mult=[1, 2],
        num_heads=2,
        context_dim=32,
    )
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 7, 32)
    with torch.no_grad():
        ref = unet(x, t, context=ctx)
        out = unet.to(torch.bfloat16)(x.bfloat16(), t, context=ctx.bfloat16())
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).norm() / ref.norm() < 0.05
