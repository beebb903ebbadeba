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

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from minidb.toy.world import BACKGROUNDS, CLASSES, COLOURS, as_tuning_subject, random_scene, render, which_subject

HEADS = {"class": CLASSES, "colour": sorted(COLOURS), "background": BACKGROUNDS, "subject": ("none", "subject", "tuning")}


class Probe(nn.Module):
    """64x64 picture -> pooled features (B, 128) and one set of logits per head. Each of the four
    levels halves the picture (a strided conv) and then looks again at that scale (a plain conv)."""

    def __init__(self):
        super().__init__()
        chans = [3, 32, 64, 128, 128]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans[:-1], chans[1:]))
        self.norms = nn.ModuleList(nn.GroupNorm(8, c) for c in chans[1:])
        self.convs2 = nn.ModuleList(nn.Conv2d(c, c, 3, padding=1) for c in chans[1:])
        self.norms2 = nn.ModuleList(nn.GroupNorm(8, c) for c in chans[1:])
        self.heads = nn.ModuleDict({name: nn.Linear(128, len(values)) for name, values in HEADS.items()})

    def features(self, x):  # (B, 3, 64, 64) in [-1, 1] -> list of feature maps, 32x32 down to 4x4
        maps = []
        for conv, norm, conv2, norm2 in zip(self.convs, self.norms, self.convs2, self.norms2):
            x = F.silu(norm(conv(x)))
            x = x + F.silu(norm2(conv2(x)))
            maps.append(x)
        return maps

    def forward(self, x):
        pooled = self.features(x)[-1].mean(dim=(2, 3))  # (B, 128)
        return pooled, {name: head(pooled) for name, head in self.heads.items()}


def labels(scenes):
    read = {"class": lambda s: s.cls, "colour": lambda s: s.colour, "background": lambda s: s.background,
            "subject": which_subject}
    return {name: torch.tensor([values.index(read[name](s)) for s in scenes]) for name, values in HEADS.items()}


def probe_scene(rng, i=None, subjects=0.3):
    """A fresh world scene; a share `subjects` of them one of the two subjects, half each, in any colour.
    For test sets, with i: the subject when i % 4 is 0, the tuning subject when it is 1."""
    kind = rng.random() * 2 / subjects if i is None else i % 4
    scene = random_scene(rng, subject=kind < 1)
    return as_tuning_subject(scene) if 1 <= kind < 2 else scene


def world_pictures(to_tensor, n, seed, vae=None):
    """n fresh world pictures and their scenes (probe_scene); with a VAE, every other picture is
    replaced by its round trip through it, so that the probe also reads the VAE's softer pictures
    (which is all a model built on that VAE can draw)."""
    rng = random.Random(seed)
    scenes = [probe_scene(rng) for _ in range(n)]
    x = torch.cat([to_tensor([render(s) for s in scenes[i:i + 250]]) for i in range(0, n, 250)])
    if vae is not None:
        with torch.no_grad():
            for i in tqdm(range(0, n, 500), desc="VAE round trips", leave=False):
                half = x[i:i + 500:2]
                x[i:i + 500:2] = vae.decode(vae.encode(half).mean).clamp(-1, 1)
    return x, scenes


def train_probe(to_tensor, vae=None, steps=3000, batch=64, seed=0, pictures=16000):
    """Train on a fixed set of world pictures, rendered (and half of them round-tripped) once."""
    torch.manual_seed(seed)
    x, scenes = world_pictures(to_tensor, pictures, seed, vae)
    y = labels(scenes)
    probe = Probe().train()
    opt = torch.optim.AdamW(probe.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in (bar := tqdm(range(steps), desc="probe")):
        idx = torch.randint(0, pictures, (batch,))
        _, logits = probe(x[idx])
        loss = sum(F.cross_entropy(logits[name], y[name][idx]) for name in HEADS)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:
            g["lr"] = 2e-3 * min(1, (step + 1) / 100) * (1 - step / steps)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return probe.eval()


def accuracy(probe, to_tensor, n=512, seed=10**6, vae=None):
    """{head: share read right} on n fresh pictures not trained on; with a VAE, on their round trips."""
    rng = random.Random(seed)
    scenes = [probe_scene(rng, i) for i in range(n)]
    x = to_tensor([render(s) for s in scenes])
    if vae is not None:
        with torch.no_grad():
            x = torch.cat([vae.decode(vae.encode(x[i:i + 256]).mean).clamp(-1, 1) for i in range(0, n, 256)])
    _, seen = read(probe, x)
    truth = labels(scenes)
    return {name: sum(HEADS[name].index(v) == t for v, t in zip(seen[name], truth[name].tolist())) / n
            for name in HEADS}


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


def palette(n=200, seed=0):
    """Every colour the world's pictures use: PIL draws without anti-aliasing, so that is a short list."""
    rng = random.Random(seed)
    pixels = torch.cat([torch.from_numpy(np.array(render(random_scene(rng, subject=i % 4 == 0))).reshape(-1, 3))
                        for i in range(n)])
    return torch.unique(pixels, dim=0).float() / 127.5 - 1


@torch.no_grad()
def off_palette(images, far=0.3):
    """Per picture, the share of pixels farther than `far` (on the [-1, 1] scale; 0.3 is 38 of 255) from
    every colour the world uses: rainbow specks and smeared blends of colours. Edges between two
    colours add a little even in clean pictures, so compare with the VAE's round trip of real ones."""
    colours = palette()
    x = images.permute(0, 2, 3, 1).reshape(len(images), -1, 1, 3)
    return ((x - colours).norm(dim=-1).min(dim=-1).values > far).float().mean(dim=1)


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
