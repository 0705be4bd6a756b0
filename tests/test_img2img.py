"""img2img and inpainting on a tiny random model: the DDIM path against a re-derivation of the original
img2img algorithm in its own style, the strength limits, other samplers, masks, and image reading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.files.image_input import ImageInputError, fit_size, load_image, load_image_array, load_mask, to_model_range
from ldm.files.image_output import to_uint8_images
from ldm.generation.generate import SOLVERS, SampleSettings, solve
from ldm.generation.img2img import composite, encoding_steps, generate_img2img
from ldm.generation.load import load_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.speed.runtime import Runtime

from .test_sampling_fidelity import original_timesteps

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def tiny_model(tiny_config, tiny_ckpt):
    return load_model(tiny_config, tiny_ckpt, CPU, verbose=False)


def init_picture(h=64, w=64, seed=0) -> np.ndarray:
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + g.normal(0, 20, base.shape), 0, 255).astype(np.uint8)


def reference_img2img(model, prompts, steps, strength, eta, scale, n_iter, seed):
    """The original scripts/img2img.py + DDIMSampler.stochastic_encode/decode, rewritten here; seeded after
    the model is built (the original seeds before, and its random init consumes the stream)."""
    torch.manual_seed(seed)
    b = len(prompts)
    init = to_model_range(init_picture()).repeat(b, 1, 1, 1)
    moments = model.first_stage_model.quant_conv(model.first_stage_model.encoder(init))
    mean, logvar = torch.chunk(moments, 2, dim=1)
    logvar = torch.clamp(logvar, -30.0, 20.0)
    init_latent = model.scale_factor * (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape))
    ts = original_timesteps(steps)
    ac = model.alphas_cumprod.cpu()
    alphas = ac[ts]
    alphas_prev = np.asarray([ac[0].item()] + ac[ts[:-1]].tolist())
    a64 = alphas.double().numpy()
    sigmas = eta * np.sqrt((1 - alphas_prev) / (1 - a64) * (1 - a64 / alphas_prev))
    sqrt_one_minus = np.sqrt(1.0 - alphas.numpy())
    t_enc = int(strength * steps)
    out = []
    for _ in range(n_iter):
        uc = model.get_learned_conditioning(b * [""]) if scale != 1.0 else None
        c = model.get_learned_conditioning(prompts)
        noise = torch.randn_like(init_latent)
        idx = torch.tensor([t_enc] * b)
        x = (
            torch.sqrt(alphas)[idx].reshape(b, 1, 1, 1) * init_latent
            + torch.from_numpy(sqrt_one_minus)[idx].reshape(b, 1, 1, 1) * noise
        )
        timesteps = ts[:t_enc]
        for i, step in enumerate(np.flip(timesteps)):
            index = t_enc - i - 1
            t = torch.full((b,), step, dtype=torch.long)
            if uc is None:
                e_t = model.apply_model(x, t, c)
            else:
                e_u, e_c = model.apply_model(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uc, c])).chunk(2)
                e_t = e_u + scale * (e_c - e_u)
            a_t = torch.full((b, 1, 1, 1), alphas[index].item())
            a_prev = torch.full((b, 1, 1, 1), alphas_prev[index])
            sigma_t = torch.full((b, 1, 1, 1), sigmas[index])
            s1m = torch.full((b, 1, 1, 1), sqrt_one_minus[index])
            pred_x0 = (x - s1m * e_t) / a_t.sqrt()
            dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
            x = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * torch.randn(x.shape)
        out.append(x)
    return out


def settings(**kw) -> SampleSettings:
    base = dict(steps=6, sampler="ddim", scale=5.0, height=64, width=64, n_samples=2, n_iter=1, seed=3)
    return SampleSettings(**{**base, **kw})


def run(model, s, strength, prompts=("a cat", "a dog"), **kw):
    init = to_model_range(init_picture())
    return list(generate_img2img(model, [list(prompts)], s, CPU, init, strength, progress=False, **kw))


@pytest.mark.parametrize(
    "steps,strength,eta,scale,n_iter", [(6, 0.75, 0.0, 5.0, 1), (10, 0.5, 0.5, 7.5, 2), (7, 0.3, 0.0, 1.0, 1)]
)
def test_ddim_img2img_follows_the_original_algorithm(tiny_model, steps, strength, eta, scale, n_iter):
    with torch.no_grad():
        ref = reference_img2img(tiny_model, ["a cat", "a dog"], steps, strength, eta, scale, n_iter, seed=3)
        ours = run(tiny_model, settings(steps=steps, eta=eta, scale=scale, n_iter=n_iter), strength)
    assert len(ours) == len(ref)
    for r, o in zip(ref, ours, strict=True):
        assert torch.equal(o.latents, r)  # bit for bit


def test_strength_zero_returns_the_autoencoder_round_trip(tiny_model):
    (batch,) = run(tiny_model, settings(), 0.0)
    torch.manual_seed(3)  # the one posterior draw comes right after seeding
    with torch.no_grad():
        init = to_model_range(init_picture()).repeat(2, 1, 1, 1)
        expected = tiny_model.decode_first_stage(
            tiny_model.get_first_stage_encoding(tiny_model.encode_first_stage(init))
        )
    assert torch.equal(batch.decoded, expected)


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m"])
def test_strength_one_equals_txt2img_from_the_same_noise(tiny_model, sampler):
    # 5 steps select exactly 5 of the 1000 (as 50 do): there the original indexes past its schedule at
    # strength 1, and we start from pure noise. (Counts like 6 select 7 steps; the original then noises to
    # the last one and runs 6, which we keep.)
    s = settings(sampler=sampler, eta=0.0, steps=5)
    (batch,) = run(tiny_model, s, 1.0)
    with torch.no_grad():
        if sampler == "ddim":
            expected = DDIMSampler(tiny_model).sample(
                s.steps,
                2,
                batch.x_T.shape[1:],
                batch.cond,
                unconditional_guidance_scale=s.scale,
                unconditional_conditioning=batch.uncond,
                x_T=batch.x_T,
                progress=False,
            )
        else:
            expected = solve(tiny_model, s, batch.cond, batch.uncond, batch.x_T, torch.Generator(), False)
    assert torch.equal(batch.latents, expected)


def test_encoding_steps_is_the_originals_t_enc():
    assert [encoding_steps(x, 50) for x in (0.0, 0.3, 0.75, 1.0)] == [0, 15, 37, 50]
    with pytest.raises(ValueError, match="strength"):
        encoding_steps(1.5, 50)


@pytest.mark.parametrize("sampler", sorted(SOLVERS))
def test_every_solver_does_img2img_reproducibly(tiny_model, sampler):
    s = settings(sampler=sampler, steps=4, n_samples=1)
    a = run(tiny_model, s, 0.6, prompts=("a cat",))[0]
    b = run(tiny_model, s, 0.6, prompts=("a cat",))[0]
    assert torch.isfinite(a.decoded).all() and torch.equal(a.decoded, b.decoded)


@pytest.mark.parametrize("sampler", ["ddim", "euler_a", "dpmpp_2m"])
def test_inpainting_keeps_unmasked_pixels_exactly(tiny_model, sampler):
    rgb = init_picture()
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1.0
    init = to_model_range(rgb)
    s = settings(sampler=sampler, n_samples=1)
    (batch,) = generate_img2img(tiny_model, [["a cat"]], s, CPU, init, 0.8, mask=mask, progress=False)
    out = composite(rgb, to_uint8_images(batch.decoded)[0], mask[0])
    keep = mask[0, 0].numpy() == 0
    assert np.array_equal(out[keep], rgb[keep])
    changed = np.abs(out[~keep].astype(int) - rgb[~keep].astype(int)).mean()
    assert changed > 5  # the repainted square really changed


@pytest.mark.parametrize("sampler,inpaint", [("ddim", False), ("euler_a", True)])
def test_low_memory_keeps_the_images(tiny_config, tiny_ckpt, tiny_model, sampler, inpaint):
    """img2img --low_memory: the encoders go first, the UNet before the last decode; the same images."""
    mask = None
    if inpaint:
        mask = torch.zeros(1, 1, 64, 64)
        mask[..., 8:40, 16:56] = 1.0
    init = to_model_range(init_picture())
    batches = [["a cat", "a dog"], ["a cow"]]
    s = settings(sampler=sampler, n_iter=2)
    plain = [b.decoded for b in generate_img2img(tiny_model, batches, s, CPU, init, 0.7, mask=mask, progress=False)]
    model = load_model(tiny_config, tiny_ckpt, CPU, verbose=False)
    runs = generate_img2img(model, batches, s, CPU, init, 0.7, mask=mask, progress=False, low_memory=True)
    freed = []
    for batch in runs:
        freed.append(batch.decoded)
        assert all(p.is_meta for p in model.cond_stage_model.parameters())
        assert all(p.is_meta for p in model.first_stage_model.encoder.parameters())
        assert any(p.is_meta for p in model.model.parameters()) == (len(freed) == 4)  # only for the last decode
    assert len(freed) == len(plain) == 4
    assert all(torch.equal(a, b) for a, b in zip(freed, plain, strict=True))


def test_image_reading_handles_modes_and_orientation(tmp_path):
    rgb = init_picture(70, 100)
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("L").save(tmp_path / "grey.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(tmp_path / "sixteen.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(rgb).save(tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95)
    assert load_image_array(tmp_path / "rgba.png").shape == (64, 96, 3)
    grey = load_image_array(tmp_path / "grey.png")
    assert np.array_equal(grey[..., 0], grey[..., 2])
    sixteen = load_image_array(tmp_path / "sixteen.png")
    assert abs(float(sixteen[..., 0].mean()) - float(rgb[..., 0][:64, :96].mean())) < 12  # not clipped to white
    assert load_image_array(tmp_path / "rotated.jpg").shape == (96, 64, 3)  # upright: 70 wide x 100 high
    x = load_image(tmp_path / "rgba.png")
    assert x.shape == (1, 3, 64, 96) and x.min() >= -1 and x.max() <= 1


def test_bad_images_are_one_line_errors(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    Image.fromarray(init_picture(20, 20)).save(tmp_path / "tiny.png")
    for path, words in [
        (tmp_path / "missing.png", "not found"),
        (tmp_path / "broken.png", "cannot read"),
        (tmp_path / "tiny.png", "at least 32x32"),
    ]:
        with pytest.raises(ImageInputError, match=words) as e:
            load_image(path)
        assert "\n" not in str(e.value)
    with pytest.raises(ImageInputError):
        fit_size(31, 100)


def test_mask_reading_dilate_and_blur(tmp_path):
    m = np.zeros((64, 64), np.uint8)
    m[30:34, 30:34] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    plain = load_mask(tmp_path / "m.png", (64, 64))
    grown = load_mask(tmp_path / "m.png", (64, 64), dilate=4)
    soft = load_mask(tmp_path / "m.png", (64, 64), blur=2.0)
    assert plain.sum() == 16 and grown.sum() == 144
    assert ((soft > 0) & (soft < 1)).any() and soft.max() <= 1
