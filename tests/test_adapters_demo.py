"""The committed demo LoRA (models/demo/digits-italic-lora.safetensors, trained by main.py from
configs/demo/digits-lora.yaml): with it and the trigger word "italic" the digits lean right and are still the
prompted digit; at weight 0 the style is absent; and the committed config is the recipe of the committed file.

The measurement is scripts/digits_lora_eval.py's (the table in docs/lora.md), on 20 samples per case instead of
100. Thresholds, from its 100-sample table: see docs/lora.md ("Evaluation").
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from ldm.data.digits import DigitsDataset, deskew, slant
from ldm.generation.load import load_config
from ldm.training.lora import lora_layer_names
from ldm.util import instantiate_from_config

from .conftest import REPO

LORA = REPO / "models" / "demo" / "digits-italic-lora.safetensors"
LORA_CONFIG = REPO / "configs" / "demo" / "digits-lora.yaml"


@pytest.fixture(scope="module")
def lora_eval():
    spec = importlib.util.spec_from_file_location("ldm_digits_lora_eval", REPO / "scripts" / "digits_lora_eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_italic_training_digits_lean_by_the_style_and_lead_with_the_trigger():
    data = DigitsDataset("val", size=32, style="italic", trigger="italic", style_fraction=1.0)
    assert data[0]["caption"].startswith("italic ")
    upright, styled = slant(data.images), slant(data.styled)
    assert upright.abs().mean() < 0.15 and slant(deskew(data.images)).abs().max() < 0.01
    assert 0.4 < styled.min() and styled.max() < 0.501  # one slant for every digit, under 0.5 where ink is cut


def test_the_committed_config_is_the_recipe_of_the_committed_lora():
    spec = OmegaConf.load(LORA_CONFIG)
    rank, alpha, targets = spec.lora.rank, spec.lora.alpha, tuple(spec.lora.targets)
    assert (spec.data.params.style, spec.data.params.trigger) == ("italic", "italic")
    unet = instantiate_from_config(load_config(REPO / "configs" / "demo" / "digits.yaml").model.params.unet_config)
    expected = {"lora_unet_" + name.replace(".", "_") for name in lora_layer_names(unet, targets)}
    tensors = load_file(LORA)
    assert {key.rpartition(".lora_down")[0] for key in tensors if ".lora_down." in key} == expected
    assert {key.rpartition(".alpha")[0] for key in tensors if key.endswith(".alpha")} == expected
    assert all(v.shape[0] == rank for k, v in tensors.items() if ".lora_down." in k)
    assert all(float(v) == alpha for k, v in tensors.items() if k.endswith(".alpha"))
    assert all(v.dtype == torch.float16 for k, v in tensors.items() if not k.endswith(".alpha"))
    assert LORA.stat().st_size < 500_000


def test_the_lora_and_its_trigger_draw_italic_digits_and_nothing_else_does(lora_eval):
    model, runtime, classifier = lora_eval.load_demo(threads=1)
    results = {}
    for case, weight, triggered in lora_eval.CASES[:3]:  # LoRA 1.0 with and without the trigger, LoRA 0.0
        template = f"italic {lora_eval.PLAIN}" if triggered else lora_eval.PLAIN
        with lora_eval.apply_adapters(model, loras=[(LORA, weight)]):
            results[case] = lora_eval.measure(model, runtime, classifier, template, per_digit=2, seed=42)
    styled, untriggered, weight0 = results.values()
    assert styled["italic"] >= 0.8 and styled["digit"] >= 0.8, results
    assert weight0["italic"] <= 0.2 and untriggered["italic"] <= 0.2, results
    assert weight0["digit"] >= 0.8 and untriggered["digit"] >= 0.8, results
