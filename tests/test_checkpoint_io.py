"""Tests for ldm.files.checkpoints: reading checkpoints without running pickle code from them."""

from __future__ import annotations

import builtins
import io
import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm.files.checkpoints import CheckpointError, is_safetensors, read_state_dict

REPO_ROOT = Path(__file__).resolve().parents[1]
LIGHTNING_MC = "pytorch_lightning.callbacks.model_checkpoint"


def small_state_dict(dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3, generator=g).to(dtype),
        "model.diffusion_model.input_blocks.0.0.bias": torch.randn(4, generator=g).to(dtype),
        "first_stage_model.encoder.norm_out.weight": torch.randn(8, generator=g).to(dtype),
        "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
        "model_ema.num_updates": torch.tensor(470000, dtype=torch.int32),
    }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def assert_one_line_error(path, match: str | None = None, **kw) -> CheckpointError:
    with pytest.raises(CheckpointError) as exc:
        read_state_dict(path, **kw)
    msg = str(exc.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    if match is not None:
        assert match in msg, msg
    return exc.value


def save_lightning_pickle(obj_factory, path: Path) -> None:
    """torch.save a checkpoint whose pickle names pytorch_lightning's ModelCheckpoint class,
    without importing pytorch_lightning: fake modules live in sys.modules only while saving."""
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", LIGHTNING_MC]
    saved = {n: sys.modules.get(n) for n in names}
    try:
        for n in names:
            m = types.ModuleType(n)
            m.__path__ = []
            sys.modules[n] = m
        cls = type("ModelCheckpoint", (), {"__module__": LIGHTNING_MC})
        sys.modules[LIGHTNING_MC].ModelCheckpoint = cls
        torch.save(obj_factory(cls), path)
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m


def lightning_ckpt(cls, sd):
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": sd,
        "callbacks": {
            cls: {
                "monitor": None,
                "best_model_score": np.float64(0.125),
                "best_model_path": "",
                "current_score": np.float32(0.5),
                "dirpath": "logs/checkpoints",
            }
        },
        "loops": {"steps": np.int64(12), "batches": np.int32(3), "lr": np.float64(1e-4)},
    }


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mmap", [True, False])
def test_lightning_layout_ckpt_round_trip(tmp_path, dtype, mmap):
    sd = small_state_dict(dtype)
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd, "global_step": 470000}, path)
    before = set(torch.serialization.get_safe_globals())  # torch itself registers some at import
    out, info = read_state_dict(path, mmap=mmap)
    assert_same(out, sd)
    assert info["format"] == "ckpt"
    assert info["global_step"] == 470000
    name = str(dtype).removeprefix("torch.")
    assert info["dtype_counts"] == {name: 3, "int64": 1, "int32": 1}
    assert set(torch.serialization.get_safe_globals()) == before  # our allow-list is scoped to the call


def test_flat_dict_and_legacy_format(tmp_path):
    sd = small_state_dict()
    flat = tmp_path / "flat.pt"
    torch.save(sd, flat)
    out, info = read_state_dict(flat)
    assert_same(out, sd)
    assert info["global_step"] is None and info["format"] == "ckpt"

    legacy = tmp_path / "legacy.ckpt"  # pre-1.6 non-zip format: cannot be mmapped, must still load
    torch.save({"state_dict": sd, "global_step": 7}, legacy, _use_new_zipfile_serialization=False)
    out, info = read_state_dict(legacy, mmap=True)
    assert_same(out, sd)
    assert info["global_step"] == 7


def test_non_tensor_values_dropped(tmp_path):
    sd = dict(small_state_dict())
    sd["some_note"] = "hello"
    sd["a_number"] = 3
    path = tmp_path / "m.ckpt"
    torch.save({"state_dict": sd}, path)
    out, info = read_state_dict(path)
    assert "some_note" not in out and "a_number" not in out
    assert sorted(info["dropped_keys"]) == ["a_number", "some_note"]
    assert len(out) == 5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mmap", [True, False])
def test_safetensors_round_trip(tmp_path, dtype, mmap):
    sd = small_state_dict(dtype)
    path = tmp_path / "model.safetensors"
    save_file(sd, str(path), metadata={"format": "pt"})
    assert is_safetensors(path)
    out, info = read_state_dict(path, mmap=mmap)
    assert_same(dict(sorted(out.items())), dict(sorted(sd.items())))
    assert info["format"] == "safetensors"
    assert info["global_step"] is None
    assert info["metadata"] == {"format": "pt"}
    assert info["dtype_counts"][str(dtype).removeprefix("torch.")] == 3


