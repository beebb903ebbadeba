"""The pieces of DreamBooth (Ruiz et al. 2022, arXiv 2208.12242) that train.py puts together.

- the rare-token identifier [V] that names the subject;
- the class prior: images of "a photo of [class]" drawn by the frozen model, cached as latents;
- the loss: denoising on the subject plus λ times denoising on the class prior;
- the resumable training state, and the loss curve drawn at the end.
"""

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from minidb.files import atomic_write, read_tensors, write_safetensors
from minidb.pipeline import sample_latents

# ---- the identifier ----


def rare_tokens(tokenizer, max_chars=3, rarest_fraction=0.2):
    """Candidate identifiers, as the paper chooses them: tokens that are rare in the vocabulary and
    short when spelled out (at most 3 characters), so they carry little prior meaning.

    CLIP's BPE ids follow the order in which merges were learned, most frequent first, so rare
    tokens are the last ones. We keep whole-word tokens ('</w>') of 2-3 lowercase letters from the
    last `rarest_fraction` of the merges, which the tokenizer reads back as one token.
    """
    first_rare = int(len(tokenizer.vocab) * (1 - rarest_fraction))
    candidates = []
    for token, i in tokenizer.vocab.items():
        word = token.removesuffix("</w>")
        if i >= first_rare and token.endswith("</w>") and re.fullmatch(r"[a-z]{2,%d}" % max_chars, word):
            if tokenizer.encode(word) == [i]:
                candidates.append(word)
    return sorted(candidates)


def pick_identifier(tokenizer, rng):
    """One rare token, drawn with `rng` (a random.Random) so a seed always gives the same one."""
    return rng.choice(rare_tokens(tokenizer))


# ---- the loss ----


def dreambooth_loss(pred, target, n_instance, prior_weight, weights=None):
    """The DreamBooth objective (paper, eq. 2) for a batch whose first n_instance examples show the
    subject and whose others are class-prior samples:

        loss = mean ‖ε̂ − ε‖² over subject examples + λ · mean ‖ε̂' − ε'‖² over class examples

    (ε, or v for v-prediction models: `target` is whichever the model predicts). `weights`, one per
    example, rescale each example's error, e.g. for min-SNR weighting. Returns (loss, instance, prior).
    """
    per_example = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))  # (B,)
    if weights is not None:
        per_example = per_example * weights
    instance_loss = per_example[:n_instance].mean()
    prior_loss = per_example[n_instance:].mean() if len(per_example) > n_instance else torch.zeros_like(instance_loss)
    return instance_loss + prior_weight * prior_loss, instance_loss, prior_loss


def min_snr_weights(schedule, t, gamma):
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv 2303.09556): min(SNR_t, γ) / SNR_t for ε
    targets, / (SNR_t + 1) for v targets. Down-weights the easy, low-noise timesteps."""
    alpha_bar = schedule.alphas_cumprod[t.cpu()]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return (clipped / snr if schedule.prediction_type == "epsilon" else clipped / (snr + 1)).to(t.device)


# ---- the class prior ----


def _model_identity(path):
    """What names a model for the cache: its path, size and modification time (hashing gigabytes
    at every start would be slow)."""
    path = Path(path).resolve()
    files = [path] if path.is_file() else sorted(path.glob("*/*.safetensors")) + sorted(path.glob("*/*.bin"))
    return [str(path)] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def class_prior(model, model_path, prompt, count, resolution, sampler, steps, guidance, seed, cache_root, batch=4):
    """`count` latents (count, 4, h, w) of `prompt` drawn by the frozen model, cached on disk.

    The cache folder is keyed by everything that changes the samples (model, prompt, resolution,
    sampler, steps, guidance, seed), so a second run reuses them and a larger count only tops up.
    Each batch is seeded with seed + the index of its first sample, so the same sequence of runs
    always gives the same files.
    """
    settings = {"model": _model_identity(model_path), "prompt": prompt, "resolution": resolution,
                "sampler": sampler, "steps": steps, "guidance": guidance, "seed": seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_root) / f"{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:40]}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "settings.json", lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2)))
    have = len(list(folder.glob("[0-9]*.safetensors")))
    with tqdm(total=count, initial=min(have, count), desc=f"class prior '{prompt}'", disable=have >= count) as bar:
        for first in range(have, count, batch):
            n = min(batch, count - first)
            latents = sample_latents(model, prompt, n=n, steps=steps, guidance=guidance, seed=seed + first,
                                     height=resolution, width=resolution, sampler=sampler, progress=False)
            for j in range(n):
                write_safetensors(folder / f"{first + j:05d}.safetensors", {"latent": latents[j].float()})
            bar.update(n)
    return torch.stack([read_tensors(folder / f"{i:05d}.safetensors")[0]["latent"] for i in range(count)])


# ---- resumable training state ----


def save_state(folder, step, modules, extra, keep=1):
    """Write a checkpoint folder `step-NNNNNN` atomically: weights of the trained `modules` (fp32
    safetensors) and `extra` (optimizer, scaler, RNG and data-order state: tensors and plain values
    only, so it reloads with weights_only=True). Older checkpoints beyond `keep` are removed after
    the new one is complete."""
    folder = Path(folder)
    final = folder / f"step-{step:06d}"
    tmp = folder / f".step-{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, module in modules.items():
        write_safetensors(tmp / f"{name}.safetensors", {k: v.float() for k, v in module.state_dict().items()})
    torch.save({"step": step, **extra}, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return final


def latest_state(folder):
    states = sorted(Path(folder).glob("step-*"))
    return states[-1] if states else None


def load_state(path, modules):
    """Restore the trained modules' weights from a checkpoint folder; return its extra state."""
    for name, module in modules.items():
        tensors, _ = read_tensors(Path(path) / f"{name}.safetensors")
        module.load_state_dict({k: v.to(next(module.parameters()).dtype) for k, v in tensors.items()}, strict=True)
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=True)


# ---- the loss curve ----


def plot_losses(rows, path, size=(800, 400), margin=50):
    """A small line chart of the loss per step (PIL only: no plotting dependency)."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    w, h = size[0] - 2 * margin, size[1] - 2 * margin
    draw.rectangle([margin, margin, margin + w, margin + h], outline="black")
    series = {"instance": ("instance_loss", (200, 60, 40)), "prior": ("prior_loss", (40, 90, 200))}
    values = [r[k] for r in rows for k, _ in series.values() if r.get(k) is not None]
    if rows and values:
        top = max(values) or 1.0
        steps = [r["step"] for r in rows]
        span = max(steps[-1] - steps[0], 1)
        for i, (label, (key, color)) in enumerate(series.items()):
            points = [(margin + w * (r["step"] - steps[0]) / span, margin + h * (1 - r[key] / top))
                      for r in rows if r.get(key) is not None]
            if len(points) > 1:
                draw.line(points, fill=color, width=2)
            draw.text((margin + 10 + 120 * i, margin + 8), f"{label} loss", fill=color)
        draw.text((margin, margin + h + 8), f"step {steps[0]}", fill="black")
        draw.text((margin + w - 80, margin + h + 8), f"step {steps[-1]}", fill="black")
        draw.text((4, margin - 14), f"{top:.3g}", fill="black")
        draw.text((4, margin + h - 6), "0", fill="black")
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
