"""Tests for ldm.files.convert / scripts/convert_ckpt.py (checkpoint -> safetensors) and prefer_safetensors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ldm.files.checkpoints import CheckpointError, prefer_safetensors, read_state_dict
from ldm.files.convert import convert_checkpoint
from ldm.generation.load import load_model
from ldm.speed.runtime import Runtime

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "convert_ckpt.py"
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
UNET_W = "model.diffusion_model.input_blocks.0.0.weight"
UNET_B = "model.diffusion_model.input_blocks.0.0.bias"
UNET_OUT = "model.diffusion_model.out.2.weight"  # no EMA twin in the EMA fixture


def source_state_dict() -> dict[str, torch.Tensor]:
    """Small tensors in SD key layout, including the awkward cases a real .ckpt can hold: a view sharing
    storage with another saved tensor, a non-contiguous tensor, integer and bool tensors."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=g)
    return {
        UNET_W: torch.randn(4, 4, 3, 3, generator=g),
        UNET_B: torch.randn(4, generator=g),
        UNET_OUT: torch.randn(4, 4, generator=g),
        "first_stage_model.encoder.conv_in.weight": base,
        "first_stage_model.encoder.conv_in.bias": base[1],  # shares base's storage
        "first_stage_model.decoder.conv_out.weight": torch.randn(5, 3, generator=g).t(),  # non-contiguous
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.randn(8, generator=g).double(),
        "model.some_counter": torch.tensor([3, 1, 4], dtype=torch.int64),
        "model.some_mask": torch.tensor([True, False]),
        POSITION_IDS: torch.arange(77).unsqueeze(0),
    }


def ema_state_dict() -> dict[str, torch.Tensor]:
    """source_state_dict plus LitEma copies of two UNet weights (not UNET_OUT) and LitEma's buffers."""
    sd = source_state_dict()
    sd["model_ema.diffusion_modelinput_blocks00weight"] = sd[UNET_W] + 1
    sd["model_ema.diffusion_modelinput_blocks00bias"] = sd[UNET_B] - 1
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    return sd


def save_lightning(sd: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"state_dict": sd, "global_step": 7}, path)
    return path


def expected_keys(sd: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in sd if not k.startswith("model_ema.") and k != POSITION_IDS}


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return save_lightning(source_state_dict(), tmp_path / "m.ckpt")


def test_fp32_round_trip_is_exact(src: Path, tmp_path: Path) -> None:
    summary = convert_checkpoint(src, tmp_path / "m.safetensors")
    out, info = read_state_dict(tmp_path / "m.safetensors")
    ref = source_state_dict()
    assert set(out) == expected_keys(ref)
    for k in out:
        assert out[k].dtype == ref[k].dtype and torch.equal(out[k], ref[k]), k
    assert info["format"] == "safetensors" and info["global_step"] == 7
    meta = info["metadata"]
    assert meta["format"] == "pt" and meta["source"] == "m.ckpt"
    assert (meta["converted_fp16"], meta["converted_use_ema"]) == ("false", "false")
    assert summary["tensors"] == len(out) and summary["dropped"] == 1 and summary["dropped_ema"] == 0
    assert summary["bytes"] == os.path.getsize(tmp_path / "m.safetensors") and summary["dtype"] == "float32"


def test_fp16_halves_floats_only(src: Path, tmp_path: Path) -> None:
    summary = convert_checkpoint(src, tmp_path / "h.safetensors", fp16=True)
    out, info = read_state_dict(tmp_path / "h.safetensors")
    ref = source_state_dict()
    assert set(out) == expected_keys(ref)
    for k in out:
        want = ref[k].half() if ref[k].is_floating_point() else ref[k]
        assert out[k].dtype == want.dtype and torch.equal(out[k], want), k
    assert info["metadata"]["converted_fp16"] == "true" and summary["dtype"] == "float16"


def test_fp16_refuses_values_that_would_become_inf(tmp_path: Path) -> None:
    sd = source_state_dict()
    sd[UNET_B] = torch.tensor([1.0, 1e6])
    with pytest.raises(CheckpointError, match=UNET_B):
        convert_checkpoint(save_lightning(sd, tmp_path / "big.ckpt"), tmp_path / "big.safetensors", fp16=True)
    assert not (tmp_path / "big.safetensors").exists()


def test_use_ema_takes_ema_values_for_exactly_the_twins(tmp_path: Path) -> None:
    src = save_lightning(ema_state_dict(), tmp_path / "ema.ckpt")
    summary = convert_checkpoint(src, tmp_path / "ema.safetensors", use_ema=True)
    out, info = read_state_dict(tmp_path / "ema.safetensors")
    ref = ema_state_dict()
    assert set(out) == expected_keys(ref) and not any(k.startswith("model_ema") for k in out)
    assert torch.equal(out[UNET_W], ref[UNET_W] + 1) and torch.equal(out[UNET_B], ref[UNET_B] - 1)
    for k in expected_keys(ref) - {UNET_W, UNET_B}:
        assert torch.equal(out[k], ref[k]), k
    assert summary["ema_applied"] == 2 and summary["dropped_ema"] == 4
    assert info["metadata"]["converted_use_ema"] == "true"


