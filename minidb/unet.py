"""The denoising UNet: (noisy latents x_t, timesteps t, text context) -> predicted noise ε (or v).

The UNet is a table of blocks, written exactly as the original CompVis/Stability checkpoints name it
(keys under `model.diffusion_model.`), so a single-file checkpoint loads with no renaming:

    time_embed      sinusoidal timestep features -> MLP
    input_blocks    conv_in, then per level: N x [ResBlock (+ SpatialTransformer)], then a Downsample
    middle_block    ResBlock, SpatialTransformer, ResBlock
    output_blocks   per level, from the bottom: N+1 x [ResBlock on concat(h, skip) (+ SpatialTransformer)],
                    then an Upsample
    out             GroupNorm, SiLU, conv_out

Parameterless layers (SiLU, Dropout) stay in their nn.Sequential slots so that the indices match
the checkpoint (`in_layers.2` is a conv because `in_layers.1` is a SiLU). diffusers' names
(down_blocks.0.resnets.1, ...) are reached by the rename rules in minidb/convert.py.

Legend: B batch, C channels, H/W latent height/width, L = H*W pixels as tokens, T text tokens (77),
E time-embedding width.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from minidb.attention import attention


@dataclass
class UNetConfig:
    in_channels: int = 4  # latent channels of the VAE
    out_channels: int = 4
    model_channels: int = 320  # channels of the first level; time embedding is 4x this
    channel_mult: tuple = (1, 2, 4, 4)  # per level: 320, 640, 1280, 1280
    num_res_blocks: int = 2  # ResBlocks per level on the way down (one more on the way up)
    attention_levels: tuple = (0, 1, 2)  # levels with cross-attention; SD skips the 8x-down one
    num_heads: int = 8  # SD 1: a fixed number of heads (head dims 40, 80, 160) ...
    head_dim: int = 0  # ... SD 2: a fixed head dim of 64 instead (5, 10, 20 heads); 0 = unused
    context_dim: int = 768  # width of the text encoder's output
    linear_proj: bool = False  # SD 2 uses Linear proj_in/proj_out; SD 1 uses 1x1 convs
    upcast_attention: bool = False  # SD 2.1: attention in fp32 (fp16 overflows)
    sample_size: int = 64  # latent side it was trained at: 64 -> 512 px; SD 2 768-v models: 96; SDXL: 128
    transformer_depth: tuple = ()  # transformer blocks per level's SpatialTransformer (SDXL: 2, 10); (): 1 each
    transformer_depth_middle: int = 1  # the same in the middle block (SDXL: 10)
    adm_in_channels: int = 0  # SDXL's added conditioning `y`: pooled text + 6 size features (1280 + 6 x 256); 0: none

    def heads_for(self, ch):  # -> (heads, head dim) at a level with `ch` channels
        if self.head_dim:
            return ch // self.head_dim, self.head_dim
        return self.num_heads, ch // self.num_heads

    def depth_at(self, level):
        return self.transformer_depth[level] if self.transformer_depth else 1


SD1 = UNetConfig()
SD2 = UNetConfig(num_heads=0, head_dim=64, context_dim=1024, linear_proj=True, upcast_attention=True)
# SDXL base 1.0 (sgm's sd_xl_base.yaml): three levels, no attention in the first, deep transformers below;
# context = CLIP-L's 768 + OpenCLIP-bigG's 1280 features side by side.
SDXL = UNetConfig(channel_mult=(1, 2, 4), attention_levels=(1, 2), num_heads=0, head_dim=64, context_dim=2048,
                  linear_proj=True, sample_size=128, transformer_depth=(0, 2, 10), transformer_depth_middle=10,
                  adm_in_channels=2816)
TINY = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(0, 1),
                  num_heads=2, context_dim=32)


def Norm(c):
    return nn.GroupNorm(32, c, eps=1e-5)  # GroupNorm32 in ldm's openaimodel.py


SIZE_FEATURES = 256  # per size number: sgm's ConcatTimestepEmbedderND outdim, diffusers' addition_time_embed_dim


def size_features(time_ids):
    """SDXL's micro-conditioning, the image's original size, crop offset and target size (B, 6), as
    sinusoidal features like the timestep's (sgm's ConcatTimestepEmbedderND, diffusers' add_time_proj):
    (B, 6) -> (B, 6 * 256)."""
    return timestep_embedding(time_ids.flatten(), SIZE_FEATURES).reshape(len(time_ids), -1)


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal features of (possibly fractional) timesteps, cos half first. (B,) -> (B, dim)

    As in ldm's `timestep_embedding` (and diffusers with flip_sin_to_cos=True, freq_shift=0):
    frequencies 10000^(-i/half) for i in 0..half-1.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    """Two 3x3 convs with the time embedding added in between, plus a residual connection."""

    def __init__(self, c_in, c_out, emb_dim):
        super().__init__()
        self.in_layers = nn.Sequential(Norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, c_out))
        self.out_layers = nn.Sequential(Norm(c_out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(c_out, c_out, 3, padding=1))
        # A 1x1 conv matches channels for the residual when they change.
        self.skip_connection = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):  # x (B, C_in, H, W), emb (B, E) -> (B, C_out, H, W)
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C_out) -> broadcast over pixels
        return self.skip_connection(x) + self.out_layers(h)


class CrossAttention(nn.Module):
    """Multi-head attention from pixels to a context: the pixels themselves, or the text."""

    def __init__(self, dim, context_dim, heads, head_dim, upcast):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context):  # x (B, L, C), context (B, T, C_ctx) -> (B, L, C)
        q = rearrange(self.to_q(x), "b l (h d) -> b h l d", h=self.heads)
        k = rearrange(self.to_k(context), "b t (h d) -> b h t d", h=self.heads)
        v = rearrange(self.to_v(context), "b t (h d) -> b h t d", h=self.heads)
        out = attention(q, k, v, upcast=self.upcast)  # (B, heads, L, D)
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))


class GEGLU(nn.Module):
    """Gated GELU (Shazeer 2020): one projection gives both the value and its gate."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Self-attention over pixels, cross-attention to the text, feed-forward; pre-LayerNorm."""

    def __init__(self, dim, context_dim, heads, head_dim, upcast):
        super().__init__()
        self.attn1 = CrossAttention(dim, dim, heads, head_dim, upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim, upcast)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x, context):
        # Autocast on a GPU returns a LayerNorm in fp32, and each layer that reads it would cast it back
        # (six for norm1 with LoRA adapters): cast it once, to the dtype the layers compute in anyway.
        n = self.norm1(x).to(x.dtype)
        x = x + self.attn1(n, n)  # self-attention: the pixels attend to each other
        x = x + self.attn2(self.norm2(x).to(x.dtype), context)
        return x + self.ff(self.norm3(x).to(x.dtype))


