"""Property tests: no command line and no prompt text makes txt2img crash.

`main(argv)` in-process must return 0, or 2 with exactly one `error:` line (1 only for the NaN/inf
error, which a huge --scale or --ddim_eta can rightly cause), and never raise. Most examples stop just
before the model would load (`load_model` is replaced by a sentinel), so thousands of argument
combinations run in seconds; a few run the tiny model end to end. Examples are derandomized, so CI
sees the same ones on every run.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from argparse import Namespace
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from PIL import Image

from ldm.cli import txt2img
from ldm.cli.options import UsageError
from ldm.cli.txt2img import main, read_batches
from ldm.generation.generate import SAMPLER_NAMES
from ldm.modules.encoders.tokenizer import BOS_ID, CONTEXT_LENGTH, EOS_ID, get_tokenizer

from .conftest import TINY_CONFIG

# Hypothesis keeps caches in ./.hypothesis; keep the checkout clean.
set_hypothesis_home_dir(os.path.join(tempfile.gettempdir(), "ldm-hypothesis"))

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

INTS = st.one_of(
    st.integers(-16, 80),
    st.sampled_from([0, -8, 8, 64, 512, 65536, 2**31, 2**63, 2**64, -(2**63) - 1, 10**30]),
    st.integers(),
)
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 1.0, 7.5, -1.0, 1e308, float("nan"), float("inf"), float("-inf")]),
)
# Every character, lone surrogates included: undecodable bytes on a command line arrive as those.
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=60)
PROMPTS = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=300),
    st.text(st.sampled_from("\x00\n\r\t\x0b\x0c\x1b\x7f\x85\u2028\u200b\ufeff a(b)[c]:1.5\\"), max_size=80),
    st.builds(lambda s, n: s * n, st.text(min_size=1, max_size=8), st.integers(100, 2000)),  # very long
)
SAMPLERS = st.one_of(st.sampled_from([*SAMPLER_NAMES, "list"]), ANY_TEXT)


def number(values):
    """A flag's value: mostly a number as text, sometimes text that is not one."""
    return st.one_of(values.map(repr), st.sampled_from(["", "abc", "1.5", "0x10", "1e3", " 8", "nan"]))


def mostly(valid, anything):
    """Nine times in ten a value that passes the checks (so that combinations do), else anything."""
    return st.integers(0, 9).flatmap(lambda k: anything if k == 0 else valid)


SIZES = st.sampled_from([8, 16, 24, 64, 512, 4096])
NUMERIC_FLAGS = {
    "--H": mostly(SIZES.map(repr), number(INTS)),
    "--W": mostly(SIZES.map(repr), number(INTS)),
    "--ddim_steps": mostly(st.integers(1, 1000).map(repr), number(INTS)),
    "--n_samples": mostly(st.integers(1, 8).map(repr), number(INTS)),
    "--n_iter": mostly(st.integers(1, 4).map(repr), number(INTS)),
    "--n_rows": mostly(st.integers(-2, 10).map(repr), number(INTS)),
    "--C": mostly(st.just(4).map(repr), number(INTS)),
    "--f": mostly(st.sampled_from([8, 4, 1]).map(repr), number(INTS)),
    "--seed": mostly(st.integers(-(2**63), 2**64 - 1).map(repr), number(INTS)),
    "--scale": mostly(st.floats(0, 50).map(repr), number(FLOATS)),
    "--ddim_eta": mostly(st.just(0.0).map(repr), number(FLOATS)),
}
SWITCHES = ["--plms", "--karras", "--fixed_code", "--skip_grid", "--skip_save", "--no-watermark"]


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_ckpt) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fuzz")
    (d / "prompts.txt").write_text("a cat\n\na dog\n")
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\xff\xfe\x00\x80abc")
    return {"dir": d, "ckpt": tiny_ckpt}


class _Reached(Exception):
    """Raised in place of loading the model: the arguments passed every check."""