def test_without_use_ema_drops_ema_keys_and_keeps_model_values(tmp_path: Path) -> None:
    src = save_lightning(ema_state_dict(), tmp_path / "ema.ckpt")
    summary = convert_checkpoint(src, tmp_path / "plain.safetensors")
    out, _ = read_state_dict(tmp_path / "plain.safetensors")
    ref = ema_state_dict()
    assert set(out) == expected_keys(ref)
    assert torch.equal(out[UNET_W], ref[UNET_W]) and torch.equal(out[UNET_B], ref[UNET_B])
    assert summary["dropped_ema"] == 4 and summary["dropped"] == 5 and summary["ema_applied"] == 0


def test_use_ema_without_ema_weights_is_a_one_line_error(src: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no EMA weights") as exc:
        convert_checkpoint(src, tmp_path / "x.safetensors", use_ema=True)
    assert "\n" not in str(exc.value) and "without --use-ema" in str(exc.value)
    assert not (tmp_path / "x.safetensors").exists()


def test_ambiguous_ema_names_are_refused(tmp_path: Path) -> None:
    sd = {
        "model.diffusion_model.blocks.1.1.w": torch.zeros(2),
        "model.diffusion_model.blocks.11.w": torch.ones(2),
        "model_ema.diffusion_modelblocks11w": torch.full((2,), 5.0),
    }
    with pytest.raises(CheckpointError, match="could belong to"):
        convert_checkpoint(save_lightning(sd, tmp_path / "a.ckpt"), tmp_path / "a.safetensors", use_ema=True)


def test_refuses_to_overwrite_and_leaves_the_file_untouched(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "m.safetensors"
    dst.write_bytes(b"precious bytes")
    with pytest.raises(CheckpointError, match="already exists.*--overwrite"):
        convert_checkpoint(src, dst)
    assert dst.read_bytes() == b"precious bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt", "m.safetensors"]  # no temp file left
    convert_checkpoint(src, dst, overwrite=True)
    assert torch.equal(read_state_dict(dst)[0][UNET_W], source_state_dict()[UNET_W])


def test_refuses_source_as_destination_even_with_overwrite(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "m.safetensors"
    convert_checkpoint(src, dst)
    before = dst.read_bytes()
    with pytest.raises(CheckpointError, match="source file itself"):
        convert_checkpoint(dst, dst, overwrite=True)
    assert dst.read_bytes() == before


def test_failed_write_leaves_no_file(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_write)
    with pytest.raises(CheckpointError, match="cannot write .*No space left on device"):
        convert_checkpoint(src, tmp_path / "m.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.ckpt"]


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=120, cwd=REPO
    )


def test_cli_converts_to_default_names(src: Path, tmp_path: Path) -> None:
    r = run_cli(src)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1 and r.stdout.startswith(f"wrote {tmp_path / 'm.safetensors'}:")
    r = run_cli(src, "--fp16")
    assert r.returncode == 0, r.stderr
    assert read_state_dict(tmp_path / "m-fp16.safetensors")[0][UNET_W].dtype == torch.float16
    r = run_cli(src)  # exists now: refused, exit 2
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "--overwrite" in r.stderr


def test_cli_missing_source_is_one_line_exit_2(tmp_path: Path) -> None:
    r = run_cli(tmp_path / "nope.ckpt", tmp_path / "out.safetensors")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "nope.ckpt" in r.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_prefer_safetensors(tmp_path: Path) -> None:
    ckpt = tmp_path / "model.ckpt"
    save_lightning(source_state_dict(), ckpt)
    assert prefer_safetensors(ckpt) == str(ckpt)  # no sibling yet
    convert_checkpoint(ckpt, tmp_path / "model.safetensors")
    assert prefer_safetensors(ckpt) == str(tmp_path / "model.safetensors")
    assert prefer_safetensors(str(tmp_path / "model.pth")) == str(tmp_path / "model.safetensors")
    assert prefer_safetensors(tmp_path / "model.PT") == str(tmp_path / "model.safetensors")
    assert prefer_safetensors(tmp_path / "model.safetensors") == str(tmp_path / "model.safetensors")
    assert prefer_safetensors(tmp_path / "model.bin") == str(tmp_path / "model.bin")  # only .ckpt/.pt/.pth
    assert prefer_safetensors(tmp_path / "other.ckpt") == str(tmp_path / "other.ckpt")
    save_lightning(source_state_dict(), tmp_path / "fake.safetensors")  # a pickle in disguise is not preferred
    assert prefer_safetensors(tmp_path / "fake.ckpt") == str(tmp_path / "fake.ckpt")


def test_converted_tiny_model_gives_the_same_unet_output(tiny_config, tiny_ckpt: Path, tmp_path: Path) -> None:
    dst = tmp_path / "tiny.safetensors"
    convert_checkpoint(tiny_ckpt, dst)
    cpu = Runtime(torch.device("cpu"))
    models = [load_model(tiny_config, path, cpu, verbose=False) for path in (tiny_ckpt, dst)]
    ref, conv = (m.state_dict() for m in models)
    assert list(ref) == list(conv) and all(torch.equal(ref[k], conv[k]) for k in ref)
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 32, generator=g)
    t = torch.tensor([500])

    def unet_outputs() -> list[torch.Tensor]:
        with torch.no_grad():
            return [m.model.diffusion_model(x, t, context=ctx) for m in models]

    a, b = unet_outputs()
    assert a.abs().sum() > 0
    # The loader copies weights that a memory-mapped .safetensors file leaves unaligned, so the file format
    # does not change a single bit of the output.
    assert torch.equal(a, b)
