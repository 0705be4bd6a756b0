"""Convolution weights packed once for oneDNN: the eager NHWC bits, faster, and an ordinary Conv2d to the outside."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import load_model
from ldm.speed.fused_epilogues import unfuse_epilogues
from ldm.speed.packed_conv import PackedConv2d, pack_convolutions, packable, unpack_convolutions
from ldm.speed.runtime import Runtime, resolve_runtime

CL = torch.channels_last
BF16 = pytest.param(
    torch.bfloat16,
    marks=pytest.mark.skipif(
        not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="oneDNN has no bf16 convolutions on this CPU"
    ),
)
DTYPES = [torch.float32, BF16]


def nhwc_conv(cin: int, cout: int, k: int, dtype: torch.dtype, seed: int = 0, **kw) -> nn.Conv2d:
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, **kw).to(dtype=dtype, memory_format=CL)
    return conv.eval().requires_grad_(False)


def nhwc(*shape: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype).contiguous(memory_format=CL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "cin,cout,k,kw",
    [
        (64, 48, 3, {"padding": 1}),
        (64, 48, 3, {"padding": 1, "stride": 2}),  # the UNet's downsampling
        (64, 32, 1, {}),  # skip connections, proj_in/out
        (16, 32, 3, {"padding": 0, "bias": False}),  # the VAE's downsampling pads by hand
    ],
)
def test_bitwise_the_eager_convolution_at_any_input_size(dtype, cin, cout, k, kw):
    conv = nhwc_conv(cin, cout, k, dtype, **kw)
    plain_weight = conv.weight.clone()
    assert pack_convolutions(conv) == 1 and type(conv) is PackedConv2d
    assert not conv.weight.is_mkldnn  # packs at its first call, for that call's size
    # Packed again at each new size: eager's bits at every size
    for i, shape in enumerate([(2, cin, 8, 8), (2, cin, 8, 8), (1, cin, 33, 29), (3, cin, 16, 16), (2, cin, 8, 8)]):
        x = nhwc(*shape, dtype=dtype, seed=i)
        out = conv(x)
        assert conv.weight.is_mkldnn and conv.packed_for == x.shape
        ref = F.conv2d(x, plain_weight, conv.bias, conv.stride, conv.padding)
        assert out.shape == ref.shape and out.dtype == dtype
        assert torch.equal(out, ref), shape
        assert out.is_contiguous(memory_format=CL)


def test_float32_inputs_eager_leaves_to_pytorch_kernels_round_alike():
    """Eager float32 sends a batch-1 input under 20480 values with a kernel up to 3x3 to PyTorch's own kernel,
    not oneDNN (ATen's use_mkldnn heuristic), so its bits differ there; packed, oneDNN runs it. Close, not equal."""
    conv = nhwc_conv(64, 48, 3, torch.float32, padding=1)
    plain_weight = conv.weight.clone()
    pack_convolutions(conv)
    x = nhwc(1, 64, 13, 9, dtype=torch.float32)
    out, ref = conv(x), F.conv2d(x, plain_weight, conv.bias, padding=1)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_an_ordinary_conv2d_to_the_outside(dtype):
    conv = nhwc_conv(32, 16, 3, dtype, padding=1)
    before = {k: v.clone() for k, v in conv.state_dict().items()}
    pack_convolutions(conv)
    conv(nhwc(1, 32, 8, 8, dtype=dtype))
    assert conv.weight.is_mkldnn and conv.weight.shape == (16, 32, 3, 3) and conv.weight.dtype == dtype
    assert "packed" in repr(conv)

    # state_dict: the plain weight, same keys and values (checkpoints, peers built from our weights)
    after = conv.state_dict()
    assert list(after) == list(before)
    assert all(not v.is_mkldnn and torch.equal(v, before[k]) for k, v in after.items())

    # load_state_dict: new values, used at the next call, packed again
    other = nhwc_conv(32, 16, 3, dtype, seed=5, padding=1)
    conv.load_state_dict(other.state_dict())
    x = nhwc(2, 32, 8, 8, dtype=dtype)
    assert torch.equal(conv(x), other(x))
    assert type(conv) is PackedConv2d and conv.weight.is_mkldnn

    # .to(): unpacks, then acts on the plain weight (free_weights moves modules to "meta")
    conv.to(torch.float64)
    assert type(conv) is nn.Conv2d and conv.weight.dtype == torch.float64
    assert torch.equal(conv.weight, other.weight.double())
    conv.to("meta")
    assert conv.weight.is_meta


def test_unpack_restores_the_nhwc_layout_and_bits():
    conv = nhwc_conv(32, 16, 3, torch.float32, padding=1)
    x = nhwc(2, 32, 8, 8, dtype=torch.float32)
    pack_convolutions(conv)
    packed_out = conv(x)
    assert unpack_convolutions(conv) == 1 and type(conv) is nn.Conv2d
    assert conv.weight.is_contiguous(memory_format=CL) and not conv.weight.is_contiguous()
    assert torch.equal(conv(x), packed_out)


def test_what_is_packed():
    assert packable(nhwc_conv(8, 8, 3, torch.float32))
    assert not packable(nn.Conv2d(8, 8, 3))  # trainable: the packed op has no backward
    assert not packable(nhwc_conv(8, 8, 3, torch.float16))  # oneDNN packs float32 and bf16 here
    assert not packable(nhwc_conv(8, 8, 3, torch.float32, padding_mode="reflect"))
    assert not packable(nhwc_conv(8, 8, 3, torch.float32, padding="same"))
    assert not packable(nn.Linear(8, 8).requires_grad_(False))
    conv = nhwc_conv(8, 8, 3, torch.float32)
    pack_convolutions(conv)
    conv.requires_grad_(True)
    with pytest.raises(RuntimeError, match="inference"):
        conv(torch.randn(1, 8, 4, 4, requires_grad=True))


def test_release_gets_the_plain_weight_once_packed():
    released = []
    conv = nhwc_conv(8, 8, 3, torch.float32)
    plain_ptr = conv.weight.data_ptr()
    pack_convolutions(conv, release=released.append)
    assert released == []
    conv(nhwc(1, 8, 4, 4, dtype=torch.float32))
    assert [t.data_ptr() for t in released] == [plain_ptr]


def test_policy_packs_only_eager_nhwc_on_a_cpu(monkeypatch):
    monkeypatch.setattr("ldm.speed.runtime.cpu_has_bf16", lambda: True)
    cpu = {"runtime": {"device": "cpu"}}
    assert resolve_runtime(cpu, precision="bf16").packs_convolutions  # auto NHWC
    assert resolve_runtime(cpu, precision="full", channels_last=True).packs_convolutions
    assert "packed" in resolve_runtime(cpu, precision="bf16").describe()  # what the CLI prints at start
    assert "packed" not in resolve_runtime(cpu, precision="full").describe()
    assert not resolve_runtime(cpu, precision="full").packs_convolutions  # the original's layout and bits
    assert not resolve_runtime(cpu, precision="bf16", channels_last=False).packs_convolutions
    assert not resolve_runtime(cpu, precision="bf16", compile=True).packs_convolutions  # freezing packs
    monkeypatch.setattr("ldm.speed.runtime.cpu_has_bf16", lambda: False)
    # 16-bit weights cast to float32 at each call: nothing fixed to pack
    assert not resolve_runtime(cpu, precision="bf16", channels_last=True).packs_convolutions


@pytest.mark.parametrize("dtype", DTYPES)
def test_whole_model_same_picture_as_eager_nhwc(tiny_config, tiny_ckpt, dtype):
    """The full txt2img path, UNet and VAE, packed and not: the same latents and pixels."""
    runtime = Runtime(torch.device("cpu"), "full" if dtype == torch.float32 else "bf16", dtype, channels_last=True)
    assert runtime.packs_convolutions
    s = SampleSettings(steps=3, sampler="dpmpp_2m", height=64, width=64, n_samples=2, seed=7)
    packed = load_model(tiny_config, tiny_ckpt, runtime, verbose=False)
    convs = [m for m in packed.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(type(m) is PackedConv2d for m in convs)
    plain = load_model(tiny_config, tiny_ckpt, runtime, verbose=False)
    assert unpack_convolutions(plain) == len(convs)
    for model in (packed, plain):  # packing alone (the bf16 fusions change bits: tests/test_fused_epilogues.py)
        unfuse_epilogues(model)
        model.model.diffusion_model.shares_guidance_prefix = False
    (a,) = generate(packed, [["a red cube", "a blue ball"]], s, runtime, progress=False)
    vae = packed.first_stage_model
    decoding = (packed.model.diffusion_model, vae.decoder, vae.post_quant_conv)
    used = [m for part in decoding for m in part.modules() if isinstance(m, nn.Conv2d)]
    assert used and all(m.weight.is_mkldnn for m in used)  # every convolution txt2img calls ran packed
    (b,) = generate(plain, [["a red cube", "a blue ball"]], s, runtime, progress=False)
    if dtype == torch.bfloat16:  # eager bf16 always runs oneDNN: the same kernels, the same bits
        assert torch.equal(a.latents, b.latents) and torch.equal(a.decoded, b.decoded)
    else:  # eager float32 leaves small convolutions to PyTorch's own kernels (see above): last bits only
        for name in ("latents", "decoded"):
            x, y = getattr(a, name), getattr(b, name)
            assert (x - y).norm() / y.norm() < 1e-5, name


def test_low_memory_frees_packed_weights(tiny_config, tiny_ckpt):
    """--low_memory moves finished parts to "meta": packed convolutions unpack on the way, same picture."""
    runtime = Runtime(torch.device("cpu"), channels_last=True)
    s = SampleSettings(steps=2, sampler="euler", height=64, width=64, n_samples=1, seed=3)
    model = load_model(tiny_config, tiny_ckpt, runtime, verbose=False)
    (ref,) = generate(model, [["a red cube"]], s, runtime, progress=False)
    (low,) = generate(model, [["a red cube"]], s, runtime, progress=False, low_memory=True)
    assert torch.equal(low.decoded, ref.decoded)
    unet_convs = [m for m in model.model.diffusion_model.modules() if isinstance(m, nn.Conv2d)]
    assert unet_convs and all(type(m) is nn.Conv2d and m.weight.is_meta for m in unet_convs)