def test_format_decided_by_content(tmp_path):
    sd = small_state_dict()
    st = tmp_path / "really_safetensors.ckpt"
    save_file(sd, str(st))
    assert is_safetensors(st)
    assert read_state_dict(st)[1]["format"] == "safetensors"
    # a pickle posing as .safetensors is not silently unpickled: the user expects a pickle-free file
    ck = tmp_path / "really_ckpt.safetensors"
    torch.save({"state_dict": sd}, ck)
    assert not is_safetensors(ck)
    assert_one_line_error(ck, match="rename it to .ckpt")
    renamed = ck.rename(tmp_path / "really_ckpt.ckpt")
    assert read_state_dict(renamed)[1]["format"] == "ckpt"
    assert is_safetensors(tmp_path / "missing.safetensors")
    assert not is_safetensors(tmp_path / "missing.ckpt")


# --------------------------------------------------------------------------- Lightning pickle


def test_lightning_pickle_with_numpy_scalars_loads(tmp_path):
    sd = small_state_dict()
    path = tmp_path / "lightning.ckpt"
    before = sys.modules.get("pytorch_lightning")
    save_lightning_pickle(lambda cls: lightning_ckpt(cls, sd), path)
    assert sys.modules.get("pytorch_lightning") is before  # the stand-in modules are gone again
    # plain weights_only loading really does refuse this file: the allow-list is needed
    with pytest.raises(Exception, match="pytorch_lightning"):
        torch.load(path, weights_only=True)
    out, info = read_state_dict(path)
    assert_same(out, sd)
    assert info["global_step"] == 470000 and info["epoch"] == 6
    assert info["lightning_version"] == "1.4.2"


def test_numpy1_scalar_spelling_loads(tmp_path):
    """numpy 1.x writers (the 2022 SD checkpoints) name the scalar global numpy.core.multiarray.scalar.

    A pickle's GLOBAL opcode is newline-terminated text, and the legacy (non-zip) format has no
    offsets, so the numpy 2.x spelling can be swapped for the 1.x one byte-for-byte."""
    buf = io.BytesIO()
    torch.save(
        {"state_dict": small_state_dict(), "global_step": np.int64(5), "score": np.float64(0.25)},
        buf,
        _use_new_zipfile_serialization=False,
    )
    new, old = b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar"
    data = buf.getvalue()
    assert data.count(new) == 1  # memoized: one GLOBAL serves both scalars
    path = tmp_path / "np1.ckpt"
    path.write_bytes(data.replace(new, old))
    out, info = read_state_dict(path)
    assert_same(out, small_state_dict())
    assert info["global_step"] == 5


def test_numpy_scalar_outside_allow_list_refused(tmp_path):
    """Only the dtype classes real checkpoints need are allowed; others are named in the error."""
    path = tmp_path / "npbool.ckpt"
    torch.save({"state_dict": small_state_dict(), "flag": np.bool_(True)}, path)
    assert_one_line_error(path, match="numpy.dtypes.BoolDType")


