"""The toy world's measurements: the paper's metrics for a DreamBooth model (subject fidelity, prompt
fidelity, PRES, DIV, and whether the subject appears in the place asked for), and how well a base
model draws the world, each read by the probe (minidb/toy/probe.py) from pictures drawn as sample.py
draws them. `python -m minidb.toy.lab` runs them and prints the tables (docs/toy-world.md)."""

import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from minidb.files import ModelFileError, read_tensors
from minidb.pipeline import decode, grid, sample_latents
from minidb.toy.base import SIZE, to_tensor
from minidb.toy.probe import Probe, diversity, off_palette, read, similarity
from minidb.toy.world import BACKGROUNDS, CLASSES, COLOURS, Scene, caption, random_scene, render, subject_photos

ROOT = Path(__file__).resolve().parent.parent.parent
TOY_PROBE = ROOT / "weights" / "toy-probe.safetensors"

PLACES = {"beach": "on the beach", "snow": "on the snow", "grass": "on the grass", "night sky": "under the night sky",
          "wooden floor": "on a wooden floor"}


def property_colours(colour):
    """The three colours "a photo of a {colour} [V] cup" asks for: not the subject's own."""
    return [c for c in ("red", "green", "yellow", "purple") if c != colour][:3]


def load_probe(path=TOY_PROBE):
    probe = Probe()
    try:
        probe.load_state_dict(read_tensors(path)[0], strict=True)
    except RuntimeError:  # torch's message lists every missing and unexpected name: hundreds of lines
        raise ModelFileError(f"{path} is not a toy probe (its tensors do not match a probe's names and shapes); "
                             "pass a file that `python -m minidb.toy.lab train-probe` wrote.") from None
    return probe.eval()


def generate(model, prompt, n, seed, steps, bf16=False):
    """n pictures of `prompt`; bf16=True samples as sample.py does by default on a CPU with native bf16."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return to_tensor(decode(model, sample_latents(model, prompt, n=n, steps=steps, seed=seed, height=SIZE,
                                                      width=SIZE, progress=False)))


def no_nan(x):
    """x with every NaN (a figure that does not exist, such as a frozen model's drift) as None: strict JSON."""
    if isinstance(x, dict):
        return {k: no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [no_nan(v) for v in x]
    return None if isinstance(x, float) and math.isnan(x) else x


def mean_spread(values):
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), t.std().item() if len(t) > 1 else 0.0


@torch.no_grad()
def evaluate(model, identifier, probe, n=4, steps=25, seed=0, tuning=False, placed_images=None, bf16=False):
    """The paper's metrics for one model, over its prompt structure; {metric: (mean, spread)}.
    tuning=True measures against the tuning subject (a ball) instead of the reported one (a cup).
    The generations of "a photo of a [V] {class} {place}" are appended to the list placed_images, if given.
    bf16=True samples under bf16 autocast (the probe still reads in fp32)."""
    photos = subject_photos(tuning=tuning)
    real, cls, colour = to_tensor([image for image, _ in photos]), photos[0][1].cls, photos[0][1].colour
    which = "tuning" if tuning else "subject"
    fidelity, subject_rate, prompt_ok, div, placed = [], [], [], [], []
    prompts = [(f"a photo of a {identifier} {cls} {where}", "background", b) for b, where in PLACES.items()]
    prompts += [(f"a photo of a {c} {identifier} {cls}", "colour", c) for c in property_colours(colour)]
    for k, (prompt, head, wanted) in enumerate(tqdm(prompts, desc="evaluating", leave=False)):
        images = generate(model, prompt, n, seed + k, steps, bf16)
        _, seen = read(probe, images)
        fidelity += [similarity(probe, im[None], real) for im in images]
        subject_rate += [float(s == which) for s in seen["subject"]]
        prompt_ok += [float(v == wanted) for v in seen[head]]
        if head == "background":  # issue 14's goal: the subject, in the place asked for
            placed += [(float(s == which), float(v == wanted)) for s, v in zip(seen["subject"], seen[head])]
            if placed_images is not None:
                placed_images += [to_pil(im) for im in images]
        div.append(diversity(probe, images))
    plain = generate(model, f"a photo of a {cls}", 2 * n, seed + 100, steps, bf16)
    _, seen = read(probe, plain)
    pres = [similarity(probe, im[None], real) for im in plain]
    right_class = []
    for k, c in enumerate(CLASSES):
        _, seen_cls = read(probe, generate(model, f"a photo of a {c}", n, seed + 200 + k, steps, bf16))
        right_class += [float(v == c) for v in seen_cls["class"]]
    return {"subject fidelity": mean_spread(fidelity), "subject rate": mean_spread(subject_rate),
            "prompt fidelity": mean_spread(prompt_ok), "PRES": mean_spread(pres),
            "PRES subject rate": mean_spread([float(s == which) for s in seen["subject"]]), "DIV": mean_spread(div),
            "right class": mean_spread(right_class),
            "subject rate, in a place": mean_spread([s for s, _ in placed]),
            "place asked for": mean_spread([p for _, p in placed])}


@torch.no_grad()
def evaluate_base(model, probe, n=8, steps=25, seed=0):
    """How well a base model draws the world: {metric: (mean, spread)} and a grid picture (rows: classes,
    columns: backgrounds, each in a colour of its own)."""
    right_class, colour_ok, place_ok, smear, tiles = [], [], [], [], []
    for k, cls in enumerate(CLASSES):
        images = generate(model, f"a photo of a {cls}", n, seed + k, steps)
        right_class += [float(c == cls) for c in read(probe, images)[1]["class"]]
        smear += off_palette(images).tolist()
    colours = sorted(COLOURS)
    for k, (cls, place) in enumerate((c, b) for c in CLASSES for b in BACKGROUNDS):
        colour = colours[k % len(colours)]
        scene = Scene(cls, colour, place, "medium", 0.5, 0.5, 0)
        images = generate(model, caption(scene), n, seed + 100 + k, steps)
        _, seen = read(probe, images)
        colour_ok += [float(c == colour) for c in seen["colour"]]
        place_ok += [float(b == place) for b in seen["background"]]
        smear += off_palette(images).tolist()
        tiles.append(images[0])
    real = to_tensor([render(random_scene(random.Random(10**6 + i))) for i in range(64)])
    metrics = {"right class": mean_spread(right_class), "colour asked for": mean_spread(colour_ok),
               "place asked for": mean_spread(place_ok), "off-palette pixels": mean_spread(smear),
               "off-palette pixels, VAE round trip of real pictures": mean_spread(
                   off_palette(model.vae.decode(model.vae.encode(real).mean).clamp(-1, 1)).tolist())}
    return metrics, grid([to_pil(t) for t in tiles], cols=len(BACKGROUNDS))


def to_pil(x):
    """(3, H, W) in [-1, 1] -> a PIL image."""
    from PIL import Image
    return Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())
