"""The VAE (AutoencoderKL): images <-> latents, 8x smaller in each side, 4 channels.

Stable Diffusion runs its diffusion on latents, not pixels. The encoder maps a (B, 3, H, W) image in
[-1, 1] to a diagonal Gaussian over (B, 4, H/8, W/8) latents; the decoder maps latents back. Latents
are multiplied by LATENT_SCALE before diffusion so that they have roughly unit variance.

Module names equal the original CompVis checkpoint keys under `first_stage_model.` (encoder.down.0
.block.1.norm1, encoder.mid.attn_1.q, decoder.up.3.upsample.conv, ...). diffusers' names are reached
by the rename rules in minidb/convert.py.

Legend: B batch, C channels, H/W height/width, Z latent channels.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minidb.attention import attention

# The factor that gives SD's latents about unit variance: `scale_factor: 0.18215` in the
# CompVis v1 / Stability v2 inference configs (diffusers: vae.config.scaling_factor). SDXL's VAE,
# the same architecture retrained, uses 0.13025 (sgm's sd_xl_base.yaml).
LATENT_SCALE = 0.18215
LATENT_SCALE_XL = 0.13025


@dataclass
class VAEConfig:
    ch: int = 128  # channels at full resolution
    ch_mult: tuple = (1, 2, 4, 4)  # channels per level; len-1 downsamplings, so 8x for SD
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    scale_factor: float = LATENT_SCALE  # latents x this have about unit variance (SDXL: LATENT_SCALE_XL)
    # Decode in fp32 even when the rest runs in fp16: SDXL's VAE overflows in fp16 (inf, then a black
    # picture), and SD's can. False only for a VAE retrained to stay finite in fp16 (madebyollin's
    # sdxl-vae-fp16-fix), whose diffusers config says force_upcast false.
    force_upcast: bool = True


SD = VAEConfig()  # SD 1.x and 2.x share the same VAE architecture
SDXL = VAEConfig(scale_factor=LATENT_SCALE_XL)  # SDXL's: the same again, differently trained
TINY = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1)


def Norm(c):
    # The VAE's GroupNorm uses eps 1e-6 (ldm Normalize()), unlike the UNet's 1e-5.
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out):
        super().__init__()
        self.norm1 = Norm(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = Norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1)  # match channels for the residual

    def forward(self, x):
        # In place where nothing else holds the tensor: at 512 px each is tens of MB, and fewer fresh
        # blocks make a CPU decode ~5% faster (bench/RESULTS.md). The values are the same.
        h = self.conv1(F.silu(self.norm1(x), inplace=True))
        h = self.conv2(F.silu(self.norm2(h), inplace=True))
        return h.add_(self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; q, k, v are 1x1 convs as in the checkpoint."""

    def __init__(self, c):
        super().__init__()
        self.norm = Norm(c)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        b, c, h, w = x.shape
        n = self.norm(x)
        # one head; contiguous, or PyTorch's CPU attention falls back to materializing the (L, L) scores
        q, k, v = (rearrange(p(n), "b c h w -> b 1 (h w) c").contiguous() for p in (self.q, self.k, self.v))
        out = rearrange(attention(q, k, v), "b 1 (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x):
        # The original pads only right and bottom before a stride-2 conv; keep it for exact parity.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.block_1 = ResnetBlock(c, c)
        self.attn_1 = AttnBlock(c)
        self.block_2 = ResnetBlock(c, c)

    def forward(self, x):
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: a list of res blocks, then (except at the end) a resampler."""

    def __init__(self, chans, resample=None):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(a, b) for a, b in zip(chans[:-1], chans[1:]))
        if resample is Downsample:
            self.downsample = Downsample(chans[-1])
        elif resample is Upsample:
            self.upsample = Upsample(chans[-1])


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        c = cfg.ch
        for i, c_out in enumerate(chans):
            last = i == len(chans) - 1
            self.down.append(Level([c] + [c_out] * cfg.num_res_blocks, None if last else Downsample))
            c = c_out
        self.mid = Mid(c)
        self.norm_out = Norm(c)
        self.conv_out = nn.Conv2d(c, 2 * cfg.z_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):  # (B, 3, H, W) -> (B, 2Z, H/8, W/8)
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chans = [cfg.ch * m for m in cfg.ch_mult]
        c = chans[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c, 3, padding=1)
        self.mid = Mid(c)
        # Built from the smallest resolution up, but stored so that up[i] is level i, as in the
        # checkpoint: up[0] is the full-resolution level and runs last.
        levels = []
        for i in reversed(range(len(chans))):
            levels.insert(0, Level([c] + [chans[i]] * (cfg.num_res_blocks + 1), Upsample if i > 0 else None))
            c = chans[i]
        self.up = nn.ModuleList(levels)
        self.norm_out = Norm(c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)

    def forward(self, z):  # (B, Z, H/8, W/8) -> (B, 3, H, W)
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The encoder's output distribution over latents."""

    def __init__(self, moments):  # (B, 2Z, h, w)
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # as in ldm, keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.z_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 1)

    def encode(self, x):  # image in [-1, 1] -> distribution over unscaled latents
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):  # unscaled latents -> image, roughly in [-1, 1]
        return self.decoder(self.post_quant_conv(z))
