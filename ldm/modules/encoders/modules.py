"""The frozen CLIP ViT-L/14 text encoder that turns prompts into the UNet's 77x768 context."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.modules.encoders.clip_text import CLIPTextConfig, CLIPTextTransformer
from ldm.modules.encoders.tokenizer import get_tokenizer


class _TextTower(nn.Module):
    """Holds the CLIP text model under `.text_model`, the level real SD checkpoints name
    (`cond_stage_model.transformer.text_model.*`, transformers 4.19's CLIPTextModel layout)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(config)


class FrozenCLIPEmbedder(nn.Module):
    """Tokenize (pad with EOS to 77) and return CLIP's last hidden state, as SD v1 conditions on it.

    `version`, `device` and `max_length` are the original's parameters; `version` must name the
    ViT-L/14 tower (its weights come from the SD checkpoint, never from a hub). `text_config`
    overrides fields of the built-in config (`CLIPTextConfig`), for small test and demo models.
    """

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: Any = None,
        max_length: int = 77,
        text_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if version != "openai/clip-vit-large-patch14":
            raise ValueError(f"FrozenCLIPEmbedder: only openai/clip-vit-large-patch14 is built in, not {version!r}")
        config = CLIPTextConfig.from_fields(dict(text_config or {}))
        if max_length > config.max_position_embeddings:
            raise ValueError(
                f"max_length {max_length} exceeds the text model's {config.max_position_embeddings} positions"
            )
        self.max_length = max_length
        self.tokenizer = get_tokenizer()
        self.transformer = _TextTower(config)
        self.requires_grad_(False)

    def restore_buffers(self, device: torch.device) -> None:
        """Recreate the non-persistent position ids, which a weights-only (meta-device) load leaves empty."""
        emb = self.transformer.text_model.embeddings
        if emb.position_ids.is_meta:
            emb.position_ids = torch.arange(emb.position_embedding.num_embeddings, device=device)[None]

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.tokenizer(texts, max_length=self.max_length)

    def forward(self, texts: list[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenize(list(texts)).to(self.transformer.text_model.embeddings.token_embedding.weight.device)
        return self.transformer.text_model(tokens)

    def encode(self, texts: list[str] | str) -> torch.Tensor:
        return self(texts)
