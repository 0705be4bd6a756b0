"""scripts/benchmark.py on the tiny config: every row measured, and ours and diffusers computing the same thing."""

from __future__ import annotations

import importlib.util
import re
import sys

import pytest

from .conftest import REPO, TINY_CONFIG


def load_benchmark(monkeypatch):
    spec = importlib.util.spec_from_file_location("ldm_benchmark_script", REPO / "scripts" / "benchmark.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def table_rows(text: str) -> dict[tuple[str, str], list[str]]:
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| fp32 |") or line.startswith("| bf16 |"):
            rows[(cells[0], cells[1])] = cells[2:]
    return rows


def number(cell: str) -> float:
    return float(re.match(r"[-+0-9.e]+", cell).group(0))


@pytest.mark.filterwarnings("ignore")
def test_tiny_run_against_diffusers(capsys, monkeypatch):
    pytest.importorskip("diffusers")
    bench = load_benchmark(monkeypatch)
    argv = ["--config", str(TINY_CONFIG), "--sizes", "64", "--precisions", "fp32,bf16", "--repeats", "1"]
    assert bench.main([*argv, "--rows", "text,unet,vae,reuse,tome", "--vs", "diffusers", "--threads", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    names = {
        "text encode (batch 2)",
        "UNet 64x64, guidance (batch 2)",
        "UNet 64x64, shallow call of --deepcache (batch 2)",
        "UNet 64x64, guidance, --tome 0.5 (batch 2)",
        "VAE decode 64x64 (batch 1)",
        "whole image 64x64, 20 steps (sum of the rows above)",
    }
    assert {what for _, what in rows} == names
    for (precision, what), cells in rows.items():
        assert number(cells[0]) > 0, (precision, what)  # ours was timed
        if "--deepcache" not in what and "--tome" not in what:
            assert number(cells[1]) > 0, (precision, what)  # and diffusers beside it
    # The same weights and inputs in both libraries: float32 outputs agree to rounding, the UNet's bit for bit.
    for what, tol in (("text encode (batch 2)", 1e-5), ("UNet 64x64, guidance (batch 2)", 0.0),
                      ("VAE decode 64x64 (batch 1)", 1e-5)):  # fmt: skip
        assert number(rows[("fp32", what)][3]) <= tol, what
    # bf16 really ran in 16 bits (an error against float32), and stays close.
    ours_err = number(rows[("bf16", "UNet 64x64, guidance (batch 2)")][4].split("/")[0])
    assert 1e-4 < ours_err < 5e-2


@pytest.mark.filterwarnings("ignore")
def test_compile_compiles_both_unets_in_one_mode(capsys, monkeypatch):
    """--compile MODE reaches ours (through the runtime policy's compile_unet) and diffusers' UNet alike, and
    nothing else; the real compiled path is tests/test_compile.py's, so compiling is recorded here, not run."""
    pytest.importorskip("diffusers")
    import torch

    bench = load_benchmark(monkeypatch)
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compiled.append((type(self).__name__, kw)))
    argv = ["--config", str(TINY_CONFIG), "--sizes", "64", "--precisions", "fp32", "--repeats", "1", "--threads", "1"]
    assert bench.main([*argv, "--rows", "unet", "--vs", "diffusers", "--compile", "max-autotune"]) == 0
    out = capsys.readouterr().out
    assert sorted(compiled) == [
        ("UNet2DConditionModel", {"mode": "max-autotune"}),
        ("UNetModel", {"mode": "max-autotune"}),
    ]
    assert re.search(r"UNet compiled with torch.compile, mode max-autotune( \(inductor freezing on\))?, both", out)
    assert re.search(r"first call, compiling included: ours [0-9.]+ s, diffusers [0-9.]+ s", out)

    compiled.clear()
    assert bench.main([*argv, "--rows", "unet", "--compile"]) == 0
    assert compiled == [("UNetModel", {"mode": "default"})]
    compiled.clear()
    assert bench.main([*argv, "--rows", "unet", "--vs", "diffusers", "--compile", "--compile_side", "theirs"]) == 0
    assert compiled == [("UNet2DConditionModel", {"mode": "default"})]
    assert "diffusers' only (ours eager)" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # the ours-only rows change the UNet between calls
        bench.parse_args([*argv, "--rows", "unet,reuse", "--compile"])
    assert "leave them out" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # nothing of diffusers' to compile
        bench.parse_args([*argv, "--rows", "unet", "--compile", "--compile_side", "theirs"])
    assert "add --vs diffusers" in capsys.readouterr().err


def test_cuda_script_runs_three_stages_and_survives_a_failure(tmp_path):
    """scripts/benchmark_cuda.sh with a stand-in interpreter: eager, then both compile modes, the caller's flags
    after the script's (so they win in argparse), and a stage that fails leaves the next ones running."""
    import os
    import stat
    import subprocess

    fake = tmp_path / "fake-python"
    fake.write_text(
        "#!/bin/sh\n"
        'echo "$@" >> "$CALLS"\n'
        'case "$*" in *reduce-overhead*) echo "broke" >&2; exit 3;; esac\n'
        'echo "| fp16 | UNet 512x512, guidance (batch 2) | 0.020 | 0.025 | 0.80 |"\n'
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake), "CALLS": str(calls)}
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "benchmark_cuda.sh"), "out", "--repeats", "3"],  # relative to the cwd
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1  # one stage failed
    lines = calls.read_text().splitlines()
    assert len(lines) == 3
    for line in lines:
        assert line.startswith("scripts/benchmark.py --device cuda --precisions fp16 --sizes 512 --vs diffusers")
        assert line.endswith("--repeats 3")  # the caller's flag comes last
    assert "--compile" not in lines[0] and "--rows text,unet,vae" in lines[0]
    assert "--compile reduce-overhead" in lines[1] and "--compile max-autotune" in lines[2]
    assert "failed (exit 3" in proc.stdout and "broke" in proc.stdout
    assert "0.80" in (out / "compiled-max-autotune.md").read_text()  # the stage after the failure ran


def test_whole_image_recipes_side_by_side(monkeypatch, capsys):
    """scripts/benchmark_image.py: every recipe times a whole image on the same model with the LoRA merged, and the
    LCM recipes really run 4 single-batch UNet calls (the 20-step recipe's guidance doubles its batch)."""
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    spec = importlib.util.spec_from_file_location("ldm_benchmark_image", REPO / "scripts" / "benchmark_image.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    calls = []
    generate = module.generate

    def counting_generate(model, *a, **kw):
        inner = model.apply_model
        model.apply_model = lambda x, t, c: calls.append(x.shape[0]) or inner(x, t, c)
        try:
            yield from generate(model, *a, **kw)  # generate yields its batches
        finally:
            del model.apply_model

    monkeypatch.setattr(module, "generate", counting_generate)
    argv = ["--config", str(TINY_CONFIG), "--size", "64", "--precision", "full", "--lora_rank", "4", "--threads", "1"]
    assert module.main(argv) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] in module.RECIPES:
            rows[cells[0]] = cells
    assert set(rows) == {"recommended", "lcm-taesd", "lcm-vae"}
    assert rows["recommended"][3] == "1.00" and all(number(r[2]) > 0 and "GiB" in r[4] for r in rows.values())
    assert calls[-8:] == [1] * 8 and 2 in calls[:-8]  # lcm-taesd and lcm-vae: 4 calls of batch 1 each
