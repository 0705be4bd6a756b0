"""LoRA training (ldm.training.lora) on a frozen tiny model: only the LoRA learns, and its kohya export, loaded by
`--lora`'s code, gives the trained model's outputs."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.adapters import apply_adapters
from ldm.data.digits import DigitsDataset
from ldm.generation.load import load_model
from ldm.speed.runtime import resolve_runtime
from ldm.training.lora import LoraTrainer, export_kohya

from .conftest import TINY_CONFIG


def trainer(tiny_ckpt) -> LoraTrainer:
    params = OmegaConf.to_container(OmegaConf.load(TINY_CONFIG).model.params, resolve=True)
    lora = {"rank": 3, "alpha": 6, "targets": ["attn2", "proj_in", "ff"]}
    return LoraTrainer(base_ckpt=str(tiny_ckpt), lora=lora, base_learning_rate=1e-2, **params)


def test_only_the_lora_learns_and_its_export_is_what_was_trained(tmp_path, tiny_ckpt):
    torch.manual_seed(0)
    module = trainer(tiny_ckpt)
    base = {k: v.clone() for k, v in module.state_dict().items() if not k.startswith("lora_layers.")}
    unet = module.model.diffusion_model
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 600]), torch.randn(2, 77, 32)
    with torch.no_grad():
        start = unet(x, t, ctx)
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("lora_layers.") for n in trainable)
    opt = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)
    batch = {"image": torch.rand(4, 3, 64, 64) * 2 - 1, "caption": ["inverted a cat"] * 4}
    for _ in range(3):
        opt.zero_grad()
        module.loss(batch, drop_captions=False).backward()
        opt.step()
    assert all(torch.equal(v, base[k]) for k, v in module.state_dict().items() if k in base)
    with torch.no_grad():
        trained = unet(x, t, ctx)
    assert ((trained - start).norm() / start.norm()) > 1e-3

    save_file(export_kohya(module.state_dict()), tmp_path / "trained.safetensors")
    config = OmegaConf.load(TINY_CONFIG)
    model = load_model(config, tiny_ckpt, resolve_runtime(config, "cpu", "full", False, None), verbose=False)
    with torch.no_grad():
        assert torch.equal(model.model.diffusion_model(x, t, ctx), start)  # the untrained LoRA was a no-op
        with apply_adapters(model, loras=[tmp_path / "trained.safetensors"]):
            merged = model.model.diffusion_model(x, t, ctx)
    assert ((merged - trained).norm() / trained.norm()) < 1e-5


def test_styled_digits_lead_their_caption_with_the_trigger():
    data = DigitsDataset("val", size=16, style="inverted", trigger="inverted", style_fraction=1.0)
    plain = DigitsDataset("val", size=16)
    item = data[0]
    assert item["caption"].startswith("inverted ") and torch.equal(item["image"], -plain.images[0])
