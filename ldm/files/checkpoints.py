"""Read Stable Diffusion v1 checkpoint files into a flat state dict, safely.

Checkpoints come from the internet, and a ``.ckpt`` is a pickle: unpickling one
with plain ``pickle``/``torch.load(weights_only=False)`` runs whatever code its
author put in it.  This module therefore never runs pickle code from a file:

* ``.safetensors`` files are read with the ``safetensors`` package (no pickle at
  all) after checking that the header length is sane;
* ``.ckpt``/``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``,
  whose restricted unpickler only rebuilds tensors and plain containers, widened
  by the smallest allow-list that real SD v1 (PyTorch Lightning) checkpoints
  need (see :func:`_allow_list`).  Everything else is refused with a
  :class:`CheckpointError` naming the offending global.

Every failure (missing file, directory, truncated or corrupt file, refused
pickle) is reported as a one-line :class:`CheckpointError` that the CLI prints
as-is.
"""

from __future__ import annotations

import json
import numbers
import os
import pickle
import re
import struct
from collections import Counter
from typing import Any

import torch

__all__ = ["CheckpointError", "read_state_dict", "read_torch_object", "is_safetensors"]

DEFAULT_CKPT_HINT = "models/ldm/stable-diffusion-v1/model.ckpt"
"""Where the original SD v1 repository expects the weights; named in 'not found' errors."""

_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
_ZIP_MAGIC = b"PK\x03\x04"
_TORCH_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_GET_FIX = "get a .safetensors version of this model"


class CheckpointError(Exception):
    """A checkpoint could not be read; the message is one line naming the problem and the fix.

    The CLI prints it verbatim instead of a traceback, so it must stay short and actionable.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


def _one_line(text: str, limit: int | None = None) -> str:
    """Collapse whitespace (torch error texts span several lines) so messages print as one line."""
    text = re.sub(r"\s+", " ", str(text)).strip()
    if limit is not None and len(text) > limit:
        text = text[: limit - 3].rstrip() + "..."
    return text


# --------------------------------------------------------------------------- allow-list


class _LightningModelCheckpointKey:
    """Inert stand-in for ``pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint``.

    The released SD v1 ``.ckpt`` files store ``checkpoint["callbacks"]`` as a dict keyed
    by that *class object*; the unpickler must resolve the name to something hashable.
    We never need the real class (and must not import pytorch_lightning, a heavy
    dependency whose import runs a lot of code), so this placeholder stands in for it.
    It cannot be instantiated, so a pickle cannot use it for anything but a key.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> _LightningModelCheckpointKey:
        raise TypeError("the ModelCheckpoint stand-in is only a dict key and cannot be instantiated")


