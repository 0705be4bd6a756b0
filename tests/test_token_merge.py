"""--tome: token merging before the full-resolution self-attentions (ldm.speed.token_merge)."""

from __future__ import annotations

import pytest
import torch

from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import load_model
from ldm.modules.attention import BasicTransformerBlock, SpatialTransformer
from ldm.speed.runtime import Runtime
from ldm.speed.token_merge import bipartite_merge, grid_positions, merge_tokens

CPU = Runtime(torch.device("cpu"))
G = torch.Generator().manual_seed(0)


def test_grid_is_one_token_per_2x2_cell():
    dst, src = grid_positions(4, 6, torch.device("cpu"))
    assert dst.tolist() == [0, 2, 4, 12, 14, 16]
    assert sorted(dst.tolist() + src.tolist()) == list(range(24))
    dst, src = grid_positions(3, 3, torch.device("cpu"))  # odd sizes: the last row and column join the grid
    assert dst.tolist() == [0, 2, 6, 8]


def test_merge_and_unmerge_against_a_direct_computation():
    b, h, w, c = 2, 6, 8, 5
    x = torch.randn(b, h * w, c, generator=G)
    m = bipartite_merge(x, h, w, 0.5)
    r = int(h * w * 0.5)
    assert m.merge(x).shape == (b, h * w - r, c)
    dst_pos, src_pos = grid_positions(h, w, x.device)
    unit = x / x.norm(dim=-1, keepdim=True)
    for i in range(b):
        sim = unit[i, src_pos] @ unit[i, dst_pos].T
        best, best_dst = sim.max(dim=1)
        merged = best.argsort(descending=True, stable=True)[:r]  # the r most similar non-grid tokens
        assert sorted(m.src_idx[i].tolist()) == sorted(merged.tolist())
        expected = x[i, dst_pos].clone()  # each grid token: the mean of itself and the tokens merged into it
        for j, pos in enumerate(dst_pos.tolist()):
            into = [src_pos[k] for k in merged.tolist() if best_dst[k] == j]
            expected[j] = x[i, [pos, *into]].mean(dim=0)
        assert torch.allclose(m.merge(x)[i, -len(dst_pos) :], expected, atol=1e-6)
    y = m.merge(x)
    back = m.unmerge(y)
    for i in range(b):
        kept = src_pos[m.keep_idx[i]]
        assert torch.equal(back[i, kept], x[i, kept])  # kept tokens go back untouched
        assert torch.equal(back[i, dst_pos], y[i, -len(dst_pos) :])
        gone = src_pos[m.src_idx[i]]
        assert torch.equal(back[i, gone], y[i, -len(dst_pos) :][m.dst_idx[i]])  # a merged token: its grid token


def test_duplicates_merge_without_loss():
    """Tokens equal to a grid token merge first (cosine 1) and come back exactly."""
    h = w = 4
    dst_pos, src_pos = grid_positions(h, w, torch.device("cpu"))
    x = torch.randn(1, h * w, 3, generator=G)
    x[0, 1] = x[0, 0]  # two copies of grid token 0
    x[0, 4] = x[0, 0]
    m = bipartite_merge(x, h, w, 2 / 16)
    assert sorted(src_pos[m.src_idx[0]].tolist()) == [1, 4]
    assert torch.allclose(m.unmerge(m.merge(x)), x, atol=1e-6)


def test_nothing_to_merge_and_bad_input():
    x = torch.randn(1, 16, 3, generator=G)
    assert bipartite_merge(x, 4, 4, 0.0) is None and bipartite_merge(x, 4, 4, 0.05) is None
    assert bipartite_merge(x, 4, 4, 0.99).merge(x).shape[1] == 4  # at most every non-grid token
    with pytest.raises(ValueError, match="not an 4x5 map"):
        bipartite_merge(x, 4, 5, 0.5)


def test_block_without_a_merge_is_unchanged_and_a_merge_changes_only_self_attention():
    block = BasicTransformerBlock(16, 2, 8, context_dim=12).eval()
    x, ctx = torch.randn(2, 36, 16, generator=G), torch.randn(2, 5, 12, generator=G)
    with torch.no_grad():
        plain = block(x, context=ctx)
        assert torch.equal(block(x, context=ctx, merge=None), plain)
        merged = block(x, context=ctx, merge=bipartite_merge(x, 6, 6, 0.5))
    assert merged.shape == plain.shape and not torch.equal(merged, plain)
    assert (merged - plain).norm() / plain.norm() < 0.5


@pytest.fixture(scope="module")
def tiny_model(tiny_config, tiny_ckpt):
    return load_model(tiny_config, tiny_ckpt, CPU, verbose=False)


def test_generate_with_tome(tiny_model):
    unet = tiny_model.model.diffusion_model
    outer = [m for m in unet.modules() if isinstance(m, SpatialTransformer) and m.in_channels == unet.model_channels]
    inner = [m for m in unet.modules() if isinstance(m, SpatialTransformer) and m not in outer]
    assert outer and inner  # the tiny config has both, so the choice of level is exercised
    with merge_tokens(tiny_model, 0.5):
        assert all(m.token_merge_ratio == 0.5 for m in outer) and all(m.token_merge_ratio == 0 for m in inner)
    assert all(m.token_merge_ratio == 0 for m in outer)
    with pytest.raises(ValueError, match=r"\[0, 1\)"), merge_tokens(tiny_model, 1.0):
        pass

    s = SampleSettings(steps=3, sampler="dpmpp_2m", height=64, width=64, n_samples=2, seed=4)
    prompts = [["a red cube", "a blue ball"]]
    (plain,) = generate(tiny_model, prompts, s, CPU, progress=False)
    tome = SampleSettings(**{**s.__dict__, "token_merge": 0.5})
    (a,) = generate(tiny_model, prompts, tome, CPU, progress=False)
    (b,) = generate(tiny_model, prompts, tome, CPU, progress=False)
    assert torch.isfinite(a.decoded).all() and torch.equal(a.decoded, b.decoded)  # deterministic
    assert not torch.equal(a.latents, plain.latents)
    zero = SampleSettings(**{**s.__dict__, "token_merge": 0.0})
    (z,) = generate(tiny_model, prompts, zero, CPU, progress=False)
    assert torch.equal(z.latents, plain.latents)


def test_cli_flag_reaches_the_picture_and_its_parameters(tmp_path, tiny_ckpt):
    from PIL import Image

    from ldm.cli.txt2img import main

    from .conftest import TINY_CONFIG

    pngs = {}
    for name, flags in (("plain", []), ("tome", ["--tome", "0.5"])):
        argv = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--prompt", "a dog", "--H", "64", "--W", "64"]
        argv += ["--ddim_steps", "3", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--quiet"]
        assert main([*argv, "--outdir", str(tmp_path / name), *flags]) == 0
        pngs[name] = Image.open(tmp_path / name / "samples" / "00000.png")
    assert "Token merging ratio: 0.5" in pngs["tome"].text["parameters"]
    assert "Token merging" not in pngs["plain"].text["parameters"]
    assert pngs["plain"].tobytes() != pngs["tome"].tobytes()