class SpatialTransformer(nn.Module):
    """Treats each pixel of a feature map as a token and runs a transformer block over them."""

    def __init__(self, ch, cfg: UNetConfig, depth=1):
        super().__init__()
        heads, head_dim = cfg.heads_for(ch)
        self.linear_proj = cfg.linear_proj
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)  # eps 1e-6 here, unlike the ResBlocks
        self.proj_in = nn.Linear(ch, ch) if cfg.linear_proj else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, cfg.context_dim, heads, head_dim, cfg.upcast_attention) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(ch, ch) if cfg.linear_proj else nn.Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear_proj:
            y = self.proj_in(y)
        y = rearrange(y, "b c h w -> b (h w) c")  # pixels become tokens
        if self.linear_proj:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_proj:
            y = self.proj_out(y)
        y = rearrange(y, "b (h w) c -> b c h w", h=h, w=w)
        if not self.linear_proj:
            y = self.proj_out(y)
        return x + y


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        # Usually size = 2x the input. For latents whose side is not a multiple of 8 (e.g. 520 px
        # -> 65) the way down rounded up (65 -> 33), so we upsample to the skip's size (33 -> 65),
        # as diffusers does; the original code only accepted multiples of 8.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class Block(nn.Sequential):
    """One row of the table; hands each layer the input it needs (ldm: TimestepEmbedSequential)."""

    def forward(self, x, emb, context, size=None):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, size)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        mc, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if cfg.adm_in_channels:  # SDXL: the added conditioning joins the time embedding (sgm: label_emb)
            self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, emb_dim), nn.SiLU(),
                                                         nn.Linear(emb_dim, emb_dim)))

        # Down: remember each block's output channels; the up path consumes them as skips.
        self.input_blocks = nn.ModuleList([Block(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skips, ch = [mc], mc
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [ResBlock(ch, mc * mult, emb_dim)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth_at(level)))
                self.input_blocks.append(Block(*layers))
                skips.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(Block(Downsample(ch)))
                skips.append(ch)

        self.middle_block = Block(ResBlock(ch, ch, emb_dim), SpatialTransformer(ch, cfg, cfg.transformer_depth_middle),
                                  ResBlock(ch, ch, emb_dim))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), mc * mult, emb_dim)]
                ch = mc * mult
                if level in cfg.attention_levels:
                    layers.append(SpatialTransformer(ch, cfg, cfg.depth_at(level)))
                if level != 0 and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(Block(*layers))

        self.out = nn.Sequential(Norm(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))
        # Training switch: recompute each block's activations in the backward pass instead of
        # storing them. Less memory, about a third more compute.
        self.gradient_checkpointing = False

    def run(self, block, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def forward(self, x, t, context, y=None):
        """x (B, 4, H, W) noisy latents; t (B,) or scalar timesteps; context (B, T, C_ctx); SDXL's y
        (B, adm_in_channels): pooled text + size_features -> (B, 4, H, W)."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])  # a scalar serves the batch
        emb = self.time_embed(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))  # (B, E)
        if self.cfg.adm_in_channels:
            emb = emb + self.label_emb(y.to(emb.dtype))

        h, skips = x, []
        for block in self.input_blocks:
            h = self.run(block, h, emb, context)
            skips.append(h)
        h = self.run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            h = self.run(block, h, emb, context, skips[-1].shape[-2:] if skips else None)  # size: for Upsample
        return self.out(h)
