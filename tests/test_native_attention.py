"""ldm.speed.native's bf16 attention kernel: the same attention as PyTorch's to bf16 rounding, every shape and layout
the UNet gives it, PyTorch's kernel for the rest, and a clear fallback where it cannot be built."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn.functional as F

from ldm.generation.load import load_model, use_native_attention
from ldm.modules.attention import CrossAttention
from ldm.speed import native
from ldm.speed.runtime import Runtime, resolve_runtime

BF16 = torch.bfloat16
KERNEL = native.kernel()
KERNEL_NAME = "ldm.speed.native's bf16 kernel"
needs_kernel = pytest.mark.skipif(KERNEL.function is None, reason=f"no native kernel here: {KERNEL.why_not}")


def qkv(b, h, nq, nk, d, *, heads_inside=True, seed=0):
    """bf16 q, k, v as [B, H, N, D]; `heads_inside`: views of [B, N, H, D] tensors, as the UNet makes them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in (nq, nk, nk):
        x = torch.randn(b, n, h, d, generator=g) if heads_inside else torch.randn(b, h, n, d, generator=g)
        out.append((x.transpose(1, 2) if heads_inside else x).to(BF16))
    return out


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


@needs_kernel
@pytest.mark.parametrize(
    "b, h, nq, nk, d, heads_inside",
    [
        (2, 8, 1024, 1024, 40, True),  # SD's first level at 256 pixels (4,096 tokens at 512)
        (1, 8, 1000, 512, 40, False),  # a query tail (1000 = 125 x 8) and contiguous heads
        (2, 8, 259, 288, 80, True),  # D = 80 (the second level), 4-row tiles and 3 tail rows
        (1, 2, 37, 32, 16, True),  # one vector per row, one 32-key group
        (1, 3, 70, 96, 2, False),  # the smallest head size
        (2, 1, 64, 320, 64, True),  # a key count that is not a multiple of the 256-key block
    ],
)
def test_matches_pytorch_to_bf16_rounding(b, h, nq, nk, d, heads_inside):
    """Against a float64 reference on the same bf16 inputs: as close as PyTorch's bf16 flash kernel, and a
    [B, H, N, D] view of a [B, N, H, D] tensor, like SDPA's output after the model's transpose."""
    q, k, v = qkv(b, h, nq, nk, d, heads_inside=heads_inside)
    assert native.supports(q, k, v)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.no_grad():
        ours, theirs = native.attention(q, k, v), F.scaled_dot_product_attention(q, k, v)
    assert ours.shape == theirs.shape and ours.dtype == BF16
    assert ours.transpose(1, 2).is_contiguous()
    assert rel(ours, ref) < 1.2 * rel(theirs, ref) + 1e-4, (rel(ours, ref), rel(theirs, ref))
    assert (ours.double() - ref).abs().max() < 0.02


@needs_kernel
def test_peaked_scores_and_large_values():
    """Scores up to ~±1000 (one key dominating each row) and rows where every score is the same: the online
    softmax rescaling must neither overflow nor lose the winner."""
    q, k, v = qkv(1, 2, 64, 512, 40)
    q, k = q * 8, k * 8
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    with torch.no_grad():
        assert rel(native.attention(q, k, v), ref) < 1.2 * rel(F.scaled_dot_product_attention(q, k, v), ref) + 1e-4
        flat = torch.zeros_like(q)
        out = native.attention(flat, k, v)  # every weight 1/512: the mean of v
    torch.testing.assert_close(out.float(), v.float().mean(2, keepdim=True).expand_as(out), atol=4e-3, rtol=0)


@needs_kernel
def test_threads_split_heads_not_sums():
    """Work is split by (batch, head): any thread count gives the same bits."""
    q, k, v = qkv(2, 3, 96, 128, 40)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.attention(q, k, v)
        torch.set_num_threads(2)
        two = native.attention(q, k, v)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_unsupported_shapes_are_left_to_pytorch():
    q, k, v = qkv(1, 2, 64, 64, 40)
    assert native.supports(q, k, v)
    assert not native.supports(*qkv(1, 2, 64, 77, 40))  # 77 text tokens: not a multiple of 32
    assert not native.supports(*qkv(1, 2, 64, 64, 160))  # head size over 80
    assert not native.supports(*qkv(1, 2, 64, 64, 39))  # odd head size
    assert not native.supports(q.float(), k.float(), v.float())
    assert not native.supports(q.transpose(-1, -2), k, v)  # last dim not contiguous
    with torch.enable_grad():
        assert not native.supports(q.requires_grad_(), k, v)


