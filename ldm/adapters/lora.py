"""LoRA files: read the kohya and diffusers/PEFT formats, find each target layer, merge into the weights, unmerge.

A LoRA adds ``scale * up @ down`` to a layer's weight, ``scale = weight * alpha / rank``. Merging it into the
weight costs nothing per step (a forward-time adapter would cost two extra products per layer per step).

Unmerging must give back the base weights bit for bit, which subtracting the update cannot (float rounding).
So, as the AUTOMATIC1111 web UI does, the base weight tensor of each touched layer is kept, and the merged
weight is a new tensor: ``round(base in float32 + the sum of every active LoRA's update)``, one rounding in
16-bit precisions. Unmerging puts the kept tensor back; with several LoRAs the survivors are re-merged from it.

PEFT is not used: its adapter layers wrap modules (other class, other state-dict keys) and compute the update
at every forward; merging is twenty lines of arithmetic, and we need the key mapping for kohya files anyway.
"""

from __future__ import annotations

import hashlib
import os
import struct
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ldm.adapters.errors import AdapterError
from ldm.adapters.naming import text_names, unet_names
from ldm.files.checkpoints import CheckpointError, read_state_dict

# Suffix of a tensor's key -> which factor it is. kohya: lora_down/lora_up/alpha; diffusers/PEFT: lora_A/lora_B;
# diffusers' older attention-processor format: lora.down/lora.up.
FACTOR_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".alpha": "alpha",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",
    ".lora.up.weight": "up",
}
# Other networks that share the kohya prefixes (LyCORIS LoHa/LoKr, LoCon's Tucker middle, DoRA, full diffs).
UNSUPPORTED_SUFFIXES = (".lora_mid.weight", ".hada_w1_a", ".lokr_w1", ".dora_scale", ".diff", ".diff_b", ".w_norm")
# Key prefix -> (model part, whether names are kohya's underscored form).
PREFIXES = {"lora_unet_": ("unet", True), "lora_te_": ("text", True), "unet.": ("unet", False),
            "text_encoder.": ("text", False)}  # fmt: skip
OTHER_ARCHITECTURES = {"lora_te1_": "SDXL", "lora_te2_": "SDXL", "text_encoder_2.": "SDXL",
                       "lora_transformer_": "a DiT model"}  # fmt: skip


@dataclass
class Factor:
    """One layer's low-rank update, as stored (the file's dtype), and where it goes."""

    part: str  # "unet" or "text"
    path: str  # module path inside that part
    key: str  # the file's key stem, for messages
    up: torch.Tensor
    down: torch.Tensor
    alpha: float | None

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def scale(self) -> float:
        """alpha / rank (kohya's convention; no alpha means alpha = rank, as diffusers and PEFT take it)."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    def delta_shape(self) -> tuple[int, ...]:
        return (self.up.shape[0], *self.down.shape[1:])


@dataclass
class LoraFile:
    path: str
    name: str
    factors: list[Factor]
    unmatched: list[str] = field(default_factory=list)

    def short_hash(self) -> str:
        return lora_hash(self.path)


def lora_hash(path: str) -> str:
    """12 hex digits as AUTOMATIC1111 writes in "Lora hashes": sha256 of a safetensors file's tensor bytes
    (its header left out, the "addnet" hash), of the whole file otherwise."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        head = f.read(8)
        if path.lower().endswith(".safetensors") and len(head) == 8:
            f.seek(8 + struct.unpack("<Q", head)[0])
        else:
            digest.update(head)
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:12]


