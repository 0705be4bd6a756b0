"""Every bad input through the real command line: exit code 2, exactly one `error:` line on stderr naming
the problem, and not one new file or directory anywhere. Plus the closed-form checks behind the new errors
(memory estimate, output-directory test, NaN/inf detection)."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.cli.txt2img import main, one_line
from ldm.generation.checks import (
    NonFiniteError,
    available_memory,
    check_finite,
    estimate_peak_bytes,
    format_bytes,
    model_widths,
    unwritable_dir_reason,
)

from .conftest import REPO, TINY_CONFIG

SCRIPT = REPO / "scripts" / "txt2img.py"
GiB = 1024**3

# Each case: extra flags (later flags win over the valid base run below) and a word the error must name.
# {tmp} is the case's scratch directory. The list runs through the real command line (a subprocess,
# 2-3 s each for Python and torch to start); further cases of the same checks run `main()` in-process.
SUBPROCESS_CASES = {
    "missing checkpoint": (["--ckpt", "{tmp}/nope.ckpt"], "checkpoint not found"),
    "checkpoint is a directory": (["--ckpt", "{tmp}"], "directory"),
    "truncated checkpoint": (["--ckpt", "{tmp}/truncated.ckpt"], "truncated or corrupt"),
    "random bytes as .safetensors": (["--ckpt", "{tmp}/random.safetensors"], "corrupt"),
    "wrong tensor shape": (["--ckpt", "{tmp}/wrong_shape.ckpt"], "does not fit this config"),
    "H not a multiple of 8": (["--H", "100"], "multiples of --f"),
    "zero steps": (["--ddim_steps", "0"], "--ddim_steps"),
    "negative scale": (["--scale", "-1"], "--scale"),
    "unknown sampler": (["--sampler", "eulr"], "unknown sampler"),
    "empty --from-file": (["--from-file", "{tmp}/empty.txt"], "no prompts"),
    "--from-file is a directory": (["--from-file", "{tmp}"], "cannot read --from-file"),
    "outdir under a regular file": (["--outdir", "{tmp}/empty.txt/out"], "--outdir"),
    "size that cannot fit in memory": (["--H", "65536", "--W", "65536"], "memory"),
    "missing config": (["--config", "{tmp}/nope.yaml"], "config file not found"),
    "--plms with --sampler euler": (["--plms", "--sampler", "euler"], "disagree"),
}
IN_PROCESS_CASES = {
    "random bytes as .ckpt": (["--ckpt", "{tmp}/random.ckpt"], "corrupt"),
    "pickle named .safetensors": (["--ckpt", "{tmp}/pickle.safetensors"], "holds a PyTorch pickle"),
    "bare VAE checkpoint": (["--ckpt", "{tmp}/vae.ckpt"], "bare VAE"),
    "W not a multiple of 8": (["--W", "36"], "multiples of --f"),
    "H not an integer": (["--H", "64.5"], "invalid int value"),
    "too many steps": (["--ddim_steps", "1001"], "--ddim_steps"),
    "infinite scale": (["--scale", "inf"], "--scale"),
    "NaN eta": (["--ddim_eta", "nan"], "--ddim_eta"),
    "zero samples": (["--n_samples", "0"], "--n_samples"),
    "karras with ddim": (["--karras"], "--karras"),
    "missing --from-file": (["--from-file", "{tmp}/missing.txt"], "cannot read --from-file"),
    "--from-file not UTF-8": (["--from-file", "{tmp}/latin1.txt"], "not UTF-8"),
    "outdir is a regular file": (["--outdir", "{tmp}/empty.txt"], "not a directory"),
    "batch that cannot fit in memory": (["--n_samples", "100000000"], "--n_samples"),
    "latent channels": (["--C", "3"], "latent channels"),
    "seed out of range": (["--seed", str(2**64)], "--seed"),
    "unknown precision": (["--precision", "fp8"], "invalid choice"),
    "VAE tile not a multiple of --f": (["--vae_tile", "100"], "--vae_tile"),
    "VAE tile too small": (["--vae_tile", "16"], "--vae_tile"),
    "negative --deepcache": (["--deepcache", "-1"], "--deepcache"),
    "--compile with --deepcache": (["--compile", "--deepcache", "3"], "do not combine"),
    "token merging ratio of 1": (["--tome", "1"], "--tome"),
    "unknown device": (["--device", "tpu"], "unknown device"),
    "not a model config": (["--config", "{tmp}/empty.txt"], "model.target"),
    "prompt that is not UTF-8": (["--prompt", "caf\udce9"], "UTF-8"),
    "NUL in a path": (["--outdir", "{tmp}/a\0b"], "NUL"),
}
CASES = {**SUBPROCESS_CASES, **IN_PROCESS_CASES}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_ckpt) -> Path:
    """Read-only inputs shared by the cases (each case runs in its own, empty, scratch directory)."""
    d = tmp_path_factory.mktemp("bad-inputs")
    data = tiny_ckpt.read_bytes()
    (d / "truncated.ckpt").write_bytes(data[: len(data) // 2])
    noise = torch.Generator().manual_seed(0)
    random_bytes = bytes(torch.randint(0, 256, (4096,), generator=noise, dtype=torch.uint8).tolist())
    (d / "random.ckpt").write_bytes(random_bytes)
    (d / "random.safetensors").write_bytes(random_bytes)
    (d / "pickle.safetensors").write_bytes(data)
    # A valid checkpoint of another model: the UNet takes 9 input channels (an inpainting layout).
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 9, 3, 3)}},
               d / "wrong_shape.ckpt")  # fmt: skip
    torch.save({"state_dict": {"encoder.conv_in.weight": torch.zeros(32, 3, 3, 3)}}, d / "vae.ckpt")
    return d


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in root.rglob("*")}


def txt2img(args: list[str], in_process: bool) -> tuple[int, str]:
    """(exit code, stderr) of txt2img with these arguments."""
    if in_process:
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = main(args)
        return code, err.getvalue()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # the CLI's own warning policy
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    argv = [sys.executable, str(SCRIPT), *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, cwd=REPO)
    return proc.returncode, proc.stderr


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, tmp_path, bad_files, tiny_ckpt):
    extra, needle = CASES[case]
    for f in bad_files.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    base = ["--config", str(TINY_CONFIG), "--ckpt", str(tiny_ckpt), "--prompt", "a cat", "--quiet"]
    base += ["--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1"]
    base += ["--outdir", str(tmp_path / "out")]
    before = _tree(tmp_path)
    code, stderr = txt2img(base + [a.replace("{tmp}", str(tmp_path)) for a in extra], case in IN_PROCESS_CASES)
    assert code == 2, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and len(lines[0]) > len("error: "), stderr
    assert needle in lines[0], lines[0]
    assert _tree(tmp_path) == before  # no output dir, no partial or temp file, inputs untouched


# --------------------------------------------------------------------------- the checks, in closed form


def test_memory_estimate_closed_form():
    # 512x512, one sample with guidance, SD v1 widths: UNet 32*2*4096*320*4, VAE 6*262144*128*4,
    # text 8*2*77*768*4; the VAE decoder's full-resolution activations are the peak.
    assert estimate_peak_bytes(512, 512) == 6 * 512 * 512 * 128 * 4 == 768 * 1024**2
    assert estimate_peak_bytes(512, 512, weight_bytes=GiB) == GiB + 768 * 1024**2
    # The UNet term alone: no guidance halves it; fp16 halves everything.
    unet = 32 * 2 * 64 * 64 * 320 * 4
    assert unet == 320 * 1024**2
    assert estimate_peak_bytes(512, 512, vae_channels=0) == unet
    assert estimate_peak_bytes(512, 512, vae_channels=0, guidance=False) == unet // 2
    assert estimate_peak_bytes(512, 512, vae_channels=0, dtype_bytes=2) == unet // 2
    # Linear in the batch and in the pixel count.
    assert estimate_peak_bytes(512, 512, n_samples=3) == 3 * estimate_peak_bytes(512, 512)
    assert estimate_peak_bytes(1024, 512) == 2 * estimate_peak_bytes(512, 512)
    # Tiny images with a huge batch: the text encoder (77 tokens per prompt) dominates.
    assert estimate_peak_bytes(8, 8, n_samples=1000) == 8 * 2000 * 77 * 768 * 4
    # SD v1 at 512x512, batch 3, fp32 weights (4 GiB): about 6.3 GiB, so a 16 GB machine runs it ...
    assert 6 * GiB < estimate_peak_bytes(512, 512, n_samples=3, weight_bytes=4 * GiB) < 7 * GiB
    # ... and 65536x65536 cannot run anywhere (exact integers, no overflow).
    assert estimate_peak_bytes(65536, 65536) == 6 * 65536**2 * 128 * 4 == 12 * 1024**4
    # --vae_tile: one tile's activations at a time, plus the float32 image and blend weights (4 planes).
    vae_only = dict(unet_channels=0, text_channels=0)
    assert estimate_peak_bytes(1024, 1024, vae_tile=512, **vae_only) == 6 * 512 * 512 * 128 * 4 + 1024 * 1024 * 16
    assert estimate_peak_bytes(1024, 1024, vae_tile=512, **vae_only) < estimate_peak_bytes(1024, 1024) / 3
    assert estimate_peak_bytes(512, 512, vae_tile=512) == estimate_peak_bytes(512, 512)  # one tile: untiled
    assert estimate_peak_bytes(1024, 256, vae_tile=512, **vae_only) == 6 * 512 * 256 * 128 * 4 + 1024 * 256 * 16


def test_available_memory():
    have, what = available_memory(torch.device("cpu"))
    assert have is not None and 0 < have < 2**60 and what.startswith("available")
    assert available_memory(torch.device("meta")) == (None, "")  # unknown: no check, no refusal


def test_model_widths_from_configs(tiny_config):
    from omegaconf import OmegaConf

    assert model_widths(tiny_config) == (32, 32, 32)
    assert model_widths(OmegaConf.load(REPO / "configs/stable-diffusion/v1-inference.yaml")) == (320, 128, 768)
    assert model_widths({}) == (320, 128, 768)


def test_format_bytes():
    assert format_bytes(0) == "0 B"
    assert format_bytes(1023) == "1023 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(1024**2) == "1.0 MiB"
    assert format_bytes(768 * 1024**2) == "768.0 MiB"
    assert format_bytes(12 * 1024**4) == "12.0 TiB"
    assert format_bytes(10**40) == "~10^27 TiB"  # beyond any float's reach it stays an integer


def test_unwritable_dir_reason_creates_nothing(tmp_path):
    (tmp_path / "file").write_text("x")
    assert unwritable_dir_reason(tmp_path) is None
    assert unwritable_dir_reason(tmp_path / "a" / "b" / "c") is None  # makedirs will make them
    assert "not a directory" in unwritable_dir_reason(tmp_path / "file")
    assert "is a file" in unwritable_dir_reason(tmp_path / "file" / "sub" / "dir")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert "broken symbolic link" in unwritable_dir_reason(tmp_path / "dangling" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "file"]
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        try:
            assert "permission" in unwritable_dir_reason(locked)
            assert "permission" in unwritable_dir_reason(locked / "out")
        finally:
            locked.chmod(0o700)


def test_check_finite():
    check_finite(torch.zeros(2, 3), "fine", "no hint")
    x = torch.zeros(2, 3)
    x[0, 0], x[1, 2] = float("nan"), float("-inf")
    with pytest.raises(NonFiniteError, match=r"^latents went bad: 1 NaN and 1 inf among 6 values; try this$"):
        check_finite(x, "latents went bad", "try this")


def test_one_line_escapes_every_line_break():
    text = "a\nb\rc\x0bd\x0ce\x1cf\x85g\u2028h\u2029i\x00j\tk"
    out = one_line(text)
    assert len(out.splitlines()) == 1 and out.startswith("a\\nb\\rc")
    assert one_line("caf\u00e9 \u732b") == "caf\u00e9 \u732b"  # printable text is kept as is
