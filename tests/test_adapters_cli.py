"""--lora / --embedding / <lora:NAME:W> on the command lines (tiny model, in-process): a tag is the flag, the PNG
records what was used with the hashes other tools write, bad files are one-line errors."""

from __future__ import annotations

import hashlib
import shutil
import struct

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from ldm.cli import img2img, txt2img
from ldm.files.infotext import parse_infotext
from ldm.util import instantiate_from_config

from .adapter_models import lora_factors, make_lora
from .conftest import TINY_CONFIG, random_state_dict

RUN = ("--config", str(TINY_CONFIG), "--quiet", "--H", "64", "--W", "64", "--ddim_steps", "3", "--n_samples", "1",
       "--n_iter", "1", "--skip_grid", "--seed", "7")  # fmt: skip


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny checkpoint, a LoRA for it in models/lora-like folder, an embedding in an embeddings folder."""
    root = tmp_path_factory.mktemp("adapters")
    model = instantiate_from_config(OmegaConf.load(TINY_CONFIG).model)
    sd = random_state_dict(model)
    torch.save({"state_dict": sd}, root / "tiny.ckpt")
    model.load_state_dict(sd, strict=False)
    (root / "lora").mkdir()
    text = model.cond_stage_model.transformer.text_model
    save_file(make_lora("kohya_ldm", model.model.diffusion_model, text, seed=0), root / "lora" / "inkstyle.safetensors")
    (root / "emb").mkdir()
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(1)) * 0.05
    torch.save({"string_to_param": {"*": vectors}}, root / "emb" / "mystyle.pt")
    return root


def run(tool, tmp_path, name: str, *args: str, ckpt) -> tuple[int, np.ndarray | None, dict]:
    out = tmp_path / name
    code = tool.main([*RUN, "--ckpt", str(ckpt), "--outdir", str(out), *args])
    if code:
        return code, None, {}
    png = Image.open(out / "samples" / "00000.png")
    return code, np.asarray(png), parse_infotext(png.info["parameters"])


def addnet_hash(path) -> str:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n :]).hexdigest()[:12]


def test_prompt_tag_is_the_flag(tmp_path, files):
    ckpt, lora = files / "tiny.ckpt", files / "lora" / "inkstyle.safetensors"
    code, tagged, (prompt, _, fields) = run(
        txt2img, tmp_path, "tag", "--prompt", "a cat <lora:inkstyle:0.8>", "--lora_dir", str(files / "lora"), ckpt=ckpt
    )
    assert code == 0
    code, flagged, (flag_prompt, _, flag_fields) = run(
        txt2img, tmp_path, "flag", "--prompt", "a cat ", "--lora", f"{lora}:0.8", ckpt=ckpt
    )
    assert code == 0
    _, plain, _ = run(txt2img, tmp_path, "plain", "--prompt", "a cat ", ckpt=ckpt)
    _, weaker, _ = run(txt2img, tmp_path, "weaker", "--prompt", "a cat ", "--lora", f"{lora}:0.4", ckpt=ckpt)
    assert np.array_equal(tagged, flagged)
    assert not np.array_equal(tagged, plain) and not np.array_equal(tagged, weaker)
    assert prompt == "a cat <lora:inkstyle:0.8>" and flag_prompt == "a cat  <lora:inkstyle:0.8>"
    assert fields["Lora hashes"] == flag_fields["Lora hashes"] == f"inkstyle: {addnet_hash(lora)}"


def test_embedding_by_flag_and_by_name_in_the_folder(tmp_path, files):
    ckpt, emb = files / "tiny.ckpt", files / "emb" / "mystyle.pt"
    digest = hashlib.sha256(emb.read_bytes()).hexdigest()[:12]
    code, flagged, (_, _, fields) = run(txt2img, tmp_path, "f", "--prompt", "a mystyle cat", "--embedding", str(emb),
                                        "--embeddings_dir", str(tmp_path / "none"), ckpt=ckpt)  # fmt: skip
    assert code == 0 and fields["TI hashes"] == f"mystyle: {digest}"
    code, found, _ = run(txt2img, tmp_path, "d", "--prompt", "a mystyle cat", "--embeddings_dir", str(files / "emb"),
                         ckpt=ckpt)  # fmt: skip
    assert code == 0 and np.array_equal(flagged, found)
    _, plain, (_, _, plain_fields) = run(txt2img, tmp_path, "p", "--prompt", "a mystyle cat",
                                         "--embeddings_dir", str(tmp_path / "none"), ckpt=ckpt)  # fmt: skip
    assert not np.array_equal(flagged, plain) and "TI hashes" not in plain_fields
    # In the negative prompt only: found there too.
    neg_args = ("--prompt", "a cat", "--negative_prompt", "mystyle", "--embeddings_dir", str(files / "emb"))
    _, negative, (_, neg_text, neg_fields) = run(txt2img, tmp_path, "n", *neg_args, ckpt=ckpt)
    assert neg_text == "mystyle" and neg_fields["TI hashes"] == f"mystyle: {digest}"
    _, negative_plain, _ = run(txt2img, tmp_path, "m", *neg_args[:4], "--embeddings_dir", "none", ckpt=ckpt)
    assert not np.array_equal(negative, negative_plain)


def test_img2img_takes_the_same_flags(tmp_path, files):
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(tmp_path / "init.png")
    lora = files / "lora" / "inkstyle.safetensors"
    args = ("--init-img", str(tmp_path / "init.png"), "--strength", "0.6", "--prompt", "a cat")
    code, with_lora, (_, _, fields) = run(img2img, tmp_path, "i1", *args, "--lora", f"{lora}:1.2",
                                          ckpt=files / "tiny.ckpt")  # fmt: skip
    assert code == 0 and fields["Lora hashes"] == f"inkstyle: {addnet_hash(lora)}"
    _, without, _ = run(img2img, tmp_path, "i2", *args, ckpt=files / "tiny.ckpt")
    assert not np.array_equal(with_lora, without)


def test_bad_lora_is_a_one_line_error_before_any_image(tmp_path, files, capsys):
    bad = tmp_path / "wide.safetensors"
    up, down = lora_factors(torch.nn.Linear(320, 320), 4, torch.Generator().manual_seed(0))
    save_file({"lora_unet_middle_block_1_proj_out.lora_up.weight": up,
               "lora_unet_middle_block_1_proj_out.lora_down.weight": down}, bad)  # fmt: skip
    code, _, _ = run(txt2img, tmp_path, "bad", "--prompt", "a cat", "--lora", str(bad), ckpt=files / "tiny.ckpt")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "wide.safetensors does not fit" in err[0] and "lora_unet_middle_block_1_proj_out" in err[0]
    assert not (tmp_path / "bad" / "samples").exists() or not any((tmp_path / "bad" / "samples").iterdir())
    for args, message in [
        (("--prompt", "a <lora:nothere:0.5> cat", "--lora_dir", str(files / "lora")), "<lora:nothere> not found"),
        (("--prompt", "a <lora:inkstyle:x> cat", "--lora_dir", str(files / "lora")), "weight 'x' is not a number"),
        (("--prompt", "a cat", "--lora", str(tmp_path / "missing.safetensors")), "file not found"),
    ]:
        code, _, _ = run(txt2img, tmp_path, "bad2", *args, ckpt=files / "tiny.ckpt")
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and message in err[0], err
    shutil.rmtree(tmp_path / "bad2", ignore_errors=True)


def test_adapters_for_prompts_as_the_pipeline_would_call_it(files):
    from ldm.adapters import adapters_for_prompts
    from ldm.generation.load import load_model
    from ldm.speed.runtime import resolve_runtime

    config = OmegaConf.load(TINY_CONFIG)
    model = load_model(config, files / "tiny.ckpt", resolve_runtime(config, "cpu", "full", None, None), verbose=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompts, negatives, handle = adapters_for_prompts(
        model, ["a <lora:inkstyle:0.8>cat"], ["mystyle"], lora_dir=str(files / "lora"),
        embeddings_dir=str(files / "emb"),
    )  # fmt: skip
    with handle:
        assert (prompts, negatives) == (["a cat"], ["mystyle"])
        assert [(lora.name, w) for lora, w in handle.loras] == [("inkstyle", 0.8)]
        assert [e.word for e in handle.embeddings] == ["mystyle"]
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_pipeline_takes_loras_for_one_call_as_the_cli_does(tmp_path, files):
    """Pipeline.txt2img(loras=...) gives the CLI's picture for --lora with the same settings, and the next call
    without it is the base model's again."""
    from ldm.generation.pipeline import Pipeline

    lora = files / "lora" / "inkstyle.safetensors"
    pipe = Pipeline.from_config(TINY_CONFIG, ckpt=files / "tiny.ckpt", device="cpu", precision="full")
    settings = dict(n=1, seed=7, steps=3, sampler="ddim", height=64, width=64)
    base = np.asarray(pipe.txt2img("a cat", **settings)[0])
    with_lora = np.asarray(pipe.txt2img("a cat", loras=[(str(lora), 0.8)], **settings)[0])
    assert np.array_equal(np.asarray(pipe.txt2img("a cat", **settings)[0]), base)  # unmerged after the call
    code, cli, _ = run(txt2img, tmp_path, "cli", "--prompt", "a cat", "--lora", f"{lora}:0.8", "--no-watermark",
                       ckpt=files / "tiny.ckpt")  # fmt: skip
    assert code == 0 and np.array_equal(with_lora, cli) and not np.array_equal(with_lora, base)
