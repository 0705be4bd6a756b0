"""Ctrl-C (SIGINT) during a real txt2img run: exit code 130 with one line, no partial PNG or temp file
left behind, earlier outputs untouched, and every image that was written complete."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.files.image_output import SAMPLE_PATTERN

from .conftest import REPO, TINY_CONFIG

SCRIPT = REPO / "scripts" / "txt2img.py"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process is POSIX")


@pytest.fixture(autouse=True)
def python_sigint_handling():
    """Ctrl-C as a terminal gives it, also when pytest itself was started as a background job of a
    non-interactive shell (which ignores SIGINT, and children inherit that)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # so the child's Python installs its KeyboardInterrupt handler


def start(out: Path, ckpt: Path, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    argv = [sys.executable, str(SCRIPT), "--config", str(TINY_CONFIG), "--ckpt", str(ckpt), "--quiet"]
    argv += ["--prompt", "a cat", "--no-watermark", "--outdir", str(out), *args]
    return subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
        preexec_fn=_default_sigint,
    )


def wait_for(proc: subprocess.Popen, ready, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"txt2img ended early ({proc.returncode}): {proc.stderr.read()}"
        assert time.monotonic() < deadline, "txt2img did not get there in time"
        time.sleep(0.02)


def wait_for_sampling(proc: subprocess.Popen) -> None:
    """Block until the run prints that sampling starts (stdout is unbuffered)."""
    while True:
        line = proc.stdout.readline()
        assert line, f"txt2img ended before sampling ({proc.wait()}): {proc.stderr.read()}"
        if line.startswith("Sampling on"):
            return


def interrupt(proc: subprocess.Popen) -> tuple[int, str]:
    assert proc.poll() is None, "the run finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    try:
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stderr


def leftovers(out: Path) -> list[str]:
    """Temp files or anything that is not a finished image."""
    return [p.name for p in out.rglob("*") if p.is_file() and (p.name.startswith(".") or not p.name.endswith(".png"))]


def existing_outputs(out: Path) -> dict[str, bytes]:
    (out / "samples").mkdir(parents=True)
    for name, shade in (("samples/00000.png", 40), ("grid-0000.png", 200)):
        Image.fromarray(np.full((8, 8, 3), shade, np.uint8)).save(out / name)
    return {name: (out / name).read_bytes() for name in ("samples/00000.png", "grid-0000.png")}


def test_sigint_mid_sampling_leaves_no_partial_file(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    before = existing_outputs(out)
    # One long batch (1000 steps at 128x128): the signal lands while the sampler runs.
    proc = start(out, tiny_ckpt, "--H", "128", "--W", "128", "--ddim_steps", "1000", "--n_samples", "1")
    wait_for_sampling(proc)
    time.sleep(0.5)
    code, stderr = interrupt(proc)
    assert code == 130, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("interrupted"), stderr
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["grid-0000.png", "samples", "samples/00000.png"]
    assert {name: (out / name).read_bytes() for name in before} == before


def test_sigint_between_images_keeps_the_finished_ones_complete(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    before = existing_outputs(out)
    # Many quick batches: interrupt once a few images have been published (maybe during a write).
    proc = start(out, tiny_ckpt, "--H", "64", "--W", "64", "--ddim_steps", "2", "--n_samples", "2", "--n_iter", "500")
    wait_for(proc, lambda: len(list((out / "samples").glob("0*.png"))) >= 5)
    code, stderr = interrupt(proc)
    assert code == 130, stderr
    assert len(stderr.splitlines()) == 1 and stderr.startswith("interrupted"), stderr
    assert leftovers(out) == []
    assert {name: (out / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in out.glob("grid-*")) == ["grid-0000.png"]  # the grid is only written at the end
    samples = sorted((out / "samples").iterdir())
    assert all(re.fullmatch(SAMPLE_PATTERN, p.name) for p in samples)
    assert len(samples) >= 5
    for png in samples[1:]:
        with Image.open(png) as img:
            img.verify()  # chunk CRCs and structure
        with Image.open(png) as img:
            assert img.size == (64, 64) and np.asarray(img.convert("RGB")).shape == (64, 64, 3)  # all pixel data
            assert "Seed: 42" in img.text["parameters"]


def test_a_file_being_written_is_finished_before_the_interrupt():
    from ldm.cli.txt2img import finish_before_interrupt

    handler = signal.getsignal(signal.SIGINT)
    steps = []
    with pytest.raises(KeyboardInterrupt):
        with finish_before_interrupt():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the signal is handled (deferred) during this block ...
            steps.append("write finished")
        steps.append("not reached")  # ... and raised as soon as the block is left
    assert steps == ["write finished"]
    assert signal.getsignal(signal.SIGINT) is handler
    with finish_before_interrupt():
        steps.append("no signal")
    assert steps == ["write finished", "no signal"]
