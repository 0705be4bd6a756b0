"""LoRA loading: the same outputs as diffusers' load_lora_weights + fuse_lora for random LoRA files in every
format we read, on a small config and on the full-size SD v1 layout; exact unmerging; one-line errors."""

from __future__ import annotations

import os
import pickle
import warnings
from functools import cache

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from ldm.adapters import AdapterError, apply_adapters
from ldm.adapters.lora import lora_hash

from .adapter_models import (
    Loader,
    build_ours,
    build_theirs,
    converter_module_names,
    fold_alpha,
    lora_factors,
    make_lora,
    rename_kohya_unet,
)

TOL = 1e-4  # relative L2 error, float32
FORMATS = ("kohya_ldm", "kohya_diffusers", "peft")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@cache
def pair(which: str):
    ours = build_ours(which)
    return ours, *build_theirs(ours)


def inputs(ours, seed: int = 3):
    unet = ours.model.diffusion_model
    context = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, context, generator=g)
    return x, torch.tensor([3, 700]), ctx, torch.randint(0, 49406, (2, 77), generator=g)


@torch.no_grad()
def run_ours(ours, x, t, ctx, ids):
    return ours.model.diffusion_model(x, t, ctx), ours.cond_stage_model.transformer.text_model(ids)


@torch.no_grad()
def run_theirs(unet, text, x, t, ctx, ids):
    return unet(x, t, encoder_hidden_states=ctx).sample, text(input_ids=ids).last_hidden_state


def write_lora(tmp_path, fmt: str, ours, their_unet, seed: int):
    """The LoRA file in `fmt` for ours, and the file diffusers gets: the same one, or for kohya files the same
    update with alpha folded in (see fold_alpha) and, for LDM names, renamed by diffusers' own converter."""
    text = ours.cond_stage_model.transformer.text_model
    source = ours.model.diffusion_model if fmt == "kohya_ldm" else their_unet
    sd = make_lora(fmt, source, text, seed, rank=3 + seed % 3)  # ranks 3, 4, 5: alpha / rank is not alpha / 4
    ours_path, their_path = tmp_path / f"{fmt}-{seed}.safetensors", tmp_path / f"{fmt}-{seed}-diffusers.safetensors"
    save_file(sd, ours_path)
    if fmt == "kohya_ldm":
        sd = rename_kohya_unet(sd, converter_module_names(ours.model.diffusion_model))
    save_file(fold_alpha(sd) if fmt.startswith("kohya") else sd, their_path)
    return ours_path, their_path


def compare(
    tmp_path, which: str, specs: list[tuple[str, float]], cleanup: bool = True
) -> tuple[list[float], list[float]]:
    """(errors ours vs diffusers, change from the base) of UNet and text outputs with `specs` merged; without
    `cleanup` diffusers' models keep the LoRAs fused (unfusing the full-size UNet takes seconds)."""
    ours, their_unet, their_text = pair(which)
    args = inputs(ours)
    base = run_ours(ours, *args)
    files = [(write_lora(tmp_path, fmt, ours, their_unet, seed=i), w) for i, (fmt, w) in enumerate(specs)]
    with apply_adapters(ours, loras=[(o, w) for (o, _), w in files]):
        merged = run_ours(ours, *args)
    loader = Loader(their_unet, their_text)
    names = [f"a{i}" for i in range(len(files))]
    for ((_, theirs), _), name in zip(files, names, strict=True):
        loader.load_lora_weights(str(theirs), adapter_name=name)
    loader.set_adapters(names, adapter_weights=[w for _, w in files])
    loader.fuse_lora(adapter_names=names)
    try:
        expected = run_theirs(their_unet, their_text, *args)
    finally:
        if cleanup:
            loader.unfuse_lora()
            loader.unload_lora_weights()
        else:
            pair.cache_clear()
    return [rel(a, b) for a, b in zip(merged, expected, strict=True)], [
        rel(a, b) for a, b in zip(merged, base, strict=True)
    ]


