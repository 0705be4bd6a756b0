"""Shared fixtures: the reference data in tests/reference, a tiny model, and cached fake checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
# Measured from the original code: its state-dict layout and one txt2img case (README.md there says how).
REFERENCE = REPO / "tests" / "reference"
ORACLE = REFERENCE / "oracle" / "plms5_s42"
MANIFEST = REFERENCE / "sd-v1-state-dict.json"
FAKE_DIGEST = REFERENCE / "fake-ckpt-seed0-digest.json"
MAKE_FAKE = REPO / "scripts" / "make_fake_ckpt.py"
TINY_CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
CPU_CONFIG = REPO / "configs" / "stable-diffusion" / "v1-inference-cpu.yaml"
# Tiny models gain nothing from threads, and two OpenMP threads slow down 100-fold when another
# process holds a core; full-size tests ask for all cores with the `all_threads` fixture.
torch.set_num_threads(1)

# Full-size fake checkpoints take a minute each to write: keep them outside the repo, across runs.
CACHE = Path(os.environ.get("LDM_TEST_CACHE", "/tmp/ldm-test-cache"))


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights with every tensor non-trivial (norms not 1/0, zero-initialised convs not zero),
    so that a skipped or misplaced weight changes outputs."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, t in model.state_dict().items():
        if not t.is_floating_point() or key in ("betas",) or "alphas" in key or "posterior" in key:
            sd[key] = t.clone()
        elif t.ndim >= 2:
            fan_in = t[0].numel()
            scale = 0.02 if "embedding" in key else fan_in**-0.5
            sd[key] = torch.randn(t.shape, generator=g) * scale
        elif key.endswith(".weight"):
            sd[key] = 1 + 0.05 * torch.randn(t.shape, generator=g)
        else:
            sd[key] = 0.02 * torch.randn(t.shape, generator=g)
    return sd


@pytest.fixture(scope="module")
def all_threads():
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_config():
    return OmegaConf.load(TINY_CONFIG)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory, tiny_config) -> Path:
    """A tiny model's checkpoint in the original Lightning layout."""
    model = instantiate_from_config(tiny_config.model)
    path = tmp_path_factory.mktemp("tiny") / "tiny.ckpt"
    torch.save({"state_dict": random_state_dict(model), "global_step": 1}, path)
    return path


def fake_full_ckpt(*flags: str) -> Path:
    """scripts/make_fake_ckpt.py's full-size seed-0 checkpoint with `flags`, written once and cached."""
    name = "sd-fake-s0" + "".join(f.replace("--", "-") for f in flags)
    path = CACHE / (name + (".safetensors" if "--safetensors" in flags else ".ckpt"))
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(".part-" + path.name)
        subprocess.run(
            [sys.executable, str(MAKE_FAKE), "--out", str(tmp), "--seed", "0", *flags],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        tmp.rename(path)
    return path
