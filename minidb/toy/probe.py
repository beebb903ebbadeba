"""The measuring probe of the toy world, and the paper's metrics computed with it.

DreamBooth (Ruiz et al. 2022, section 4.1) measures with pretrained networks: DINO and CLIP image
embeddings for subject fidelity, CLIP text-image similarity for prompt fidelity, LPIPS for diversity.
The toy world has its own small network instead: a CNN trained on world pictures to read the class,
colour, background and "is this our subject?" of a picture. Its pooled features play DINO's part.

    subject fidelity  mean cosine similarity of generated "[V] cup" pictures to the real subject
                      photos, in the probe's feature space (DINO analogue); and the rate the probe
                      calls them the subject
    prompt fidelity   the share of generations in which the probe finds the background and colour
                      the prompt asked for (CLIP-T analogue)
    PRES              mean similarity of plain "a photo of a cup" generations to the subject photos:
                      how far the class drifted towards the subject (paper: PRES)
    DIV               mean pairwise distance between generations of one prompt, on the probe's
                      normalized early feature maps (LPIPS analogue: LPIPS compares VGG/AlexNet maps)
"""

import random

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from minidb.toy.world import BACKGROUNDS, CLASSES, COLOURS, random_scene, render

HEADS = {"class": CLASSES, "colour": sorted(COLOURS), "background": BACKGROUNDS, "subject": (False, True)}


class Probe(nn.Module):
    """64x64 picture -> pooled features (B, 128) and one set of logits per head."""

    def __init__(self):
        super().__init__()
        chans = [3, 32, 64, 128, 128]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(8, c) for c in chans[1:])
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in HEADS.items()})

    def features(self, x):  # (B, 3, 64, 64) in [-1, 1] -> list of feature maps, 32x32 down to 4x4
        maps = []
        for conv, norm in zip(self.convs, self.norms):
            x = F.silu(norm(conv(x)))
            maps.append(x)
        return maps

    def forward(self, x):
        pooled = self.features(x)[-1].mean(dim=(2, 3))  # (B, 128)
        return pooled, {name: head(pooled) for name, head in self.heads.items()}


def labels(scenes):
    return {name: torch.tensor([values.index(getattr(s, {"class": "cls"}.get(name, name))) for s in scenes])
            for name, values in HEADS.items()}


def train_probe(to_tensor, vae=None, steps=800, batch=64, seed=0, subject_share=0.25):
    """Train on fresh world pictures, a quarter of them the subject (in any colour). Half of each
    batch goes through the toy VAE first, so the probe also reads the VAE's softer pictures."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    probe = Probe().train()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in (bar := tqdm(range(steps), desc="probe")):
        scenes = [random_scene(rng, subject=rng.random() < subject_share) for _ in range(batch)]
        x = to_tensor([render(s) for s in scenes])
        if vae is not None:
            with torch.no_grad():
                half = batch // 2
                x[:half] = vae.decode(vae.encode(x[:half]).mean).clamp(-1, 1)
        _, logits = probe(x)
        y = labels(scenes)
        loss = sum(F.cross_entropy(logits[name], y[name]) for name in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = 2e-3 * (1 - step / steps)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return probe.eval()


@torch.no_grad()
def read(probe, images):
    """(B, 3, 64, 64) -> pooled features and the most likely value of each head."""
    pooled, logits = probe(images)
    return pooled, {name: [HEADS[name][i] for i in logits[name].argmax(-1).tolist()] for name in HEADS}


@torch.no_grad()
def similarity(probe, a, b):
    """Mean cosine similarity between every picture of a and every picture of b (features)."""
    fa, fb = F.normalize(probe(a)[0], dim=-1), F.normalize(probe(b)[0], dim=-1)
    return (fa @ fb.T).mean().item()


@torch.no_grad()
def diversity(probe, images):
    """Mean pairwise distance of the normalized early feature maps (LPIPS-style), over all pairs."""
    maps = [F.normalize(m, dim=1) for m in probe.features(images)[:2]]  # unit length per pixel
    n, total, pairs = len(images), 0.0, 0
    for i in range(n):
        for j in range(i + 1, n):
            total += sum((m[i] - m[j]).square().sum(0).mean().item() for m in maps) / len(maps)
            pairs += 1
    return total / max(pairs, 1)
