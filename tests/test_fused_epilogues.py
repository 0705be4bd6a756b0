"""bf16 epilogue fusions and the shared guidance prefix: closer to float32 than the unfused bf16, same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import load_model
from ldm.modules.attention import GEGLU, BasicTransformerBlock, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import ResBlock
from ldm.speed.fused_epilogues import (
    FusedGEGLU,
    FusedResBlock,
    FusedSpatialTransformer,
    FusedTransformerBlock,
    fuse_epilogues,
    unfuse_epilogues,
)
from ldm.speed.packed_conv import pack_convolutions
from ldm.speed.runtime import Runtime, resolve_runtime
from ldm.speed.token_merge import bipartite_merge

BF16 = torch.bfloat16
CL = torch.channels_last
pytestmark = pytest.mark.skipif(
    not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 kernels on this CPU"
)


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial weights everywhere (norms not 1, biases not 0), so a dropped term shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * p[0].numel() ** -0.5)
            else:
                p.copy_(
                    (1.0 if name.endswith("weight") and "norm" in name else 0.0)
                    + 0.2 * torch.randn(p.shape, generator=g)
                )
    return module.eval().requires_grad_(False)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def three_ways(module: nn.Module, *inputs):
    """(float32 reference, unfused bf16, fused bf16) outputs of `module` from the same bf16 weights."""
    bf = module.to(BF16, memory_format=CL)
    reference = copy.deepcopy(bf).float()
    pack_convolutions(bf)
    with torch.no_grad():
        ref = reference(*[x.float() if x.is_floating_point() else x for x in inputs])
        plain = bf(*inputs)
        assert fuse_epilogues(bf) >= 1
        fused = bf(*inputs)
    return ref, plain, fused


def assert_fused_closer(ref, plain, fused, bound=2e-2):
    assert not torch.equal(fused, plain)  # the fused path ran: one rounding fewer
    assert rel(fused, ref) < bound
    # One rounding instead of two or three: at least as close to float32 (with a margin for the luck of the draw).
    assert rel(fused, ref) <= 1.1 * rel(plain, ref), (rel(fused, ref), rel(plain, ref))


def nhwc(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(BF16).contiguous(memory_format=CL)


def test_geglu():
    x = torch.randn(2, 40, 32, generator=torch.Generator().manual_seed(1)).to(BF16)
    module = randomize(GEGLU(32, 64))
    assert_fused_closer(*three_ways(module, x))
    assert type(module) is FusedGEGLU


@pytest.mark.parametrize("channels,out", [(32, 32), (32, 64)])  # identity skip, 1x1 skip convolution
def test_resblock(channels, out):
    x = nhwc(2, channels, 8, 8)
    emb = torch.randn(1, 64, generator=torch.Generator().manual_seed(2)).to(BF16).expand(2, -1)
    module = randomize(ResBlock(channels, 64, out_channels=out))
    assert_fused_closer(*three_ways(module, x, emb))
    assert type(module) is FusedResBlock


def test_resblock_with_a_timestep_per_sample():
    """Different embeddings per sample cannot join the bias: added after the convolution, still right."""
    x = nhwc(2, 32, 8, 8)
    emb = torch.randn(2, 64, generator=torch.Generator().manual_seed(2)).to(BF16)
    ref, plain, fused = three_ways(randomize(ResBlock(32, 64)), x, emb)
    assert rel(fused, ref) < 2e-2 and rel(fused, ref) <= 1.1 * rel(plain, ref)


@pytest.mark.parametrize("merged", [False, True])
def test_transformer_block(merged):
    x = torch.randn(2, 64, 32, generator=torch.Generator().manual_seed(1)).to(BF16)
    ctx = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(2)).to(BF16)
    module = randomize(BasicTransformerBlock(32, 2, 16, context_dim=24))
    merge = bipartite_merge(x, 8, 8, 0.5) if merged else None
    if merged:  # the merge is a function of the tokens: the same one for every dtype
        ref_merge = bipartite_merge(x.float(), 8, 8, 0.5)
        bf = module.to(BF16)
        reference = copy.deepcopy(bf).float()
        with torch.no_grad():
            ref = reference(x.float(), ctx.float(), ref_merge)
            plain = bf(x, ctx, merge)
            fuse_epilogues(bf)
            fused = bf(x, ctx, merge)
    else:
        ref, plain, fused = three_ways(module, x, ctx)
    assert_fused_closer(ref, plain, fused)
    assert type(module) is FusedTransformerBlock


def test_spatial_transformer():
    x = nhwc(2, 32, 8, 8)
    ctx = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(2)).to(BF16)
    module = randomize(SpatialTransformer(32, 2, 16, context_dim=24))
    assert_fused_closer(*three_ways(module, x, ctx))
    assert type(module) is FusedSpatialTransformer


def test_the_same_module_to_the_outside():
    """Fusing swaps forwards only: the same parameters, state dict and keys; autograd gets the parent's forward."""
    module = randomize(BasicTransformerBlock(32, 2, 16, context_dim=24)).to(BF16)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x = torch.randn(1, 16, 32).to(BF16)
    ctx = torch.randn(1, 7, 24).to(BF16)
    with torch.no_grad():
        plain = module(x, ctx)
    assert fuse_epilogues(module) == 2  # the block and its GEGLU
    after = module.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.enable_grad():  # training: the plain forward, the plain bits
        assert torch.equal(module(x, ctx), plain)
    assert unfuse_epilogues(module) == 2 and type(module) is BasicTransformerBlock
    with torch.no_grad():
        assert torch.equal(module(x, ctx), plain)


