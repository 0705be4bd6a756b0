"""Convert any SD v1 checkpoint into a ``.safetensors`` file, so it never needs unpickling again.

The source is read with :func:`ldm.files.checkpoints.read_state_dict` (no pickle code runs), and the
output keeps the original flat key names (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.text_model.*``), so every SD tool -- and our own loader -- reads it
like the ``.ckpt`` it came from.  The file is written beside its destination and moved into place
only when complete: a crash or a full disk never leaves a half-written checkpoint under that name.
"""

from __future__ import annotations

import os
import secrets
from collections import Counter

import torch

from ldm.files.checkpoints import CheckpointError, read_state_dict

__all__ = ["convert_checkpoint", "EMA_PREFIX", "DROPPED_KEYS"]

EMA_PREFIX = "model_ema."
"""CompVis LitEma keeps its copies as ``model_ema.<name of a ``model.`` parameter, dots removed>``."""
DROPPED_KEYS = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})
"""A non-persistent buffer in current transformers: a file holding it only confuses strict loaders."""


def _ema_twins(sd: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{model key: its model_ema key}`` for every ``model.*`` tensor whose EMA copy is in ``sd``.

    Removing dots can map two names to one (``blocks.1.1.w`` / ``blocks.11.w``); LitEma then kept
    only one copy, so which weight it belongs to is unknowable: refuse instead of guessing.
    """
    twins: dict[str, str] = {}
    owner: dict[str, str] = {}
    for key in sd:
        if not key.startswith("model."):
            continue
        ema = EMA_PREFIX + key.removeprefix("model.").replace(".", "")
        if ema not in sd:
            continue
        if ema in owner:
            raise CheckpointError(f"EMA weight {ema} could belong to {owner[ema]} or {key}; convert without --use-ema")
        owner[ema] = key
        if sd[ema].shape != sd[key].shape:
            raise CheckpointError(
                f"EMA weight {ema} has shape {list(sd[ema].shape)} but {key} has {list(sd[key].shape)}; "
                f"the file is inconsistent: convert without --use-ema"
            )
        twins[key] = ema
    return twins


def _check_destination(src: str, dst: str, overwrite: bool) -> None:
    """Fail before reading a multi-GB source if the result could not be written where asked."""
    if not dst.lower().endswith(".safetensors"):
        raise CheckpointError(f"output {dst} must end in .safetensors, so loaders know not to unpickle it; rename it")
    if os.path.isdir(dst):
        raise CheckpointError(f"output {dst} is a directory; pass a file name ending in .safetensors")
    if os.path.exists(dst):
        if os.path.exists(src) and os.path.samefile(src, dst):
            raise CheckpointError(f"output {dst} is the source file itself; pass another output name")
        if not overwrite:
            raise CheckpointError(
                f"output {dst} already exists; pass --overwrite to replace it or choose another name"
            ) from None
    parent = os.path.dirname(os.path.abspath(dst))
    if not os.path.isdir(parent):
        raise CheckpointError(f"output directory {parent} does not exist; create it first")


def _prepare(sd: dict[str, torch.Tensor], fp16: bool) -> dict[str, torch.Tensor]:
    """Cast, then make each tensor contiguous with storage of its own (safetensors refuses shared storage,
    which ``.ckpt`` files can have when one saved tensor was a view of another)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, t in sd.items():
        if fp16 and t.is_floating_point() and t.dtype != torch.float16:
            h = t.to(torch.float16)
            if torch.isinf(h).any() and not torch.isinf(t).any():
                raise CheckpointError(f"{key} has values beyond the float16 range; convert without --fp16")
            t = h
        t = t.contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if ptr:
            seen.add(ptr)
        out[key] = t
    return out


def _write_atomically(tensors: dict[str, torch.Tensor], dst: str, metadata: dict[str, str], overwrite: bool) -> None:
    """Write to a temp file in dst's directory, fsync, then move it into place in one step."""
    import safetensors.torch

    parent = os.path.dirname(os.path.abspath(dst))
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.{secrets.token_hex(4)}.part")
    try:  # O_EXCL: the file we later delete on failure is surely ours; 0o666: the umask's usual mode
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as e:
        raise CheckpointError(f"cannot write in {parent}: {e.strerror or e}; check its permissions") from None
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "r+b") as f:
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, dst)
        else:
            try:  # unlike replace, link fails if dst appeared meanwhile (e.g. a parallel conversion)
                os.link(tmp, dst)
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links: re-check, then replace
                if os.path.lexists(dst):
                    raise FileExistsError(dst) from None
                os.replace(tmp, dst)
    except FileExistsError:
        raise CheckpointError(
            f"output {dst} already exists; pass --overwrite to replace it or choose another name"
        ) from None
    except Exception as e:
        raise CheckpointError(f"cannot write {dst}: {e}; check free disk space and permissions") from e
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    fp16: bool = False,
    use_ema: bool = False,
    overwrite: bool = False,
) -> dict:
    """Write ``src``'s flat state dict to ``dst`` as safetensors; return a summary.

    ``fp16`` halves floating tensors (integer/bool ones are kept); ``use_ema`` puts the LitEma copies in
    place of the ``model.*`` weights they track.  ``model_ema.*`` keys are never written: loaders ignore
    them, and they double the file.  Raises :class:`CheckpointError` (one line) for every failure.

    Summary keys: ``dst``, ``tensors``, ``bytes``, ``dropped`` (source keys not written), ``dropped_ema``
    (of which ``model_ema.*``), ``ema_applied`` (weights replaced by their EMA), ``dtype`` (the floating
    dtype written, or the most common one), ``global_step``.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not os.path.exists(src):
        raise CheckpointError(f"source checkpoint not found: {src}; check the path")
    _check_destination(src, dst, overwrite)
    sd, info = read_state_dict(src)

    ema_keys = [k for k in sd if k.startswith(EMA_PREFIX)]
    ema_applied = 0
    if use_ema:
        if not ema_keys:
            raise CheckpointError(f"{src} holds no EMA weights (no model_ema.* keys); convert without --use-ema")
        twins = _ema_twins(sd)
        if not twins:
            raise CheckpointError(
                f"{src} has model_ema.* keys but none matches a model.* weight; convert without --use-ema"
            )
        sd = {k: sd[twins[k]] if k in twins else v for k, v in sd.items()}
        ema_applied = len(twins)
    kept = {k: v for k, v in sd.items() if not k.startswith(EMA_PREFIX) and k not in DROPPED_KEYS}
    dropped = len(sd) - len(kept)
    if not kept:
        raise CheckpointError(f"{src} holds nothing but EMA bookkeeping; it is not a usable checkpoint")
    tensors = _prepare(kept, fp16)
    del sd, kept

    step = info.get("global_step")
    metadata = {
        "format": "pt",
        "source": os.path.basename(src),
        "converted_fp16": str(fp16).lower(),
        "converted_use_ema": str(use_ema).lower(),
    }
    if step is not None:
        metadata["global_step"] = str(step)
    _write_atomically(tensors, dst, metadata, overwrite)

    dtypes = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values())
    floats = Counter(str(t.dtype).removeprefix("torch.") for t in tensors.values() if t.is_floating_point())
    return {
        "dst": dst,
        "tensors": len(tensors),
        "bytes": os.path.getsize(dst),
        "dropped": dropped + len(info.get("dropped_keys", [])),
        "dropped_ema": len(ema_keys),
        "ema_applied": ema_applied,
        "dtype": (floats or dtypes).most_common(1)[0][0],
        "global_step": step,
    }


def describe(summary: dict) -> str:
    """The one-line report the CLI prints."""
    size = summary["bytes"]
    shown = next((f"{size / n:.2f} {u}" for u, n in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if size >= n), f"{size} B")
    text = (
        f"wrote {summary['dst']}: {summary['tensors']} tensors, {shown}, {summary['dtype']}, "
        f"dropped {summary['dropped']} keys"
    )
    if summary["dropped_ema"]:
        text += f" (incl. {summary['dropped_ema']} model_ema.*)"
    if summary["ema_applied"]:
        text += f", EMA weights used for {summary['ema_applied']} tensors"
    return text + (f", global step {summary['global_step']}" if summary["global_step"] is not None else "")