def attention_module(dim=64, heads=2, context_dim=None):
    torch.manual_seed(0)
    return CrossAttention(dim, context_dim=context_dim, heads=heads, dim_head=dim // heads).to(BF16).eval()


@needs_kernel
def test_module_uses_the_kernel_where_it_can():
    """Self-attention over 64 tokens goes native (close to PyTorch's, not its bits); cross-attention to 77
    text tokens stays PyTorch's, bit for bit."""
    self_attn, cross = attention_module(), attention_module(context_dim=48)
    x = torch.randn(2, 64, 64).to(BF16)
    ctx = torch.randn(2, 77, 48).to(BF16)
    with torch.no_grad():
        plain_self, plain_cross = self_attn(x), cross(x, ctx)
        self_attn.native_attention = cross.native_attention = True
        fast_self, fast_cross = self_attn(x), cross(x, ctx)
    assert torch.equal(fast_cross, plain_cross)
    assert not torch.equal(fast_self, plain_self)
    assert rel(fast_self, plain_self.double()) < 1e-2


@needs_kernel
def test_whole_unet_within_bf16_rounding(tiny_config, tiny_ckpt):
    """The tiny UNet in bf16 with the kernel is as close to its float32 output as with PyTorch's attention."""
    runtime = Runtime(torch.device("cpu"), precision="bf16", weight_dtype=BF16)
    model = load_model(tiny_config, tiny_ckpt, runtime, verbose=False)
    unet = model.model.diffusion_model
    reference = copy.deepcopy(unet).float()
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([500, 500]), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        ref = reference(x, t, ctx).double()
        plain = unet(x.to(BF16), t, ctx.to(BF16))
        assert use_native_attention(model)
        modules = [m for m in unet.modules() if isinstance(m, CrossAttention)]
        assert modules and all(m.native_attention for m in modules)
        fast = unet(x.to(BF16), t, ctx.to(BF16))
    assert not torch.equal(fast, plain)  # the 64-token self-attentions went native
    assert rel(fast, ref) < 1.25 * rel(plain, ref), (rel(fast, ref), rel(plain, ref))


def test_policy(monkeypatch):
    """On for bf16 on a CPU with AVX512-BF16 and no AMX; off with AMX, in float32, when compiled, on CUDA."""
    cpu = {"runtime": {"device": "cpu"}}
    monkeypatch.setattr("ldm.speed.runtime.cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16"}))
    assert resolve_runtime(cpu, precision="bf16").native_attention
    assert not resolve_runtime(cpu, precision="full").native_attention
    assert not resolve_runtime(cpu, precision="bf16", compile=True).native_attention
    monkeypatch.setattr("ldm.speed.runtime.cpu_flags", lambda: frozenset({"avx512f", "avx512_bf16", "amx_bf16"}))
    assert not resolve_runtime(cpu, precision="bf16").native_attention
    monkeypatch.setattr("ldm.speed.runtime.cpu_flags", lambda: frozenset({"avx2"}))
    assert not resolve_runtime(cpu, precision="bf16").native_attention


@pytest.mark.parametrize(
    "env, why",
    [
        ({"LDM_NATIVE_ATTENTION": "0"}, "turned off by LDM_NATIVE_ATTENTION=0"),
        ({"CXX": "no-such-compiler-here"}, "no C++ compiler ('no-such-compiler-here' not found; set CXX)"),
        ({"CXX": "false"}, "could not build it: false failed: no output"),
    ],
)
def test_unavailable_kernel_says_why_and_keeps_pytorch(monkeypatch, tmp_path, env, why):
    flags = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512_bf16"})
    monkeypatch.setattr("ldm.speed.native.cpu_flags", lambda: flags)
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    native.kernel.cache_clear()
    try:
        kernel = native.kernel()
        assert kernel.function is None and kernel.why_not == why
        module = torch.nn.Sequential(attention_module())
        with pytest.warns(
            UserWarning, match=re.escape(f"attention stays PyTorch's: {KERNEL_NAME} is unavailable ({why})")
        ):
            assert not use_native_attention(module)
        assert not module[0].native_attention
        assert list(tmp_path.iterdir()) == []  # no half-written library left behind
    finally:
        native.kernel.cache_clear()


def test_cpu_without_the_instructions(monkeypatch):
    monkeypatch.setattr("ldm.speed.native.cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    native.kernel.cache_clear()
    try:
        assert native.kernel().why_not == "this CPU lacks avx512_bf16, avx512bw, avx512vl"
    finally:
        native.kernel.cache_clear()


@needs_kernel
def test_built_once_into_the_cache(monkeypatch, tmp_path):
    """A fresh cache gets one library, named by the source's hash; a second process-level load reuses it."""
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path))
    native.kernel.cache_clear()
    try:
        assert native.kernel().function is not None
        built = list(tmp_path.iterdir())
        assert len(built) == 1 and built[0].name.startswith("attention_bf16-") and built[0].suffix == ".so"
        stamp = built[0].stat().st_mtime_ns
        native.kernel.cache_clear()
        assert native.kernel().function is not None
        assert [p.stat().st_mtime_ns for p in tmp_path.iterdir()] == [stamp]
    finally:
        native.kernel.cache_clear()
