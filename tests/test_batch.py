"""`ldm-batch` without Ray: prompt files of every format become rows with fixed seeds, bad input is one line naming
the row and field (exit 2), each image equals the library's for its row, and a run killed part-way resumes to every
row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.batch.manifest import Output, image_name
from ldm.batch.rows import read_rows
from ldm.batch.run import main
from ldm.generation.pipeline import Pipeline

from .conftest import REPO

DIGITS = str(REPO / "configs" / "demo" / "digits.yaml")
DEFAULTS = {"negative_prompt": "", "W": 32, "H": 32, "sampler": "dpmpp_2m", "steps": 4, "scale": 3.0}
ENV = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def manifest(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


def test_text_jsonl_and_csv_rows_get_their_own_settings_and_fixed_seeds(tmp_path):
    text = tmp_path / "p.txt"
    text.write_text("a handwritten digit 1\na handwritten digit 2\ta handwritten digit 7\n\n")
    rows = read_rows(str(text), DEFAULTS, base_seed=100, factor=4)
    assert [(r.prompt, r.negative_prompt, r.seed) for r in rows] == [
        ("a handwritten digit 1", "", 100), ("a handwritten digit 2", "a handwritten digit 7", 101)]  # fmt: skip
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "3", "seed": 7, "width": 16, "steps": 9}\n\n"a handwritten digit 4"\n')
    a, b = read_rows(str(jsonl), DEFAULTS, base_seed=100, factor=4)
    assert (a.seed, a.W, a.H, a.steps, a.sampler) == (7, 16, 32, 9, "dpmpp_2m")
    assert (b.prompt, b.seed) == ("a handwritten digit 4", 101)  # base seed + row index, not + explicit count
    csv = tmp_path / "p.csv"
    csv.write_text('prompt,seed,H,sampler,scale\n"a, digit 5",,8,euler,1.5\nsix,3,,,\n')
    c, d = read_rows(str(csv), DEFAULTS, base_seed=0, factor=4)
    assert (c.prompt, c.seed, c.H, c.sampler, c.scale) == ("a, digit 5", 0, 8, "euler", 1.5)
    assert (d.seed, d.H, d.sampler, d.scale) == (3, 32, "dpmpp_2m", 3.0)


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("p.csv", "prompt,seed\nok,1\nbad,x\n", "p.csv line 3: field 'seed' is 'x', not an integer"),
        ("p.csv", "text\nhello\n", "no 'prompt' column"),
        ("p.csv", "prompt,seed\na,1,2\n", "p.csv line 2: more cells"),
        ("p.jsonl", '{"prompt": "a"}\n{"prompt": "b", "colour": 1}\n', "p.jsonl line 2: unknown field 'colour'"),
        ("p.jsonl", '{"prompt": "a"\n', "p.jsonl line 1: not JSON"),
        ("p.jsonl", '{"seed": 1}\n', "p.jsonl line 1: no 'prompt'"),
        ("p.jsonl", '{"prompt": "a", "W": 30}\n', "W is 30; it must be a positive multiple of 4"),
        ("p.jsonl", '{"prompt": "a", "sampler": "nope"}\n', "unknown sampler 'nope'"),
        ("missing.txt", None, "cannot read --from-file"),
    ],
)
def test_bad_input_is_one_line_naming_the_row_and_field(tmp_path, capsys, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    code = main(["--config", DIGITS, "--from-file", str(path), "--outdir", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_each_image_is_the_library_image_for_its_row(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a handwritten digit 3"}\n{"prompt": "a handwritten digit 8", "seed": 5, '
                       '"sampler": "euler_a", "negative_prompt": "a handwritten digit 0"}\n')  # fmt: skip
    out = tmp_path / "out"
    assert main(["--config", DIGITS, "--from-file", str(prompts), "--outdir", str(out), "--n_samples", "2",
                 "--ddim_steps", "4", "--seed", "11", "--quiet"]) == 0  # fmt: skip
    lines = manifest(out)
    assert [(x["row"], x["index"], x["seed"]) for x in lines] == [(0, 0, 11), (0, 1, 11), (1, 0, 5), (1, 1, 5)]
    pipe = Pipeline.from_config(DIGITS)
    expected = [pipe.txt2img("a handwritten digit 3", n=2, seed=11, steps=4),
                pipe.txt2img("a handwritten digit 8", n=2, seed=5, steps=4, sampler="euler_a",
                             negative_prompt="a handwritten digit 0")]  # fmt: skip
    for x in lines:
        assert x["file"] == image_name(x["row"], x["index"]) and x["worker"].endswith(f":{os.getpid()}")
        assert np.array_equal(pixels(out / x["file"]), np.asarray(expected[x["row"]][x["index"]]))
    with Image.open(out / lines[3]["file"]) as im:
        assert "Negative prompt: a handwritten digit 0" in im.text["parameters"]
        assert "Seed: 5" in im.text["parameters"] and "Sampler: euler_a" in im.text["parameters"]


def test_resume_keeps_complete_rows_once_and_redoes_partial_ones(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    rows = read_rows(str(prompts), DEFAULTS, base_seed=0, factor=4)
    out = Output(tmp_path / "out", n_samples=2)
    assert out.resume(rows) == rows
    for row, index in ((0, 0), (0, 1), (1, 0), (0, 1)):  # row 0 complete (a line twice), row 1 half done
        out.add({"row": row, "index": index, "seed": rows[row].seed, "png": b"png", "params": rows[row].params()})
    out.close()
    with open(out.manifest, "a") as fh:
        fh.write('{"row": 2, "index": 0, "se')  # a line cut short by a kill
    assert [r.row for r in Output(out.dir, 2).resume(rows)] == [1, 2]
    assert [(x["row"], x["index"]) for x in manifest(out.dir)] == [(0, 0), (0, 1)]
    changed = read_rows(str(prompts), {**DEFAULTS, "steps": 5}, base_seed=0, factor=4)
    assert len(Output(out.dir, 2).resume(changed)) == 3  # other settings: nothing counts as done
    (out.dir / image_name(0, 0)).unlink()
    assert [r.row for r in Output(out.dir, 2).resume(rows)] == [0, 1, 2]  # a missing file: the row is redone


def run_args(prompts: Path, out: Path) -> list[str]:
    return ["--config", DIGITS, "--from-file", str(prompts), "--outdir", str(out), "--n_samples", "2",
            "--ddim_steps", "8", "--threads", "1", "--quiet"]  # fmt: skip


def test_a_run_killed_part_way_resumes_to_every_row_exactly_once(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a handwritten digit {i % 10}\n" for i in range(12)))
    out = tmp_path / "out"
    argv = [sys.executable, str(REPO / "scripts" / "batch.py"), *run_args(prompts, out)]
    proc = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not ((out / "manifest.jsonl").exists() and len((out / "manifest.jsonl").read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < end, proc.stderr.read()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    killed_at = len(manifest(out))
    assert 3 <= killed_at < 24, killed_at  # it really stopped part-way
    done = subprocess.run(argv, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Resuming:" in done.stdout
    lines = manifest(out)
    keys = [(x["row"], x["index"]) for x in lines]
    assert sorted(keys) == [(r, i) for r in range(12) for i in range(2)]  # every image once, none missing
    assert len(set(x["worker"] for x in lines)) == 2  # rows of both runs are in it: the first run's were kept
    reference = tmp_path / "ref"
    assert main(run_args(prompts, reference)) == 0  # the same rows, uninterrupted, in this process
    for x in lines:
        assert np.array_equal(pixels(out / x["file"]), pixels(reference / x["file"])), x
    assert sorted(p.name for p in (out / "samples").iterdir()) == sorted(Path(x["file"]).name for x in lines)
