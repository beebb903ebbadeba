"""The toy world's shipped artifacts: the base model and the probe load, the model draws the class
it is asked for (as the probe reads it), and DreamBooth runs end to end on it."""

import math
import random

import torch

import train
from minidb.fetch import TOY_MODEL
from minidb.toy.lab import EXAMPLES, SIZE, generate, load_probe, to_tensor
from minidb.load import load
from minidb.toy.probe import read
from minidb.toy.world import CLASSES, random_scene, render


def fewest_hits_beating_chance(n, p, risk=0.01):
    """The smallest number of hits out of n that a guesser with hit rate p reaches with
    probability below `risk` (binomial tail)."""
    tail = lambda k: sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
    return next(k for k in range(n + 1) if tail(k) < risk)


def test_shipped_model_is_small_and_draws_the_class_asked_for():
    assert TOY_MODEL.stat().st_size < 30 * 2**20
    model, probe = load(TOY_MODEL, dtype=torch.float32), load_probe()
    assert (model.version, model.resolution) == ("SD 1.x", SIZE)
    hits, n = 0, 0
    with torch.no_grad():
        for k, cls in enumerate(CLASSES):
            _, seen = read(probe, generate(model, f"a photo of a {cls}", 4, seed=k, steps=10))
            hits += sum(c == cls for c in seen["class"])
            n += 4
    assert hits >= fewest_hits_beating_chance(n, 1 / len(CLASSES)), f"{hits}/{n} right"


def test_probe_reads_fresh_world_pictures():
    """Colour, background and subject-ness are read almost perfectly; the class head confuses some
    small houses with stars and large stars with houses or cups (0.80 measured on 512 pictures,
    docs/toy-world.md), so it is held to clearly beating a guesser."""
    probe = load_probe()
    rng = random.Random(1000)
    scenes = [random_scene(rng, subject=i % 4 == 0) for i in range(64)]
    _, seen = read(probe, to_tensor([render(s) for s in scenes]))
    for head, truth in (("background", [s.background for s in scenes]), ("colour", [s.colour for s in scenes]),
                        ("subject", [s.subject for s in scenes])):
        right = sum(a == b for a, b in zip(seen[head], truth))
        assert right >= 0.9 * len(scenes), f"{head}: {right}/{len(scenes)}"
    right = sum(a == s.cls for a, s in zip(seen["class"], scenes))
    assert right >= fewest_hits_beating_chance(len(scenes), 1 / len(CLASSES), risk=1e-6), f"class: {right}/64"


def test_dreambooth_runs_on_the_toy_model(tmp_path):
    train.main([str(a) for a in ["--images", EXAMPLES, "--class", "cup", "--model", TOY_MODEL, "--out", tmp_path / "run",
                                 "--steps", 3, "--class-images", 2, "--sample-steps", 2,
                                 "--class-cache", tmp_path / "cache"]])
    trained = load(tmp_path / "run" / "model.safetensors")
    assert trained.resolution == SIZE and (tmp_path / "run" / "validation" / "step-000003.png").is_file()