def _allow_list() -> list[Any]:
    """Globals, beyond torch's own weights-only defaults, that SD v1 ``.ckpt`` files need.

    * the ModelCheckpoint stand-in, under the dotted name Lightning pickles it with
      (used as a dict key in ``checkpoint["callbacks"]``);
    * ``numpy.<core>.multiarray.scalar`` under both spellings (``numpy.core`` written by
      numpy 1.x, ``numpy._core`` by numpy 2.x): how numpy scalars such as
      ``np.float64(0.5)`` pickle -- Lightning callback/loop state holds them;
    * ``numpy.dtype``: ``scalar()`` takes a dtype, pickled as ``numpy.dtype('f8', False, True)``;
    * the dtype classes of float64/float32/int64/int32: the dtype instance then gets its
      state via BUILD, which torch only allows when ``type(instance)`` is allow-listed
      (e.g. ``numpy.dtypes.Float64DType``); these four cover the scalars Python floats,
      ints and float32 metrics turn into.
    """
    allowed: list[Any] = [
        (_LightningModelCheckpointKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    ]
    try:
        import numpy as np
    except ImportError:  # numpy is optional for torch; without it numpy scalars are simply refused
        return allowed
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    allowed += [
        (scalar, "numpy._core.multiarray.scalar"),
        (scalar, "numpy.core.multiarray.scalar"),
        (np.dtype, "numpy.dtype"),
    ]
    # type(np.dtype(...)) is numpy.dtypes.Float64DType etc. on numpy >= 1.25, and the
    # equivalent (unnamed) per-dtype class on older versions; BUILD checks it by identity.
    allowed += [type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32")]
    return allowed


# --------------------------------------------------------------------------- sniffing


def _read_head(path: str, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _sniff(head: bytes) -> str | None:
    """Container kind from the first bytes: 'zip' (torch >= 1.6), 'pickle' (legacy torch.save), 'safetensors'."""
    if head.startswith(_ZIP_MAGIC):
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":  # pickle PROTO opcode, how legacy torch.save files start
        return "pickle"
    return None


def is_safetensors(path: str | os.PathLike) -> bool:
    """True if ``path`` is (or, when unreadable, is named like) a safetensors file.

    Decided by content first (8-byte little-endian header length followed by a JSON
    object) so renamed files are handled, falling back to the extension.
    """
    path = os.fspath(path)
    try:
        kind = _sniff(_read_head(path, 9))
    except OSError:
        kind = None
    if kind is not None:
        return kind == "safetensors"
    return path.lower().endswith(".safetensors")


# --------------------------------------------------------------------------- public API


def read_state_dict(path: str | os.PathLike, *, mmap: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Read an SD checkpoint into ``(flat state dict, info)`` without running pickle code from it.

    ``mmap=True`` maps the file instead of reading it (fast start, low RAM) where the
    format supports it (safetensors and zip-based ``.ckpt``; legacy pickles are read).

    ``info`` holds ``format`` ("ckpt" | "safetensors"), ``global_step`` (int or None),
    ``dtype_counts`` (e.g. ``{"float32": 1142}``), ``num_tensors``, ``dropped_keys``
    (non-tensor entries left out of the state dict) and, for safetensors, ``metadata``.

    Raises :class:`CheckpointError` (one-line message) for every failure.
    """
    path = os.fspath(path)
    head = _check_file(path)
    kind = _sniff(head)
    if kind == "safetensors" or (kind is None and path.lower().endswith(".safetensors")):
        sd, info = _read_safetensors(path, mmap=mmap)
    elif kind in ("zip", "pickle") and path.lower().endswith(".safetensors"):
        # torch.load would hand this name to safetensors anyway; and whoever picked a .safetensors
        # file expects no pickle in it, so do not quietly unpickle one
        raise CheckpointError(
            f"refusing to load {path}: it is named .safetensors but holds a PyTorch pickle checkpoint; "
            f"rename it to .ckpt to load it as one (tensors only) or get a real .safetensors file"
        )
    elif kind in ("zip", "pickle") or path.lower().endswith(_TORCH_SUFFIXES):
        # mmap needs the zip container; legacy (pre-1.6) pickles are read into memory
        sd, info = _read_torch(path, mmap=mmap and kind == "zip", is_zip=kind == "zip")
    else:
        raise CheckpointError(
            f"cannot read {path}: not a recognized checkpoint (expected a .ckpt/.pt torch file or a "
            f".safetensors file); check that the download finished and is the model file itself"
        )
    info["dtype_counts"] = dict(Counter(str(t.dtype).removeprefix("torch.") for t in sd.values()).most_common())
    info["num_tensors"] = len(sd)
    return sd, info


def _check_file(path: str) -> bytes:
    """Turn every 'cannot even open it' case into a CheckpointError; return the first bytes."""
    if not os.path.exists(path):
        raise CheckpointError(
            f"checkpoint not found: {path}; download the SD v1 weights (e.g. sd-v1-4.ckpt) and put them at "
            f"{DEFAULT_CKPT_HINT}, or pass --ckpt /path/to/model.ckpt"
        )
    if os.path.isdir(path):
        raise CheckpointError(
            f"checkpoint path is a directory: {path}; pass the model file inside it (e.g. --ckpt {path}/model.ckpt)"
        )
    try:
        size = os.path.getsize(path)
        head = _read_head(path, 16)
    except PermissionError:
        raise CheckpointError(f"cannot read {path}: permission denied; fix the file permissions") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {_one_line(e.strerror or e, 200)}") from None
    if size == 0:
        raise CheckpointError(f"checkpoint file is empty (0 bytes): {path}; the download failed, download it again")
    return head


def _corrupt(path: str, reason: object) -> CheckpointError:
    return CheckpointError(
        f"cannot read {path}: the file is truncated or corrupt ({_one_line(reason, 200)}); download it again"
    )


# --------------------------------------------------------------------------- safetensors


def _read_safetensors(path: str, *, mmap: bool) -> tuple[dict[str, torch.Tensor], dict]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise _corrupt(path, f"safetensors file of {size} bytes has no header")
        (n,) = struct.unpack("<Q", raw)
        if n >= _MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise _corrupt(path, f"safetensors header claims {n} bytes but the file has {size}")
        header_bytes = f.read(n)
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _corrupt(path, f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "safetensors header is not a JSON object")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        metadata = {}

    try:
        import safetensors.torch
    except ImportError:
        raise CheckpointError(
            f"cannot read {path}: the 'safetensors' package is not installed; run: pip install safetensors"
        ) from None
    try:
        sd = safetensors.torch.load_file(path, device="cpu")  # tensors are views of a file mapping
        if not mmap:
            # copy into private memory, one tensor at a time: peak RAM ~1x the file
            # (safetensors.torch.load(f.read()) would hold the bytes and the tensors, ~2x)
            sd = {k: v.clone() for k, v in sd.items()}
    except Exception as e:  # SafetensorError, OSError, ...: any failure here means a bad file
        raise _corrupt(path, _reason(e)) from None

    global_step = _as_int(metadata.get("global_step"))
    info = {
        "format": "safetensors",
        "global_step": global_step,
        "epoch": _as_int(metadata.get("epoch")),
        "metadata": dict(metadata),
        "dropped_keys": [],
    }
    return dict(sd), info


# --------------------------------------------------------------------------- torch .ckpt


_GLOBAL_RE = re.compile(r"GLOBAL ([A-Za-z_][\w.]*)")
_BUILD_RE = re.compile(r"(?:but got|unrecognized function) <class '([^']+)'>")
_FUNC_RE = re.compile(r"unrecognized function (<[^>]*>|\S+)")


def _offending_global(message: str) -> str | None:
    """Name of the global torch's weights-only unpickler refused, parsed from its error text."""
    m = _GLOBAL_RE.search(message)
    if m:
        name = m.group(1).rstrip(".")
        # torch prints builtins.X as plain "X"; put the module back so users see what it is
        return name if "." in name else f"builtins.{name}"
    m = _BUILD_RE.search(message) or _FUNC_RE.search(message)
    return m.group(1) if m else None


def _short_reason(message: str) -> str:
    """The informative first sentence of a torch error (its 'Weights only load failed' text runs
    to a dozen lines of advice that, for us, would be wrong: never retry with weights_only=False)."""
    m = re.search(r"WeightsUnpickler error:(.*?)(?:Check the documentation|$)", message, re.S)
    text = _one_line(m.group(1) if m else message)
    first = re.split(r"(?<=[a-z0-9)])\. ", text, maxsplit=1)[0]
    return _one_line(first, 160)


def _reason(e: BaseException) -> str:
    text = _short_reason(str(e))
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _read_torch(path: str, *, mmap: bool, is_zip: bool) -> tuple[dict[str, torch.Tensor], dict]:
    return _extract_state_dict(path, _load_torch(path, mmap=mmap, is_zip=is_zip))


def read_torch_object(path: str | os.PathLike) -> Any:
    """What a ``.pt``/``.bin`` file holds (nested dicts of tensors, as textual-inversion files keep them), read
    with the same restricted unpickler as checkpoints: no pickle code runs; anything else is a CheckpointError."""
    path = os.fspath(path)
    kind = _sniff(_check_file(path))
    if kind not in ("zip", "pickle"):
        raise CheckpointError(f"cannot read {path}: not a PyTorch .pt/.bin file; check that it is the file itself")
    return _load_torch(path, mmap=False, is_zip=kind == "zip")


def _load_torch(path: str, *, mmap: bool, is_zip: bool) -> Any:
    try:
        with torch.serialization.safe_globals(_allow_list()):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        msg = str(e)
        name = _offending_global(msg)
        if name is not None:
            raise CheckpointError(
                f"refusing to load {path}: its pickle references {name}, which could run code; "
                f"only plain tensors are allowed ({_GET_FIX})"
            ) from None
        if is_zip and ("Unsupported operand" in msg or "Can only" in msg):
            # a well-formed torch zip whose pickle steps outside what weights_only permits
            raise CheckpointError(
                f"refusing to load {path}: its pickle uses an operation outside the tensors-only subset "
                f"({_reason(e)}); {_GET_FIX}"
            ) from None
        raise _corrupt(path, _reason(e)) from None
    except MemoryError:
        raise CheckpointError(
            f"out of memory while reading {path}; free RAM, or keep mmap enabled / use a .safetensors file"
        ) from None
    except Exception as e:  # zip/stream errors, EOFError, OSError, ...: a bad file, not a bug to trace
        raise _corrupt(path, _reason(e)) from None
    return obj


def _extract_state_dict(path: str, obj: Any) -> tuple[dict[str, torch.Tensor], dict]:
    """Lightning layout ``{"state_dict": ..., "global_step": ...}`` or a flat ``{name: tensor}`` dict."""
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"cannot use {path}: it holds a {type(obj).__name__}, not a state dict; {_GET_FIX} or a Lightning .ckpt"
        )
    top = obj
    if "state_dict" in obj:
        inner = obj["state_dict"]
        if not isinstance(inner, dict):
            raise CheckpointError(
                f"cannot use {path}: its 'state_dict' entry is a {type(inner).__name__}, not a dict of tensors; "
                f"{_GET_FIX}"
            )
    else:
        inner = obj
        if not any(isinstance(v, torch.Tensor) for v in obj.values()):
            keys = ", ".join(repr(k) for k in list(obj)[:8])
            raise CheckpointError(
                f"cannot use {path}: no 'state_dict' and no tensors at the top level (keys: {keys}); "
                f"pass an SD v1 .ckpt or .safetensors file"
            )
    sd: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in inner.items():
        if isinstance(k, str) and isinstance(v, torch.Tensor):
            sd[k] = v
        else:
            dropped.append(str(k))
    if not sd:
        raise CheckpointError(f"cannot use {path}: its state dict holds no tensors; {_GET_FIX}")
    info = {
        "format": "ckpt",
        "global_step": _as_int(top.get("global_step")),
        "epoch": _as_int(top.get("epoch")),
        "dropped_keys": dropped,
    }
    if top is not inner and isinstance(top.get("pytorch-lightning_version"), str):
        info["lightning_version"] = top["pytorch-lightning_version"]
    return sd, info


def _as_int(value: Any) -> int | None:
    """int from an int / numpy integer / 0-d integer tensor / digit string; None otherwise."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_floating_point() or value.is_complex():
            return None
        return int(value.item())
    if isinstance(value, str):
        return int(value) if value.strip().lstrip("-").isdigit() else None
    if isinstance(value, numbers.Integral):  # int, numpy.int64, ...
        return int(value)
    return None


# --------------------------------------------------------------------------- preferring safetensors


def prefer_safetensors(path: str | os.PathLike) -> str:
    """``path``, or its ``.safetensors`` sibling when ``path`` is a pickle-based ``.ckpt``/``.pt``/``.pth``.

    ``scripts/convert_ckpt.py`` writes ``model.safetensors`` beside ``model.ckpt``; once it exists,
    reading it needs no unpickling at all, so it is the safer (and mmap-friendly) choice for the same
    weights.  The sibling must really be a safetensors file (checked by content), otherwise a renamed
    pickle would be preferred over the checkpoint that works.
    """
    path = os.fspath(path)
    stem, ext = os.path.splitext(path)
    if ext.lower() in (".ckpt", ".pt", ".pth"):
        sibling = stem + ".safetensors"
        if os.path.isfile(sibling) and _sniff(_read_head(sibling, 9)) == "safetensors":
            return sibling
    return path


__all__ += ["prefer_safetensors"]