@pytest.mark.parametrize("fmt", FORMATS)
def test_small_config_matches_diffusers(tmp_path, fmt):
    errors, change = compare(tmp_path, "tiny", [(fmt, 0.7)])
    assert max(errors) < TOL, errors
    assert min(change) > 100 * TOL, change  # the LoRA does change both outputs


def test_several_loras_at_once_match_diffusers(tmp_path):
    errors, change = compare(tmp_path, "tiny", [("kohya_ldm", 0.6), ("peft", -0.4), ("kohya_diffusers", 1.3)])
    assert max(errors) < TOL, errors
    assert min(change) > 100 * TOL, change


@pytest.mark.slow
def test_full_size_layout_matches_diffusers(tmp_path, all_threads):
    """All three formats merged together into the full-size UNet and text encoder, inputs 8x8 latents."""
    specs = [("kohya_ldm", 0.5), ("kohya_diffusers", 0.8), ("peft", -0.6)]
    errors, change = compare(tmp_path, "full", specs, cleanup=False)
    assert max(errors) < TOL, errors
    assert min(change) > 100 * TOL, change


# ----------------------------------------------------------------------------- exact unmerge, closed form


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_unmerge_restores_every_tensor_bit_for_bit(tmp_path, dtype):
    ours = build_ours("tiny", seed=1, dtype=dtype)
    _, their_unet, _ = pair("tiny")  # diffusers' module names for the kohya_diffusers file
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    paths = [write_lora(tmp_path, fmt, ours, their_unet, seed=i)[0] for i, fmt in enumerate(FORMATS)]
    first = apply_adapters(ours, loras=[(paths[0], 0.8), (paths[1], 0.3)])
    second = apply_adapters(ours, loras=[(paths[2], -1.1)])
    changed = [k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])]
    assert len(changed) > 100
    first.remove()  # not in the order applied: the second stays merged, from the kept base weights
    assert any(not torch.equal(v, before[k]) for k, v in ours.state_dict().items())
    second.remove()
    after = ours.state_dict()
    assert list(after) == list(before)
    for key, value in before.items():
        assert after[key].dtype == dtype or not value.is_floating_point()
        assert torch.equal(after[key], value), key


def test_merge_is_rounded_once_in_16_bit(tmp_path):
    """bf16 weights: the merged weight is round(base + w * alpha / rank * up @ down), summed in float32, for a
    3x3 conv, a 1x1 conv given a Linear LoRA (as trained on linear projections) and a Linear."""
    ours = build_ours("tiny", seed=2, dtype=torch.bfloat16)
    unet = ours.model.diffusion_model
    targets = {
        "input_blocks_1_0_in_layers_2": unet.input_blocks[1][0].in_layers[2],  # 3x3 conv
        "input_blocks_1_1_proj_in": unet.input_blocks[1][1].proj_in,  # 1x1 conv
        "input_blocks_1_1_transformer_blocks_0_attn2_to_k": unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k,
    }
    g = torch.Generator().manual_seed(0)
    sd, expected = {}, {}
    bases = {name: module.weight.clone() for name, module in targets.items()}
    for name, module in targets.items():
        up, down = lora_factors(module, 3, g)
        if name.endswith("proj_in"):
            up, down = up.flatten(1), down.flatten(1)  # a Linear LoRA for a 1x1 conv
        sd[f"lora_unet_{name}.lora_up.weight"], sd[f"lora_unet_{name}.lora_down.weight"] = up, down
        sd[f"lora_unet_{name}.alpha"] = torch.tensor(2.0)
        update = (up.double().flatten(1) @ down.double().flatten(1)).reshape(module.weight.shape) * (0.9 * 2.0 / 3)
        expected[name] = module.weight.double() + update  # exact (float64)
    save_file(sd, tmp_path / "closed.safetensors")
    with apply_adapters(ours, loras=[(tmp_path / "closed.safetensors", 0.9)]):
        for name, module in targets.items():
            assert module.weight.dtype == torch.bfloat16
            exact = expected[name]
            # One rounding is within half a bf16 step of the exact sum (float32 summation adds ~1e-7); rounding
            # the update to bf16 before adding, or adding in bf16, is off by up to a whole step somewhere.
            half_step = torch.ldexp(torch.ones_like(exact), torch.frexp(exact).exponent - 9)
            error = (module.weight.double() - exact).abs()
            assert (error <= half_step + 1e-6 * exact.abs()).all(), name
            naive = bases[name] + (exact - bases[name].double()).to(torch.bfloat16)  # update rounded, added in bf16
            assert ((naive.double() - exact).abs() > half_step + 1e-6 * exact.abs()).any(), name  # the bound bites


