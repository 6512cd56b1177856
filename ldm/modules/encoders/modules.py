"""Frozen text encoders that turn prompts into the cross-attention context of the diffusion UNet.

`FrozenCLIPEmbedder` is SD1.5's CLIP ViT-L/14 text model (and SDXL's first encoder), `FrozenOpenCLIPEmbedder`
SD2.x's OpenCLIP ViT-H/14 text tower and `FrozenOpenCLIPEmbedder2` SDXL's OpenCLIP ViT-bigG/14 one. All are built
here from scratch, with parameter names that match the original checkpoints, so that weights load straight from an
SD checkpoint without transformers or open_clip and without any network access.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.errors import InputError
from ldm.modules.encoders.tokenizer import END_TOKEN_ID, CLIPTokenizer


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Causal multi-head attention on `[B, T, D]` projections; returns `[B, T, D]`."""
    b, t, d = q.shape
    q, k, v = (x.view(b, t, heads, d // heads).transpose(1, 2) for x in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(b, t, d)


class _FrozenMixin(nn.Module):
    """Freezing that survives a parent's `.train()`: the whole diffusion model is trained, the encoder not."""

    frozen: bool = False

    def freeze(self) -> None:
        """Put the module in eval mode for good and stop gradients to its parameters."""
        self.frozen = True
        self.train(False)
        for p in self.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> _FrozenMixin:
        return super().train(mode and not self.frozen)


# ---------------------------------------------------------------------------------------------------------
# SD1.5: CLIP ViT-L/14 text model, named as transformers 4.x named it (under transformer.text_model)
# ---------------------------------------------------------------------------------------------------------


class _CLIPEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, max_positions: int) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, hidden_size)
        self.position_embedding = nn.Embedding(max_positions, hidden_size)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Some checkpoints carry `position_ids` (always 0..76, sometimes saved as corrupted floats): the
        # positions are recomputed in forward, so the key is dropped and strict loading still succeeds.
        state_dict.pop(prefix + "position_ids", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class _CLIPAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise InputError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _causal_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.num_heads)
        return self.out_proj(out)