def read_lora_tensors(path: str) -> dict[str, torch.Tensor]:
    """The file's tensors, safetensors or a tensors-only torch pickle (never unpickling code)."""
    if not os.path.isfile(path):
        raise AdapterError(f"LoRA file not found: {path}; check the path (or put it in --lora_dir)")
    try:
        sd, _ = read_state_dict(path, mmap=False)
    except CheckpointError as e:
        raise AdapterError(f"LoRA {e}") from None
    return sd


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(part, name, factor) of a key, or None when it names no LoRA factor of SD v1."""
    for suffix, factor in FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            stem = key[: -len(suffix)]
            for prefix, (part, _) in PREFIXES.items():
                if stem.startswith(prefix):
                    return part, stem[len(prefix) :], factor
            return None
    return None


def parse_lora(path: str, sd: Mapping[str, torch.Tensor], names: Mapping[str, Mapping[str, str]]) -> LoraFile:
    """Group the file's keys by layer and resolve each layer's name; `names[part]` maps names to module paths."""
    for key in sd:
        for prefix, arch in OTHER_ARCHITECTURES.items():
            if key.startswith(prefix):
                raise AdapterError(f"LoRA {path} is for {arch}, not SD v1 (key {key}); use a LoRA made for SD 1.x")
        if key.endswith(UNSUPPORTED_SUFFIXES):
            raise AdapterError(
                f"LoRA {path}: key {key} belongs to a LyCORIS/DoRA network (LoHa, LoKr, Tucker, DoRA), which is not "
                "supported; use a plain LoRA (lora_down/lora_up or lora_A/lora_B)"
            )
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    stems: dict[tuple[str, str], str] = {}
    unmatched: list[str] = []
    for key, tensor in sd.items():
        split = _split_key(key)
        target = None if split is None else names[split[0]].get(split[1])
        if split is None or target is None:
            unmatched.append(key)
            continue
        part, _, factor = split
        groups.setdefault((part, target), {})[factor] = tensor
        stems[(part, target)] = key.rsplit(".lora", 1)[0] if factor != "alpha" else key[: -len(".alpha")]
    factors = []
    for (part, target), got in groups.items():
        stem = stems[(part, target)]
        if "up" not in got or "down" not in got:
            missing = "up (lora_up/lora_B)" if "up" not in got else "down (lora_down/lora_A)"
            raise AdapterError(f"LoRA {path}: layer {stem} has no {missing} weight; the file is incomplete")
        alpha = got.get("alpha")
        factors.append(Factor(part, target, stem, got["up"], got["down"], None if alpha is None else float(alpha)))
    if not factors:
        first = next(iter(sd), "(no tensors)")
        raise AdapterError(
            f"LoRA {path}: no key matches a layer of this SD v1 model (first: {first}); it is not an SD 1.x LoRA "
            "in the kohya (lora_unet_/lora_te_) or diffusers (unet./text_encoder. with lora_A/lora_B) format"
        )
    name = os.path.splitext(os.path.basename(path))[0]
    return LoraFile(path, name, factors, unmatched)


def check_shapes(lora: LoraFile, modules: Mapping[str, Mapping[str, nn.Module]]) -> None:
    """Refuse a LoRA made for another base model before anything is merged: the first layer that does not fit."""
    for f in lora.factors:
        weight = modules[f.part][f.path].weight
        have, want = f.delta_shape(), tuple(weight.shape)
        if f.up.shape[1] != f.rank or not (have == want or _numel_fits(have, want)):
            raise AdapterError(
                f"LoRA {lora.path} does not fit this model: {f.key} makes a {list(have)} update (rank {f.rank}) for "
                f"a {list(want)} weight; it was trained for another base model (SD 2.x, SDXL?): use an SD 1.x LoRA"
            )


def _numel_fits(have: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A Linear update for a 1x1 conv, or a 1x1 conv update for a Linear."""
    squeeze = tuple(d for i, d in enumerate(have) if i < 2 or d != 1)
    return squeeze == tuple(d for i, d in enumerate(want) if i < 2 or d != 1)


def warn_unmatched(lora: LoraFile) -> None:
    if lora.unmatched:
        warnings.warn(
            f"LoRA {lora.path}: {len(lora.unmatched)} of its keys match no layer of this model and are ignored "
            f"(first: {lora.unmatched[0]}); {len(lora.factors)} layers are applied",
            stacklevel=3,
        )


def load_lora(path: str, model: nn.Module) -> LoraFile:
    """Read, resolve and check one LoRA file against `model` (an SD v1 LatentDiffusion); nothing is changed yet."""
    parts = model_parts(model)
    names = {"unet": unet_names(parts["unet"]), "text": text_names(parts["text"])}
    lora = parse_lora(path, read_lora_tensors(path), names)
    check_shapes(lora, {p: dict(m.named_modules()) for p, m in parts.items()})
    warn_unmatched(lora)
    return lora


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    return {"unet": model.model.diffusion_model, "text": model.cond_stage_model.transformer.text_model}


