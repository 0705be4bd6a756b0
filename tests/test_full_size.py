"""The full-size SD v1 model: its layout equals the original's, and checkpoints written in the
original formats (made by scripts/make_fake_ckpt.py) load completely."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ldm.files.checkpoints import CheckpointError, read_state_dict
from ldm.files.fake_checkpoint import tensor_digest
from ldm.generation.load import build_model
from ldm.speed.runtime import Runtime
from ldm.util import instantiate_from_config

from .conftest import CPU_CONFIG, FAKE_DIGEST, MANIFEST, REPO, fake_full_ckpt

CPU = Runtime(torch.device("cpu"))


@pytest.fixture(scope="module")
def manifest():
    return json.loads(MANIFEST.read_text())


@pytest.mark.parametrize("config", ["v1-inference.yaml", "v1-inference-cpu.yaml"])
def test_state_dict_layout_equals_the_original(manifest, config):
    cfg = OmegaConf.load(REPO / "configs" / "stable-diffusion" / config)
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    ours = {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in model.state_dict().items()}
    assert list(ours) == list(manifest["keys"])  # same keys, same order
    assert ours == {k: [list(s), d] for k, (s, d) in manifest["keys"].items()}
    for comp in manifest["components"]:
        if comp["parameters"]:
            n = sum(p.numel() for k, p in model.named_parameters() if k.startswith(comp["prefix"]))
            assert n == comp["parameters"], comp["prefix"]


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags",
    [(), ("--fp16", "--lightning-pickle"), ("--safetensors",)],
    ids=["ckpt-fp32", "ckpt-fp16-with-lightning-state", "safetensors"],
)
def test_original_format_checkpoints_load_completely(flags):
    path = fake_full_ckpt(*flags)
    lightning_was_imported = "pytorch_lightning" in sys.modules
    sd, info = read_state_dict(path)
    cfg = OmegaConf.load(CPU_CONFIG)
    model, report = build_model(cfg.model, sd, CPU)
    assert report.missing == [] and report.unexpected == []
    params = dict(model.named_parameters())
    assert not any(p.is_meta for p in params.values())
    assert all(p.dtype == torch.float32 for p in params.values())
    # Every weight arrived, CLIP's included (a strict=False load with a wrong prefix would drop them).
    for key, t in sd.items():
        if key in params:
            assert torch.equal(params[key], t.float()), key
    emb = model.cond_stage_model.transformer.text_model.embeddings
    assert torch.equal(emb.position_ids, torch.arange(77)[None])
    assert info["global_step"] == (None if "--safetensors" in flags else 470000)
    assert info["dtype_counts"].get("float16", 0) == (1143 if "--fp16" in flags else 0)
    # (test_checkpoint_io proves it in a fresh interpreter; here: loading did not import it, unless another
    # test in this session already had)
    assert lightning_was_imported or "pytorch_lightning" not in sys.modules


@pytest.mark.slow
def test_our_fake_checkpoint_has_the_reference_weights_tensor_for_tensor():
    """scripts/make_fake_ckpt.py rebuilds, from the documented rule, the very weights the original code's reference
    case was made with: every tensor read back from the file hashes as in tests/reference."""
    reference = json.loads(FAKE_DIGEST.read_text())
    sd, _ = read_state_dict(fake_full_ckpt())
    total, per_key = tensor_digest(sd)
    assert list(per_key) == list(reference["sha256_16_per_key"])
    wrong = [k for k, h in reference["sha256_16_per_key"].items() if per_key[k] != h]
    assert not wrong, f"{len(wrong)} tensors differ, first {wrong[:3]}"
    assert total == reference["sha256_all_tensors"]


@pytest.mark.slow
def test_wrong_layouts_are_clear_errors():
    sd, _ = read_state_dict(fake_full_ckpt())
    cfg = OmegaConf.load(CPU_CONFIG)
    # transformers-5 style CLIP names (no `text_model.` level): every CLIP weight "missing".
    renamed = {k.replace("transformer.text_model.", "transformer."): v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match="lacks 196 weights"):
        build_model(cfg.model, renamed, CPU)
    # An SD 2.x-like context width: shape mismatch named with the file's kind.
    wide = dict(sd)
    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    wide[key] = torch.zeros(320, 1024)
    with pytest.raises(CheckpointError, match="Stable Diffusion 2"):
        build_model(cfg.model, wide, CPU)


def test_inpainting_config_is_the_v1_layout_with_a_9_channel_input(manifest):
    """sd-v1-5-inpainting differs from SD v1 in one tensor: the UNet's first conv takes 9 channels."""
    cfg = OmegaConf.load(REPO / "configs" / "stable-diffusion" / "v1-inpainting-inference.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = {k: list(s) for k, (s, _) in manifest["keys"].items()}
    first = "model.diffusion_model.input_blocks.0.0.weight"
    assert expected[first] == [320, 4, 3, 3] and ours[first] == [320, 9, 3, 3]
    assert {k: v for k, v in ours.items() if k != first} == {k: v for k, v in expected.items() if k != first}