@pytest.mark.parametrize("precision", ["full", "bf16"])
def test_switching_loras_on_a_loaded_model_with_speed_paths(tmp_path, tiny_ckpt, tiny_config, precision):
    """Through ldm.generation.load with channels-last weights: float32 packs convolutions for oneDNN on a CPU,
    bf16 keeps 16-bit weights (cast per layer, or bf16 arithmetic where the CPU has it). The model runs with
    the LoRA, then gives the base output again, and every weight is the loaded one."""
    from ldm.generation.load import load_model
    from ldm.speed.packed_conv import PackedConv2d
    from ldm.speed.runtime import resolve_runtime

    runtime = resolve_runtime(tiny_config, "cpu", precision, True, None)
    model = load_model(tiny_config, tiny_ckpt, runtime, verbose=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    unet = model.model.diffusion_model
    dtype = runtime.weight_dtype
    x, t, ctx = torch.randn(1, 4, 8, 8, dtype=dtype), torch.tensor([10]), torch.randn(1, 77, 32, dtype=dtype)
    with torch.no_grad():
        base = unet(x, t, ctx).float()
    if runtime.packs_convolutions:
        assert any(isinstance(m, PackedConv2d) and m.weight.is_mkldnn for m in unet.modules())
    _, their_unet, _ = pair("tiny")
    path = write_lora(tmp_path, "kohya_ldm", build_ours("tiny"), their_unet, seed=5)[0]
    with apply_adapters(model, loras=[(path, 1.0)]), torch.no_grad():
        merged = unet(x, t, ctx).float()
    with torch.no_grad():
        again = unet(x, t, ctx).float()
    assert rel(merged, base) > 0.01
    assert torch.equal(again, base)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


# ----------------------------------------------------------------------------- bad files


def tiny_with_file(tmp_path, sd: dict, name: str = "bad.safetensors"):
    path = tmp_path / name
    save_file(sd, path)
    return build_ours("tiny"), path


def test_lora_for_a_bigger_model_names_the_first_layer_that_does_not_fit(tmp_path):
    full_unet_shape = {"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320, 1, 1),
                       "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4, 1, 1)}  # fmt: skip
    ours, path = tiny_with_file(tmp_path, full_unet_shape)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(AdapterError, match=r"bad.safetensors does not fit .*lora_unet_input_blocks_1_1_proj_in") as e:
        apply_adapters(ours, loras=[path])
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in ours.state_dict().items())


def test_keys_that_match_nothing_and_other_architectures(tmp_path):
    ours, path = tiny_with_file(tmp_path, {"lora_unet_nonexistent_layer.lora_down.weight": torch.zeros(4, 8)})
    with pytest.raises(AdapterError, match=r"no key matches .*first: lora_unet_nonexistent_layer"):
        apply_adapters(ours, loras=[path])
    _, xl = tiny_with_file(tmp_path, {"lora_te1_text_model_x.lora_down.weight": torch.zeros(4, 8)}, "xl.safetensors")
    with pytest.raises(AdapterError, match=r"xl.safetensors is for SDXL"):
        apply_adapters(ours, loras=[xl])
    _, loha = tiny_with_file(tmp_path, {"lora_unet_out_2.hada_w1_a": torch.zeros(4, 8)}, "loha.safetensors")
    with pytest.raises(AdapterError, match=r"lora_unet_out_2.hada_w1_a belongs to a LyCORIS"):
        apply_adapters(ours, loras=[loha])
    with pytest.raises(AdapterError, match=r"LoRA file not found: .*missing.safetensors"):
        apply_adapters(ours, loras=[tmp_path / "missing.safetensors"])


def test_partial_match_warns_with_the_count(tmp_path):
    ours = build_ours("tiny")
    conv = ours.model.diffusion_model.out[2]
    up, down = lora_factors(conv, 2, torch.Generator().manual_seed(0))
    sd = {"lora_unet_out_2.lora_up.weight": up, "lora_unet_out_2.lora_down.weight": down,
          "lora_unet_not_here.lora_up.weight": up.clone(),
          "lora_unet_not_here.lora_down.weight": down.clone()}  # fmt: skip
    save_file(sd, tmp_path / "partial.safetensors")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handle = apply_adapters(ours, loras=[tmp_path / "partial.safetensors"])
    messages = [str(w.message) for w in caught if "partial" in str(w.message)]
    assert len(messages) == 1
    assert "2 of its keys match no layer" in messages[0] and "1 layers are applied" in messages[0]
    handle.remove()


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-lora",))


@pytest.mark.parametrize("suffix", [".pt", ".ckpt"])
def test_malicious_pickle_lora_is_refused_with_nothing_run(tmp_path, suffix, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / f"evil{suffix}"
    torch.save({"lora_unet_out_2.lora_down.weight": torch.zeros(2, 32, 3, 3), "x": _RunsCode()}, path)
    with open(tmp_path / f"legacy{suffix}", "wb") as f:  # a plain (non-zip) pickle, as torch < 1.6 wrote
        pickle.dump({"a": _RunsCode()}, f)
    ours = build_ours("tiny")
    for p in (path, tmp_path / f"legacy{suffix}"):
        with pytest.raises(AdapterError, match=r"refusing to load|truncated or corrupt"):
            apply_adapters(ours, loras=[p])
    assert not (tmp_path / "pwned-by-lora").exists()


def test_lora_hash_is_the_tensor_bytes_sha256(tmp_path):
    """A1111's "addnet" short hash: sha256 of everything after the safetensors header."""
    import hashlib
    import struct

    save_file({"a": torch.arange(10.0)}, tmp_path / "h.safetensors", metadata={"note": "x"})
    data = (tmp_path / "h.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    assert lora_hash(str(tmp_path / "h.safetensors")) == hashlib.sha256(data[8 + n :]).hexdigest()[:12]


def test_module_is_unchanged_class_and_keys(tmp_path):
    """Merging keeps modules plain (no wrapper layers): the state dict's keys stay the checkpoint's."""
    ours = build_ours("tiny")
    _, their_unet, _ = pair("tiny")
    path = write_lora(tmp_path, "peft", ours, their_unet, seed=9)[0]
    keys, classes = list(ours.state_dict()), [type(m) for m in ours.modules()]
    with apply_adapters(ours, loras=[path]):
        assert list(ours.state_dict()) == keys and [type(m) for m in ours.modules()] == classes
        assert all(isinstance(p, nn.Parameter) and not p.requires_grad for p in ours.parameters())


def test_a_pt_lora_reads_as_its_safetensors_twin(tmp_path):
    """kohya also wrote .pt files: read tensors-only, they merge exactly as the same tensors in .safetensors."""
    from safetensors.torch import load_file

    ours = build_ours("tiny")
    _, their_unet, _ = pair("tiny")
    path = write_lora(tmp_path, "kohya_ldm", ours, their_unet, seed=4)[0]
    torch.save(load_file(path), tmp_path / "twin.pt")
    with apply_adapters(ours, loras=[path]):
        merged = {k: v.clone() for k, v in ours.state_dict().items()}
    with apply_adapters(ours, loras=[tmp_path / "twin.pt"]):
        assert all(torch.equal(v, merged[k]) for k, v in ours.state_dict().items())