# --------------------------------------------------------------------------- merging


@dataclass
class _Kept:
    module: nn.Module
    weight: nn.Parameter  # the base weight, the very tensor the model held
    packed_for: object = None


class MergeState:
    """The base weights of every layer some active LoRA touches, and the active LoRAs with their weights.

    One per model (`model.lora_merge_state`), so LoRAs applied by separate calls combine and can be removed in
    any order: each change re-merges the touched layers from the kept base weights."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.kept: dict[tuple[str, str], _Kept] = {}
        self.active: dict[int, list[tuple[LoraFile, float]]] = {}
        self._next = 0

    @classmethod
    def of(cls, model: nn.Module) -> MergeState:
        state = getattr(model, "lora_merge_state", None)
        if state is None:
            state = cls(model)
            object.__setattr__(model, "lora_merge_state", state)  # not a submodule: no state-dict entries
        return state

    def add(self, loras: list[tuple[LoraFile, float]]) -> int:
        token = self._next
        self._next += 1
        self.active[token] = loras
        self._remerge({(f.part, f.path) for lora, _ in loras for f in lora.factors})
        return token

    def remove(self, token: int) -> None:
        loras = self.active.pop(token, [])
        self._remerge({(f.part, f.path) for lora, _ in loras for f in lora.factors})

    def _remerge(self, targets: set[tuple[str, str]]) -> None:
        if not targets:
            return
        parts = model_parts(self.model)
        updates: dict[tuple[str, str], list[tuple[Factor, float]]] = {}
        for loras in self.active.values():
            for lora, weight in loras:
                for f in lora.factors:
                    if (f.part, f.path) in targets:
                        updates.setdefault((f.part, f.path), []).append((f, weight))
        for target in sorted(targets):
            if target not in self.kept:
                module = parts[target[0]].get_submodule(target[1])
                self.kept[target] = _Kept(module, module.weight, getattr(module, "packed_for", None))
            kept = self.kept[target]
            if kept.module.weight.is_meta:  # freed by a low-memory run: nothing left to restore
                continue
            if target in updates:
                _set_weight(kept.module, _merged(kept.weight, updates[target]))
            else:
                _restore(kept)
                del self.kept[target]
        _forget_compiled(self.model)


def _merged(base: nn.Parameter, updates: list[tuple[Factor, float]]) -> torch.Tensor:
    """round(base + sum of the updates), added up in float32 and rounded once to the base's dtype and layout.

    The products accumulate in place into one float32 buffer (addmm): a LoCon LoRA touches most of the UNet,
    and a fresh tensor per product would mean gigabytes of new pages at full size."""
    plain = base.to_dense() if base.is_mkldnn else base.detach()
    total = torch.empty(plain.shape, dtype=torch.float32, device=plain.device)
    total.copy_(plain)
    rows = total.view(plain.shape[0], -1)
    for f, weight in updates:
        up = f.up.to(plain.device, torch.float32).flatten(1)
        down = f.down.to(plain.device, torch.float32).flatten(1)
        rows.addmm_(up, down, alpha=weight * f.scale())
    channels_last = plain.dim() == 4 and not plain.is_contiguous()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return total.to(plain.dtype).contiguous(memory_format=fmt)


def _set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    # A new Parameter, never a write into the old one: that one is the kept base (and may be a read-only view of
    # a memory-mapped checkpoint). A packed convolution (ldm.speed.packed_conv) repacks a plain weight at its
    # next call.
    module.weight = nn.Parameter(weight, requires_grad=False)


def _restore(kept: _Kept) -> None:
    kept.module.weight = kept.weight
    if kept.packed_for is not None:
        kept.module.packed_for = kept.packed_for


def _forget_compiled(model: nn.Module) -> None:
    """torch.compile (with inductor's freezing) bakes weights into the compiled code: drop it so the next call
    compiles against the new weights."""
    from ldm.util import is_compiled

    if any(is_compiled(m) for m in model.modules()):
        torch._dynamo.reset()
