"""Negative prompts, weighting and long prompts through generation and the CLI, on the tiny model."""

from __future__ import annotations

import torch

from ldm.generation.generate import SampleSettings, generate
from ldm.generation.load import load_model
from ldm.speed.runtime import Runtime

from .test_cli import txt2img

CPU = Runtime(torch.device("cpu"))
LONG = " ".join(80 * ["apple"])  # 80 tokens, past the 75 a window holds


def run(model, prompts, negative="", **kw):
    s = SampleSettings(
        **{**dict(steps=4, sampler="ddim", scale=7.5, height=64, width=64, n_samples=len(prompts), seed=5), **kw}
    )
    (batch,) = generate(model, [prompts], s, CPU, progress=False, negative_prompt=negative)
    return batch


def tiny(tiny_config, tiny_ckpt):
    return load_model(tiny_config, tiny_ckpt, CPU, verbose=False)


def test_negative_prompt_changes_only_the_unconditional_branch(tiny_config, tiny_ckpt):
    model = tiny(tiny_config, tiny_ckpt)
    plain, neg = run(model, ["a cat"]), run(model, ["a cat"], negative="blurry")
    assert torch.equal(plain.cond, neg.cond)
    assert torch.equal(neg.uncond, model.get_learned_conditioning(["blurry"]))
    assert not torch.allclose(plain.latents, neg.latents)
    # With guidance scale 1 the unconditional branch is unused: the negative prompt changes nothing.
    assert torch.equal(run(model, ["a cat"], scale=1.0).latents, run(model, ["a cat"], "blurry", scale=1.0).latents)


def test_per_prompt_negatives(tiny_config, tiny_ckpt):
    model = tiny(tiny_config, tiny_ckpt)
    batch = run(model, ["a cat", "a dog"], negative=[["blurry", "dark"]])
    assert torch.equal(batch.uncond, model.get_learned_conditioning(["blurry", "dark"]))


def test_weight_one_is_the_plain_prompt_and_weights_change_the_picture(tiny_config, tiny_ckpt):
    model = tiny(tiny_config, tiny_ckpt)
    plain = run(model, ["a red cat"])
    assert torch.equal(run(model, ["a (red:1.0) cat"]).latents, plain.latents)
    assert not torch.allclose(run(model, ["a (red:1.5) cat"]).latents, plain.latents)


def test_long_prompts_are_cut_by_default_and_kept_with_chunking(tiny_config, tiny_ckpt):
    model = tiny(tiny_config, tiny_ckpt)
    a, b = LONG + " cat", LONG + " dog"  # differ only after token 77
    assert torch.equal(run(model, [a]).latents, run(model, [b]).latents)  # the original's truncation
    ca, cb = run(model, [a], chunking=True), run(model, [b], chunking=True)
    tokens = len(model.cond_stage_model.tokenizer.encode(a))
    assert ca.cond.shape[1] == 77 * -(-tokens // 75) > 77 and ca.uncond.shape == ca.cond.shape
    assert not torch.equal(ca.cond, cb.cond)


def test_cli_warns_with_the_dropped_words_and_writes_the_negative_prompt(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    proc = txt2img(
        "--prompt",
        LONG + " zebra",
        "--negative_prompt",
        "blurry",
        "--H",
        "64",
        "--W",
        "64",
        "--ddim_steps",
        "2",
        "--n_samples",
        "1",
        "--n_iter",
        "1",
        "--outdir",
        str(out),
        "--skip_grid",
        "--no-watermark",
        ckpt=tiny_ckpt,
    )
    assert proc.returncode == 0, proc.stderr
    warning = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and warning[0].endswith("(--long_prompts keeps them)")
    assert "dropped: 'apple apple apple apple apple zebra'" in warning[0]  # tokens 76 to 81
    from PIL import Image

    with Image.open(out / "samples" / "00000.png") as im:
        assert "\nNegative prompt: blurry\n" in im.text["parameters"]