def test_policy(monkeypatch):
    monkeypatch.setattr("ldm.speed.runtime.cpu_has_bf16", lambda: True)
    cpu = {"runtime": {"device": "cpu"}}
    bf16 = resolve_runtime(cpu, precision="bf16")
    assert bf16.fuses_epilogues and bf16.shares_guidance_prefix
    assert "fused" in bf16.describe() and "shared" in bf16.describe()
    full = resolve_runtime(cpu, precision="full")
    assert not full.fuses_epilogues and not full.shares_guidance_prefix  # the original's bits
    assert not resolve_runtime(cpu, precision="full", channels_last=True).fuses_epilogues
    compiled = resolve_runtime(cpu, precision="bf16", compile=True)
    assert not compiled.fuses_epilogues and not compiled.shares_guidance_prefix
    assert not resolve_runtime(cpu, precision="bf16", channels_last=False).fuses_epilogues


# ------------------------------------------------------------------------------------------ shared prefix


def batch_sizes_seen(unet: nn.Module) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {"conv_in": [], "last block": []}
    unet.input_blocks[0].register_forward_hook(lambda m, a, o: seen["conv_in"].append(o.shape[0]))
    unet.output_blocks[-1].register_forward_hook(lambda m, a, o: seen["last block"].append(o.shape[0]))
    return seen


@pytest.mark.parametrize("half", [1, 2])
def test_guidance_halves_computed_once_up_to_the_cross_attention(tiny_config, tiny_ckpt, half):
    """Float32 here, so that sharing is compared with the unshared run to float32's precision."""
    model = load_model(tiny_config, tiny_ckpt, Runtime(torch.device("cpu")), verbose=False)
    unet = model.model.diffusion_model
    assert not unet.shares_guidance_prefix  # float32: off by policy
    seen = batch_sizes_seen(unet)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(half, 4, 8, 8, generator=g)
    x = torch.cat([x1, x1])
    t = torch.full((2 * half,), 500)
    ctx = torch.randn(2 * half, 77, 32, generator=g)
    with torch.no_grad():
        ref = unet(x, t, ctx)
        unet.shares_guidance_prefix = True
        shared = unet(x, t, ctx)
        assert seen == {"conv_in": [2 * half, half], "last block": [2 * half, 2 * half]}
        assert rel(shared, ref) < 1e-5  # batch-1 and batch-2 kernels may round differently
        assert not torch.equal(shared[:half], shared[half:])  # the contexts still part the halves

        # Different latents or timesteps: nothing to share, the unshared bits.
        for x2, t2 in ((torch.cat([x1, x1 + 0.1]), t), (x, torch.cat([t[:half], t[half:] - 1]))):
            unet.shares_guidance_prefix = False
            expected = unet(x2, t2, ctx)
            unet.shares_guidance_prefix = True
            seen["conv_in"].clear()
            assert torch.equal(unet(x2, t2, ctx), expected)
            assert seen["conv_in"] == [2 * half]


