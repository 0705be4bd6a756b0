"""Our plain-PyTorch CLIP text model against transformers' CLIPTextModel (eager attention, the arithmetic the
original SD code ran): same state-dict keys, the same last hidden state bit for bit."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch

from ldm.modules.encoders.clip_text import CLIPTextConfig, CLIPTextTransformer
from ldm.modules.encoders.modules import FrozenCLIPEmbedder

from .conftest import REPO

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, projection_dim=64)


def random_pair(fields: dict, seed: int = 0) -> tuple[CLIPTextTransformer, torch.nn.Module]:
    """Ours and transformers', holding the same random weights (not the init's, whose LayerNorms are exact 1/0)."""
    ours = CLIPTextTransformer(CLIPTextConfig.from_fields(fields)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if p.ndim > 1 else 0.2) + (1.0 if "norm" in name else 0))
    config = transformers.CLIPTextConfig(**dataclasses.asdict(ours.config))
    config._attn_implementation = "eager"
    theirs = transformers.CLIPTextModel(config).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, theirs


def test_state_dict_keys_equal_transformers():
    ours, theirs = random_pair(SMALL)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_last_hidden_state_bitwise_equal(dtype):
    ours, theirs = random_pair(SMALL)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    ids = torch.randint(0, 49408, (3, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(ids)
        b = theirs(input_ids=ids).last_hidden_state
    assert a.dtype == dtype
    assert torch.equal(a, b)
    # Shorter sequences use the first position embeddings and a mask of their own length.
    with torch.no_grad():
        assert torch.equal(ours(ids[:, :9]), theirs(input_ids=ids[:, :9]).last_hidden_state)


def test_causality():
    """A token's state depends on it and the tokens before it only: the mask is causal, not absent or reversed."""
    ours, _ = random_pair(SMALL)
    ids = torch.randint(0, 49408, (1, 20), generator=torch.Generator().manual_seed(2))
    changed = ids.clone()
    changed[0, 12] = (changed[0, 12] + 1) % 49408
    with torch.no_grad():
        a, b = ours(ids), ours(changed)
    assert torch.equal(a[0, :12], b[0, :12])
    assert (a[0, 12:] - b[0, 12:]).abs().amax(-1).min() > 1e-4


def test_full_size_layer_matches_transformers():
    """The ViT-L/14 widths (768, 12 heads, MLP 3072, 77 positions), one layer to keep it quick."""
    ours, theirs = random_pair({"num_hidden_layers": 1})
    tokens = FrozenCLIPEmbedder(text_config={"num_hidden_layers": 1}).tokenize(["a photograph of an astronaut"])
    with torch.no_grad():
        assert torch.equal(ours(tokens), theirs(input_ids=tokens).last_hidden_state)


def test_gelu_activation_matches_transformers():
    ours, theirs = random_pair({**SMALL, "hidden_act": "gelu"})
    ids = torch.randint(0, 49408, (2, 77), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(ours(ids), theirs(input_ids=ids).last_hidden_state)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"hidden_sise": 64}, "unknown field(s) ['hidden_sise']"),
        ({"dropout": 0.1}, "dropout must be 0"),
        ({"hidden_act": "relu"}, "hidden_act 'relu'"),
        ({"hidden_size": 64, "num_attention_heads": 5}, "not a multiple of num_attention_heads 5"),
    ],
)
def test_config_errors_name_the_field(fields, message):
    with pytest.raises(ValueError) as err:
        CLIPTextConfig.from_fields(fields)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_dropout_zero_accepted():
    """transformers-style configs spell out zero dropout; that is the model we have."""
    assert CLIPTextConfig.from_fields({"dropout": 0.0, "attention_dropout": 0.0}) == CLIPTextConfig()


def test_inference_does_not_import_transformers():
    """Generating from the tiny model loads neither transformers nor Lightning."""
    code = (
        "import sys; from ldm.generation.load import load_config; from ldm.util import instantiate_from_config\n"
        "import ldm.cli.txt2img, ldm.generation.generate\n"
        "cfg = load_config('tests/configs/tiny.yaml')\n"
        "m = instantiate_from_config(cfg.model)\n"
        "z = m.cond_stage_model.encode(['a cat'])\n"
        "assert z.shape == (1, 77, 32), z.shape\n"
        "print(sorted(k for k in sys.modules if k.split('.')[0] in ('transformers', 'pytorch_lightning')))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
