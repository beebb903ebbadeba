"""The toy world's shipped artifacts: the base model and the probe load, the model draws the class
it is asked for (as the probe reads it), and DreamBooth runs end to end on it."""

import math
import random
from collections import Counter

import torch

import train
from minidb.fetch import TOY_MODEL
from minidb.toy.base import SIZE, to_tensor
from minidb.toy.lab import EXAMPLES
from minidb.toy.measure import generate, load_probe
from minidb.load import load
from minidb.toy.probe import probe_scene, read
from minidb.toy.world import CLASSES, render, which_subject


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


PROBE_ACCURACY = 0.998  # its lowest head, measured on 512 fresh pictures and their VAE round trips (train-probe)


def fewest_hits_expected(n, p, risk=0.01):
    """The most hits out of n that a reader right with probability p still falls short of less often
    than `risk` (the lower binomial tail): a reader as good as measured reaches it 99% of the time."""
    below = lambda k: sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k))  # P(hits < k)
    return max(k for k in range(n + 1) if below(k) < risk)


def test_probe_reads_fresh_world_pictures_and_their_vae_round_trips():
    """The issue's bar is 97% on every head, on world pictures and on the same after the toy VAE; the
    probe measured 0.998-1.000 (docs/toy-world.md). Here 128 pictures it never trained on, each subject
    kind a quarter of them, held to what a 0.998-accurate reader gets 99% of the time (126 of 128)."""
    probe, vae = load_probe(), load(TOY_MODEL, dtype=torch.float32).vae
    rng = random.Random(4321)
    scenes = [probe_scene(rng, i) for i in range(128)]
    assert Counter(which_subject(s) for s in scenes) == {"subject": 32, "tuning": 32, "none": 64}
    pictures = to_tensor([render(s) for s in scenes])
    with torch.no_grad():
        round_trips = vae.decode(vae.encode(pictures).mean).clamp(-1, 1)
    truth = {"class": [s.cls for s in scenes], "colour": [s.colour for s in scenes],
             "background": [s.background for s in scenes], "subject": [which_subject(s) for s in scenes]}
    for x in (pictures, round_trips):
        _, seen = read(probe, x)
        for head, values in truth.items():
            right = sum(a == b for a, b in zip(seen[head], values))
            assert right >= fewest_hits_expected(len(scenes), PROBE_ACCURACY), f"{head}: {right}/{len(scenes)}"


def test_dreambooth_runs_on_the_toy_model(tmp_path):
    train.main([str(a) for a in ["--images", EXAMPLES, "--class", "cup", "--model", TOY_MODEL, "--out", tmp_path / "run",
                                 "--steps", 3, "--class-images", 2, "--sample-steps", 2,
                                 "--class-cache", tmp_path / "cache"]])
    trained = load(tmp_path / "run" / "model.safetensors")
    assert trained.resolution == SIZE and (tmp_path / "run" / "validation" / "step-000003.png").is_file()


def test_the_toy_model_trains_at_its_own_learning_rate(tmp_path):
    """Full fine-tuning of the toy model defaults to its tuned rate and steps (TOY_LR, TOY_STEPS), any other
    model to the paper's; an explicit --lr or --steps and the other methods' defaults are left alone."""
    from minidb.options import METHOD_LR, STEPS, TOY_LR, TOY_STEPS, parse_args, with_method_defaults

    def lr(*extra, model=TOY_MODEL, what="lr"):
        args = parse_args(["--images", "x", "--class", "cup", "--model", str(model), *extra], train.__doc__)
        assert with_method_defaults(args) is None
        return getattr(args, what)
    assert lr(what="steps") == TOY_STEPS["full"] != STEPS and lr("--steps", "5", what="steps") == 5
    assert lr("--method", "lora", what="steps") == lr(model=tmp_path / "other", what="steps") == STEPS
    assert lr() == TOY_LR["full"] != METHOD_LR["full"]
    assert lr("--lr", "3e-5") == 3e-5 and lr("--method", "lora") == METHOD_LR["lora"]
    (tmp_path / "copy").symlink_to(TOY_MODEL)  # the same file by another name is still the toy model
    assert lr(model=tmp_path / "copy") == TOY_LR["full"] and lr(model=tmp_path / "other") == METHOD_LR["full"]