def test_lightning_pickle_does_not_import_pytorch_lightning(tmp_path):
    """In a fresh interpreter so no other test (or plugin) can have imported it already."""
    path = tmp_path / "lightning.ckpt"
    save_lightning_pickle(lambda cls: lightning_ckpt(cls, small_state_dict()), path)
    code = textwrap.dedent(
        f"""
        import sys
        from ldm.files.checkpoints import read_state_dict
        sd, info = read_state_dict({str(path)!r})
        assert len(sd) == 5 and info["global_step"] == 470000, info
        bad = sorted(m for m in sys.modules if m.split(".")[0] == "pytorch_lightning")
        assert not bad, bad
        print("OK")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stdout + res.stderr


def test_stand_in_cannot_be_instantiated(tmp_path):
    """The ModelCheckpoint stand-in is only usable as a key; a pickle cannot construct it."""

    class Instantiate:
        def __reduce__(self):
            return (sys.modules[LIGHTNING_MC].ModelCheckpoint, ())

    path = tmp_path / "inst.ckpt"
    save_lightning_pickle(lambda cls: {"state_dict": small_state_dict(), "x": Instantiate()}, path)
    assert_one_line_error(path)


# --------------------------------------------------------------------------- malicious pickles


class _SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _ExecPayload(_SystemPayload):
    def __reduce__(self):
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


class _OpenPayload(_SystemPayload):
    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


@pytest.mark.parametrize(
    "payload, expected",
    [(_SystemPayload, f"{os.system.__module__}.system"), (_ExecPayload, "builtins.exec"), (_OpenPayload, "io.open")],
)
@pytest.mark.parametrize("where", ["top", "inside_state_dict"])
def test_malicious_pickle_refused(tmp_path, payload, expected, where):
    marker = tmp_path / "MARKER"
    evil = payload(marker)
    sd = dict(small_state_dict())
    if where == "top":
        obj = {"state_dict": sd, "global_step": 1, "evil": evil}
    else:
        sd["model.evil"] = evil
        obj = {"state_dict": sd}
    path = tmp_path / "model.ckpt"
    torch.save(obj, path)
    assert not marker.exists()
    err = assert_one_line_error(path, match=expected)
    assert "refusing to load" in str(err) and ".safetensors" in str(err)
    assert not marker.exists()


def test_malicious_legacy_pickle_refused(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "legacy.pt"
    torch.save(
        {"state_dict": small_state_dict(), "evil": _SystemPayload(marker)}, path, _use_new_zipfile_serialization=False
    )
    assert_one_line_error(path, match="system")
    assert not marker.exists()


# --------------------------------------------------------------------------- broken files


def test_missing_path(tmp_path):
    path = tmp_path / "nope" / "model.ckpt"
    err = assert_one_line_error(path, match=str(path))
    assert "--ckpt" in str(err) and "models/ldm/stable-diffusion-v1/model.ckpt" in str(err)


def test_directory(tmp_path):
    assert_one_line_error(tmp_path, match="directory")


def test_empty_file(tmp_path):
    for name in ["empty.ckpt", "empty.safetensors", "empty.bin"]:
        path = tmp_path / name
        path.write_bytes(b"")
        assert_one_line_error(path, match="empty")


@pytest.mark.parametrize("mmap", [True, False])
def test_truncated_ckpt(tmp_path, mmap):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": small_state_dict(), "global_step": 1}, good)
    data = good.read_bytes()
    for frac in (0.5, 0.9):
        bad = tmp_path / f"trunc{frac}.ckpt"
        bad.write_bytes(data[: int(len(data) * frac)])
        assert_one_line_error(bad, match="truncated or corrupt", mmap=mmap)


def test_truncated_safetensors(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file(small_state_dict(), str(good))
    data = good.read_bytes()
    bad = tmp_path / "trunc.safetensors"
    bad.write_bytes(data[: len(data) - 16])  # header intact, tensor data cut short
    assert_one_line_error(bad, match="truncated or corrupt")


@pytest.mark.parametrize("name", ["random.ckpt", "random.safetensors", "random.pt", "random.weights"])
def test_random_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    assert_one_line_error(path)


def test_legacy_pickle_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([torch.zeros(2)], path)
    assert_one_line_error(path, match="not a state dict")
    path = tmp_path / "nested.ckpt"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    assert_one_line_error(path, match="no 'state_dict'")
    path = tmp_path / "bad_sd.ckpt"
    torch.save({"state_dict": [torch.zeros(2)]}, path)
    assert_one_line_error(path, match="'state_dict'")


def test_safetensors_header_larger_than_file(tmp_path):
    path = tmp_path / "liar.safetensors"
    path.write_bytes((10_000).to_bytes(8, "little") + b'{"a": 1}' + b" " * 100)
    assert_one_line_error(path, match="header claims 10000 bytes")
    path.write_bytes((2**63).to_bytes(8, "little") + b"{}")
    assert_one_line_error(path, match="header claims")


def test_safetensors_garbage_json(tmp_path):
    path = tmp_path / "garbage.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]'  # unterminated
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    assert_one_line_error(path, match="not valid JSON")
    header = b"\xff\xfe not json at all"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    assert_one_line_error(path, match="not valid JSON")


def test_safetensors_bad_offsets(tmp_path):
    """Valid JSON that safetensors itself rejects still becomes a CheckpointError."""
    path = tmp_path / "offsets.safetensors"
    header = b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}'
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 8)
    assert_one_line_error(path, match="truncated or corrupt")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root can read any file")
def test_unreadable_file(tmp_path):
    path = tmp_path / "locked.ckpt"
    torch.save({"state_dict": small_state_dict()}, path)
    path.chmod(0)
    try:
        assert_one_line_error(path, match="permission denied")
    finally:
        path.chmod(0o644)


def test_unreadable_file_simulated(tmp_path, monkeypatch):
    """Same as above but also runs as root: the open() itself fails with EACCES."""
    import ldm.files.checkpoints as cio

    path = tmp_path / "locked.ckpt"
    torch.save({"state_dict": small_state_dict()}, path)

    def deny(p, n):
        raise PermissionError(13, "Permission denied", str(p))

    monkeypatch.setattr(cio, "_read_head", deny)
    assert_one_line_error(path, match="permission denied")
