"""CLIP's text transformer (the tower of openai/clip-vit-large-patch14 that SD v1 conditions on), in plain PyTorch.

Attribute paths equal the checkpoint's keys below `cond_stage_model.transformer.`, so an original SD file
loads with no rename table. The arithmetic follows transformers' `CLIPTextModel` with eager attention, op for
op, so the last hidden state is the same bit for bit (`tests/test_clip_text.py`): the original code ran that
class. Writing it here spares every run the import of transformers (a quarter of a GiB resident, seconds of
start-up) for 150 lines of arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class CLIPTextConfig:
    """The defaults are ViT-L/14's text tower; configs override fields for small test and demo models.

    `projection_dim` and the bos/eos/pad ids only shape CLIP's pooled output, which SD does not use; they are
    accepted so configs written for transformers' CLIPTextConfig still load, and otherwise ignored.
    """

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 768
    bos_token_id: int = 0
    eos_token_id: int = 2
    pad_token_id: int = 1

    @classmethod
    def from_fields(cls, values: dict[str, Any]) -> CLIPTextConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - _ZERO_ONLY)
        if unknown:
            raise ValueError(f"text_config: unknown field(s) {unknown}; known: {sorted(known)}")
        for name in _ZERO_ONLY & set(values):
            if values[name]:
                raise ValueError(f"text_config: {name} must be 0 (this CLIP text model has no dropout)")
        config = cls(**{k: v for k, v in values.items() if k in known})
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"text_config: hidden_act {config.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if config.hidden_size % config.num_attention_heads:
            raise ValueError(
                f"text_config: hidden_size {config.hidden_size} is not a multiple of "
                f"num_attention_heads {config.num_attention_heads}"
            )
        return config


# transformers' dropout fields: training-time only, and zero in every CLIP config SD uses.
_ZERO_ONLY = {"dropout", "attention_dropout"}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU, which its weights were trained with."""
    return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        # Saved by transformers 4.19 (so found in sd-v1-4.ckpt), never read from a file: always arange.
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[-1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"{length} tokens exceed the text model's {self.position_embedding.num_embeddings}")
        return self.token_embedding(input_ids) + self.position_embedding(self.position_ids[:, :length])


class CLIPAttention(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        # k, v, q: the checkpoint's key order.
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, self.heads, self.head_dim).transpose(1, 2) for p in self.projections())
        # Eager attention as the original ran it: scale after the product, softmax in float32.
        weights = torch.matmul(q, k.transpose(-1, -2)) * self.scale + mask
        weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(weights, v).transpose(1, 2).contiguous()
        return self.out_proj(out.reshape(b, n, -1).contiguous())

    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        return self.q_proj, self.k_proj, self.v_proj


class CLIPMLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """Token ids [B, L] to the last hidden state [B, L, C], the final layer norm applied (SD v1's context)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(input_ids)
        length = input_ids.shape[-1]
        # Causal: each token sees itself and the tokens before it.
        mask = torch.full((length, length), float("-inf"), dtype=x.dtype, device=x.device).triu(1)
        for layer in self.encoder.layers:
            x = layer(x, mask)
        return self.final_layer_norm(x)