def run_main(argv: list[str]) -> tuple[int | str, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        try:
            code: int | str = main(argv)
        except _Reached:
            code = "reached"
    return code, err.getvalue()


def assert_clean(code: int | str, stderr: str, allowed: tuple = (0, 2, "reached")) -> None:
    event(f"exit {code}")  # --hypothesis-show-statistics shows how the examples ended
    assert code in allowed, (code, stderr)
    if code in (1, 2):
        errors = [ln for ln in stderr.splitlines() if ln.startswith("error: ")]
        others = [ln for ln in stderr.splitlines() if not ln.startswith(("error: ", "warning: "))]
        assert len(errors) == 1 and not others, stderr
        if code == 1:
            assert "NaN/inf" in errors[0], stderr


@st.composite
def command_lines(draw, work_dir: Path) -> list[str]:
    argv = ["--config", str(TINY_CONFIG), "--quiet", "--outdir", str(work_dir / "out")]
    argv.append(f"--prompt={draw(PROMPTS)}")
    for flag, values in NUMERIC_FLAGS.items():
        if draw(st.booleans()):
            argv.append(f"{flag}={draw(values)}")
    if draw(st.booleans()):
        argv.append(f"--sampler={draw(mostly(st.sampled_from(SAMPLER_NAMES), SAMPLERS))}")
    argv += [s for s in SWITCHES if draw(st.integers(0, 5)) == 0]
    if draw(st.integers(0, 3)) == 0:
        name = draw(st.sampled_from(["prompts.txt", "empty.txt", "binary.txt", "missing.txt", "."]))
        argv.append(f"--from-file={work_dir / name}")
    if draw(st.integers(0, 5)) == 0:
        argv.append(f"--device={draw(st.sampled_from(['cpu', 'auto', 'cuda', 'cuda:7', 'tpu', '']))}")
    if draw(st.integers(0, 5)) == 0:
        argv.append(f"--precision={draw(st.sampled_from(['full', 'autocast', 'fp16']))}")
    return argv


@settings(FUZZ, max_examples=300)
@given(data=st.data())
def test_any_command_line_is_a_clean_error_or_reaches_the_model(work, data):
    argv = data.draw(command_lines(work["dir"]))
    argv += ["--ckpt", str(work["ckpt"])]
    with mock.patch.object(txt2img, "load_model", side_effect=_Reached):
        code, stderr = run_main(argv)
    assert_clean(code, stderr)
    assert not (work["dir"] / "out").exists()  # nothing is created before the model has loaded


@settings(FUZZ, max_examples=10)
@given(
    prompt=PROMPTS,
    size=st.tuples(st.sampled_from([8, 16, 24, 40, 64]), st.sampled_from([8, 16, 32, 48])),
    steps=st.integers(1, 3),
    n_samples=st.integers(1, 2),
    scale=FLOATS,
    eta=st.sampled_from([0.0, 0.5, 1e300]),
    sampler=st.sampled_from(SAMPLER_NAMES),
    karras=st.booleans(),
    seed=st.sampled_from([0, 42, -1, 2**64 - 1, 2**64]),
)
def test_real_tiny_runs_never_crash(work, prompt, size, steps, n_samples, scale, eta, sampler, karras, seed):
    out = Path(tempfile.mkdtemp(dir=work["dir"]))
    argv = ["--config", str(TINY_CONFIG), "--ckpt", str(work["ckpt"]), "--quiet", "--outdir", str(out)]
    argv += [f"--prompt={prompt}", "--H", str(size[0]), "--W", str(size[1]), "--ddim_steps", str(steps)]
    argv += ["--n_samples", str(n_samples), "--n_iter", "1", f"--scale={scale!r}", f"--ddim_eta={eta!r}"]
    argv += ["--sampler", sampler, "--seed", str(seed), "--no-watermark", *(["--karras"] if karras else [])]
    code, stderr = run_main(argv)
    assert_clean(code, stderr, allowed=(0, 1, 2))
    pngs = sorted(out.rglob("*.png")) if out.exists() else []
    if code == 0:
        assert len(pngs) == n_samples + 1  # the samples and their grid
        for png in pngs:
            with Image.open(png) as img:
                img.verify()
    else:
        assert pngs == []  # a batch that went NaN/inf is not saved


def test_the_fuzzed_real_runs_include_a_success_and_a_nan(work):
    """The property above holds vacuously if every run errs: pin one good run and one NaN run."""
    base = ["--config", str(TINY_CONFIG), "--ckpt", str(work["ckpt"]), "--quiet", "--no-watermark"]
    base += ["--H", "16", "--W", "16", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--skip_grid"]
    good = work["dir"] / "good"
    prompt = "a\x00b\r\ncat \u732b \U0001f431 \u202e\x1b[31m" + "word " * 500  # NUL, controls, very long
    assert run_main([*base, "--outdir", str(good), f"--prompt={prompt}"]) == (0, "")
    assert [p.name for p in (good / "samples").iterdir()] == ["00000.png"]
    with Image.open(good / "samples" / "00000.png") as img:
        assert img.text["parameters"].startswith(prompt + "\nSteps: 2, ")
    bad = work["dir"] / "nan"
    code, stderr = run_main([*base, "--outdir", str(bad), "--scale", "1e308"])
    assert code == 1 and stderr.startswith("error: sampling produced NaN/inf latents"), stderr
    assert len(stderr.splitlines()) == 1 and "--scale" in stderr
    assert not bad.exists() or not any(bad.rglob("*.png"))


@settings(FUZZ, max_examples=200)
@given(text=st.one_of(PROMPTS, st.text(max_size=2000)))
def test_tokenizer_takes_any_text(text):
    ids = get_tokenizer()(text.encode("utf-8", "replace").decode("utf-8"))  # surrogates are refused earlier
    assert ids.shape == (1, CONTEXT_LENGTH) and ids.dtype == torch.long
    row = ids[0].tolist()
    assert row[0] == BOS_ID and EOS_ID in row[1:] and all(0 <= i <= EOS_ID for i in row)


@settings(FUZZ, max_examples=200)
@given(content=st.one_of(st.binary(max_size=400), st.text(max_size=400).map(lambda t: t.encode("utf-8"))))
def test_prompt_file_reader_takes_any_bytes(work, content):
    path = work["dir"] / "fuzzed-prompts.txt"
    path.write_bytes(content)
    opt = Namespace(from_file=str(path), n_samples=2, prompt=None)
    try:
        batches = read_batches(opt)
    except UsageError as e:
        assert len(str(e).splitlines()) == 1
        return
    lines = content.decode("utf-8").splitlines()
    assert [p for b in batches for p in b] == lines and all(1 <= len(b) <= 2 for b in batches)