def test_guidance_prefix_with_feature_reuse_and_token_merging(tiny_config, tiny_ckpt):
    runtime = Runtime(torch.device("cpu"))
    s = SampleSettings(steps=4, sampler="dpmpp_2m", height=64, width=64, n_samples=2, seed=5, reuse_interval=2)
    model = load_model(tiny_config, tiny_ckpt, runtime, verbose=False)
    unet = model.model.diffusion_model
    (ref,) = generate(model, [["a red cube", "a blue ball"]], s, runtime, progress=False)
    unet.shares_guidance_prefix = True
    seen = batch_sizes_seen(unet)
    (shared,) = generate(model, [["a red cube", "a blue ball"]], s, runtime, progress=False)
    assert seen["conv_in"] == [2] * 4  # every call, the shallow ones too, ran the prefix at half the batch of 4
    assert rel(shared.latents, ref.latents) < 1e-5
    s.reuse_interval, s.token_merge = 0, 0.5
    unet.shares_guidance_prefix = False
    (ref,) = generate(model, [["a red cube"]], s, runtime, progress=False)
    unet.shares_guidance_prefix = True
    (shared,) = generate(model, [["a red cube"]], s, runtime, progress=False)
    assert rel(shared.latents, ref.latents) < 1e-5


def test_whole_model_bf16_as_close_to_float32(tiny_config, tiny_ckpt):
    """txt2img in bf16 with every fusion and the shared prefix, against the same bf16 weights in float32."""
    bf16 = Runtime(torch.device("cpu"), "bf16", BF16, channels_last=True)
    assert bf16.fuses_epilogues and bf16.shares_guidance_prefix
    s = SampleSettings(steps=3, sampler="dpmpp_2m", height=64, width=64, n_samples=2, seed=7)
    prompts = [["a red cube", "a blue ball"]]
    fused = load_model(tiny_config, tiny_ckpt, bf16, verbose=False)
    unet = fused.model.diffusion_model
    assert unet.shares_guidance_prefix
    kinds = {type(m) for m in unet.modules()}
    assert {FusedResBlock, FusedSpatialTransformer, FusedTransformerBlock, FusedGEGLU} <= kinds
    (a,) = generate(fused, prompts, s, bf16, progress=False)
    plain = load_model(tiny_config, tiny_ckpt, bf16, verbose=False)
    unfuse_epilogues(plain)
    plain.model.diffusion_model.shares_guidance_prefix = False
    (b,) = generate(plain, prompts, s, bf16, progress=False)
    reference = load_model(tiny_config, tiny_ckpt, bf16, verbose=False)
    unfuse_epilogues(reference)
    reference.model.diffusion_model.shares_guidance_prefix = False
    reference.float()
    fp32 = Runtime(torch.device("cpu"), channels_last=True)
    (r,) = generate(reference, prompts, s, fp32, progress=False)
    assert not torch.equal(a.latents, b.latents)
    # Measured: 0.039 fused against 0.051 unfused (this tiny random model amplifies bf16 rounding).
    assert rel(a.latents, r.latents) < 0.06
    assert rel(a.latents, r.latents) <= 1.25 * rel(b.latents, r.latents), (
        rel(a.latents, r.latents),
        rel(b.latents, r.latents),
    )