class _CLIPMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, intermediate_size)
        self.fc2 = nn.Linear(intermediate_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, the activation OpenAI's CLIP trained with


class _CLIPEncoderLayer(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = _CLIPAttention(hidden_size, num_heads)
        self.layer_norm2 = nn.LayerNorm(hidden_size, eps=eps)
        self.mlp = _CLIPMLP(hidden_size, intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class _CLIPEncoder(nn.Module):
    def __init__(self, num_layers: int, **layer_kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_CLIPEncoderLayer(**layer_kwargs) for _ in range(num_layers))


class _CLIPTextTransformer(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        intermediate_size: int,
        num_layers: int,
        num_heads: int,
        max_positions: int,
        eps: float,
    ) -> None:
        super().__init__()
        self.embeddings = _CLIPEmbeddings(vocab_size, hidden_size, max_positions)
        self.encoder = _CLIPEncoder(
            num_layers,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_heads=num_heads,
            eps=eps,
        )
        self.final_layer_norm = nn.LayerNorm(hidden_size, eps=eps)

    def hidden_state(self, input_ids: torch.Tensor, num_layers: int) -> torch.Tensor:
        """Hidden state after the first `num_layers` layers (0 = embeddings), without the final norm."""
        x = self.embeddings(input_ids)
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
        return x


class _CLIPTextModel(nn.Module):
    """Holds the `text_model.` level of the checkpoint names."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.text_model = _CLIPTextTransformer(**kwargs)


class FrozenCLIPEmbedder(_FrozenMixin):
    """SD1.5's text encoder: CLIP ViT-L/14's text transformer, loaded from the SD checkpoint itself.

    `layer`: "last" (last hidden state after the final norm, SD1.5's default), "pooled" (the end token's
    final state, `[B, 1, D]`), "hidden" (hidden_states[layer_idx] without the final norm, as the original
    ldm did) or "penultimate" (second-to-last hidden state through the final norm: "clip skip 2").
    `version` only documents which weights fit; nothing is ever downloaded. `device` is accepted for config
    compatibility; tokens follow the weights' device.
    """

    LAYERS = ("last", "pooled", "hidden", "penultimate")

    def __init__(
        self,
        version: str = "openai/clip-vit-large-patch14",
        device: str | torch.device = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        layer_idx: int | None = None,
        *,
        hidden_size: int = 768,
        intermediate_size: int = 3072,
        num_hidden_layers: int = 12,
        num_attention_heads: int = 12,
        vocab_size: int = 49408,
        layer_norm_eps: float = 1e-5,
        vocab_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise InputError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        if layer == "hidden":
            if layer_idx is None or not -(num_hidden_layers + 1) <= layer_idx <= num_hidden_layers:
                bound = num_hidden_layers
                raise InputError(
                    f"layer='hidden' needs layer_idx in [-{bound + 1}, {bound}], got {layer_idx}"
                )
        self.version = version
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        self.vocab_path = vocab_path
        self._tokenizer: CLIPTokenizer | None = None
        self.transformer = _CLIPTextModel(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_layers=num_hidden_layers,
            num_heads=num_attention_heads,
            max_positions=max_length,
            eps=layer_norm_eps,
        )
        if freeze:
            self.freeze()

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Ids `[B, max_length]` padded with the end token, as transformers' CLIPTokenizer gives them."""
        if self._tokenizer is None:  # built on first use, so weights load even where the vocab is missing
            self._tokenizer = CLIPTokenizer(END_TOKEN_ID, self.max_length, self.vocab_path)
        return self._tokenizer(text)

    def encode_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Context for the UNet from token ids: `[B, T, D]` (`[B, 1, D]` for layer="pooled")."""
        model = self.transformer.text_model
        input_ids = input_ids.to(self.device)
        num_layers = len(model.encoder.layers)
        if self.layer == "hidden":
            assert self.layer_idx is not None
            return model.hidden_state(input_ids, self.layer_idx % (num_layers + 1))
        if self.layer == "penultimate":
            return model.final_layer_norm(model.hidden_state(input_ids, num_layers - 1))
        z = model.final_layer_norm(model.hidden_state(input_ids, num_layers))
        if self.layer == "pooled":
            eos = (input_ids == END_TOKEN_ID).int().argmax(dim=-1)
            return z[torch.arange(z.shape[0], device=z.device), eos].unsqueeze(1)
        return z

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(text))

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        return self(text)


# ---------------------------------------------------------------------------------------------------------
# SD2.x: OpenCLIP ViT-H/14 text tower, named as open_clip names it (cond_stage_model.model)
# ---------------------------------------------------------------------------------------------------------


class _OpenCLIPAttention(nn.Module):
    """Packed-projection attention named like `nn.MultiheadAttention` (`in_proj_weight`, `out_proj`)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise InputError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(_causal_attention(q, k, v, self.heads))


class _OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class _ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = _OpenCLIPAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = _OpenCLIPMLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _OpenCLIPTransformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(
            _ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers)
        )


class _OpenCLIPTextTower(nn.Module):
    """open_clip's CLIP model minus the visual tower; `text_projection`/`logit_scale` only hold weights."""

    def __init__(
        self,
        vocab_size: int,
        context_length: int,
        width: int,
        layers: int,
        heads: int,
        mlp_ratio: float,
        embed_dim: int,
    ) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.transformer = _OpenCLIPTransformer(width, layers, heads, mlp_ratio)
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=width**-0.5)

    def run_blocks(self, tokens: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """The output of the first `num_blocks` residual blocks, before `ln_final`: `[B, T, width]`."""
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.transformer.resblocks[:num_blocks]:
            x = block(x)
        return x

    def encode(self, tokens: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Run the first `num_blocks` residual blocks, then `ln_final`: `[B, T, width]`."""
        return self.ln_final(self.run_blocks(tokens, num_blocks))

    def pooled(self, tokens: torch.Tensor, final_state: torch.Tensor) -> torch.Tensor:
        """CLIP's text embedding: the end token's final state (the largest id of each row) through the projection."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        return final_state[rows, tokens.argmax(dim=-1)] @ self.text_projection


class FrozenOpenCLIPEmbedder(_FrozenMixin):
    """SD2.x's text encoder: OpenCLIP ViT-H/14's text tower, loaded from the SD checkpoint itself.

    `layer`: "last" (all blocks, then ln_final) or "penultimate" (all blocks but the last, then ln_final;
    what SD2.x was trained with). `arch`/`version` only document which weights fit; nothing is downloaded.
    `embed_dim` is the width of `text_projection` (1024 for ViT-H/14), unused by the outputs but loaded.
    """

    LAYERS = ("last", "penultimate")

    def __init__(
        self,
        arch: str = "ViT-H-14",
        version: str = "laion2b_s32b_b79k",
        device: str | torch.device = "cuda",
        max_length: int = 77,
        freeze: bool = True,
        layer: str = "last",
        *,
        width: int = 1024,
        layers: int = 24,
        heads: int = 16,
        vocab_size: int = 49408,
        mlp_ratio: float = 4.0,
        embed_dim: int = 1024,
        vocab_path: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__()
        if layer not in self.LAYERS:
            raise InputError(f"layer must be one of {self.LAYERS}, got {layer!r}")
        self.arch = arch
        self.version = version
        self.max_length = max_length
        self.layer = layer
        self.vocab_path = vocab_path
        self._tokenizer: CLIPTokenizer | None = None
        self.model = _OpenCLIPTextTower(vocab_size, max_length, width, layers, heads, mlp_ratio, embed_dim)
        if freeze:
            self.freeze()

    @property
    def device(self) -> torch.device:
        return self.model.token_embedding.weight.device

    def tokenize(self, text: str | Sequence[str]) -> torch.Tensor:
        """Ids `[B, max_length]` padded with 0, as open_clip's tokenizer gives them."""
        if self._tokenizer is None:  # built on first use, so weights load even where the vocab is missing
            self._tokenizer = CLIPTokenizer(0, self.max_length, self.vocab_path)
        return self._tokenizer(text)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Context for the UNet from token ids: `[B, T, width]`."""
        num_blocks = len(self.model.transformer.resblocks) - (1 if self.layer == "penultimate" else 0)
        return self.model.encode(tokens.to(self.device), num_blocks)

    def forward(self, text: str | Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(text))

    def encode(self, text: str | Sequence[str]) -> torch.Tensor:
        return self(text)


class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """SDXL's second text encoder: OpenCLIP ViT-bigG/14's text tower, as sgm's embedder of that name runs it.

    Unlike SD2.x's, the context (`layer="penultimate"`: the input of the last block) skips `ln_final`, and the
    encoder also returns the pooled text embedding (`ln_final` of the last block's output at the end token, times
    `text_projection`), which SDXL feeds to the UNet's vector conditioning. `encode_tokens` returns
    `(context, pooled)`; `legacy=True` (SD2.x's behaviour) and `always_return_pooled=False` are refused, as sgm
    never combines them with SDXL.
    """

    def __init__(self, arch: str = "ViT-bigG-14", version: str = "laion2b_s39b_b160k", *args: Any,
                 layer: str = "penultimate", always_return_pooled: bool = True, legacy: bool = False,
                 width: int = 1280, layers: int = 32, heads: int = 20, embed_dim: int = 1280, **kwargs: Any) -> None:
        if legacy or not always_return_pooled:
            raise InputError("FrozenOpenCLIPEmbedder2 is SDXL's encoder: legacy=False and always_return_pooled=True; "
                             "SD2.x's is FrozenOpenCLIPEmbedder")
        super().__init__(arch, version, *args, layer=layer, width=width, layers=layers, heads=heads,
                         embed_dim=embed_dim, **kwargs)

    def encode_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """(context `[B, T, width]`, pooled `[B, embed_dim]`) from token ids."""
        tokens = tokens.to(self.device)
        blocks = len(self.model.transformer.resblocks)
        penultimate = self.model.run_blocks(tokens, blocks - 1)
        last = self.model.transformer.resblocks[-1](penultimate)
        context = penultimate if self.layer == "penultimate" else last  # neither through ln_final, as sgm's
        return context, self.model.pooled(tokens, self.model.ln_final(last))
