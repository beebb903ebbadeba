"""The CLIP text encoder: 77 token ids -> 77 context vectors that the UNet attends to.

SD 1.x uses OpenAI's CLIP ViT-L/14 text tower, SD 2.x OpenCLIP's ViT-H/14 text tower. Both are the
same pre-LayerNorm transformer with a causal mask; they differ in size, in the MLP activation, and
in which layer SD reads: SD 1 takes the last layer, SD 2 the penultimate one. We build SD 2's tower
with 23 of its 24 layers, so "the last layer we have, then the final LayerNorm" is right for both
(diffusers' SD 2 text encoder config also says 23 layers).

SDXL uses two towers, CLIP ViT-L/14 (as SD 1) and OpenCLIP ViT-bigG/14, and reads both at their
penultimate layer without the final LayerNorm; their features are concatenated into the UNet's
context. bigG also gives a pooled vector for the UNet's added conditioning: its last layer, final
LayerNorm, at the end-of-text token, times `text_projection`. Both towers are built whole, as their
files hold them; `skip_last` says how many last layers the context leaves out.

Module names equal the keys of transformers' CLIPTextModel (`embeddings.token_embedding.weight`,
`encoder.layers.0.self_attn.q_proj.weight`, ...), the layout of SD 1 single files and of every
diffusers folder. OpenCLIP's names (SD 2 single files) are renamed in minidb/convert.py.

Legend: B batch, L tokens (77), C width, H heads, D head dim.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from minidb.attention import attention
from minidb.tokenizer import EOS


@dataclass
class TextEncoderConfig:
    vocab_size: int = 49408  # CLIP BPE: 256 bytes x2, 48,894 merges, BOS, EOS
    max_length: int = 77  # CLIP's context length; SD always feeds all 77 positions
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"  # OpenAI CLIP: quick_gelu; OpenCLIP ViT-H: gelu
    skip_last: int = 0  # SDXL: 1, the context is the penultimate layer's output ...
    final_norm: bool = True  # ... without the final LayerNorm (SD 1.x and 2.x apply it)
    projection: int = 0  # SDXL's bigG: width of the pooled output's text_projection; 0: no pooled output


SD1 = TextEncoderConfig()
# ViT-H/14 text tower has 24 layers; SD 2 reads the 23rd ("penultimate"), so we build 23.
SD2 = TextEncoderConfig(width=1024, layers=23, heads=16, mlp_width=4096, activation="gelu")
# SDXL's two (sgm's sd_xl_base.yaml: FrozenCLIPEmbedder and FrozenOpenCLIPEmbedder2, layer "penultimate")
SDXL_L = TextEncoderConfig(skip_last=1, final_norm=False)
SDXL_G = TextEncoderConfig(width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", skip_last=1,
                           final_norm=False, projection=1280)
TINY = TextEncoderConfig(width=32, layers=2, heads=4, mlp_width=37)


def quick_gelu(x):
    # OpenAI CLIP's sigmoid approximation of GELU; 1.702 is from their model.py.
    return x * torch.sigmoid(1.702 * x)


class Embeddings(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_length, cfg.width)  # learned, not sinusoidal

    def forward(self, ids):  # (B, L) -> (B, L, C)
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class SelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        if cfg.width % cfg.heads:  # a damaged config: the weights would load, and the first prompt fail
            raise ValueError(f"width {cfg.width} does not split into {cfg.heads} heads")
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        q, k, v = (rearrange(p(x), "b l (h d) -> b h l d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = attention(q, k, v, causal=True)  # CLIP's text tower is causal, like a language model
        return self.out_proj(rearrange(out, "b h l d -> b l (h d)"))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.act = quick_gelu if cfg.activation == "quick_gelu" else F.gelu
        self.fc1 = nn.Linear(cfg.width, cfg.mlp_width)
        self.fc2 = nn.Linear(cfg.mlp_width, cfg.width)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.self_attn = SelfAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.layers))
        self.gradient_checkpointing = False  # training switch: recompute activations in backward

    def forward(self, x, start=0, stop=None):  # layers start..stop-1 (all by default)
        for layer in self.layers[start:stop]:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)
        if cfg.projection:
            self.text_projection = nn.Linear(cfg.width, cfg.projection, bias=False)

    def forward(self, ids, pooled=False):
        """(B, 77) token ids -> (B, 77, C) context for the UNet's cross-attention; with pooled=True
        also the (B, projection) pooled vector (SDXL's bigG)."""
        stop = self.cfg.layers - self.cfg.skip_last
        h = self.encoder(self.embeddings(ids), stop=stop)
        context = self.final_layer_norm(h) if self.cfg.final_norm else h
        if not pooled:
            return context
        last = self.final_layer_norm(self.encoder(h, start=stop))
        # the first end-of-text token's vector. OpenAI's and OpenCLIP's code find it by argmax, as the highest
        # id in CLIP's vocabulary, but a new word's id (49408 on) is higher: pooled there, an embedding would
        # condition the UNet on another vector than AUTOMATIC1111, ComfyUI and kohya give it, which all pool
        # at the end-of-text token. So does transformers where a config's eos_token_id is 49407 (minidb's
        # exports); SDXL's own configs say 2, which keeps the argmax (diffusers pools such a prompt at the word)
        eos = (ids == EOS).int().argmax(dim=-1)  # (B,): the first match
        return context, self.text_projection(last[torch.arange(len(ids), device=ids.device), eos])
