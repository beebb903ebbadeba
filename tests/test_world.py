"""The toy world's generator: deterministic, and its captions say what it drew."""

import random
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minidb.toy.world import (BACKGROUNDS, CLASSES, COLOURS, PATTERNS, WHITE, Scene, caption, random_scene, render,
                              subject_photos, varied_scene)

# What the ground looks like at the bottom edge of each background (world.py's palette).
GROUND = {"beach": (226, 200, 140), "snow": (246, 248, 252), "grass": (72, 150, 52), "night sky": (14, 18, 52),
          "wooden floor": (150, 98, 54)}


def pixels_of(image, colour):
    return (np.asarray(image).reshape(-1, 3) == colour).all(axis=1).reshape(image.size[1], image.size[0])


def test_same_seed_same_pictures_and_captions():
    a = [random_scene(random.Random(5)) for _ in range(3)]
    b = [random_scene(random.Random(5)) for _ in range(3)]
    assert a == b
    assert all(np.array_equal(np.asarray(render(x)), np.asarray(render(y))) for x, y in zip(a, b))
    other = random_scene(random.Random(6))
    assert not np.array_equal(np.asarray(render(a[0])), np.asarray(render(other)))


def test_every_class_colour_and_background_occurs():
    rng = random.Random(0)
    scenes = [random_scene(rng) for _ in range(400)]
    assert {s.cls for s in scenes} == set(CLASSES)
    assert {s.colour for s in scenes} == set(COLOURS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)


def classify(image, colour):
    """Read class from the pixels alone: the silhouette's fill of its bounding box, and details."""
    mask = pixels_of(image, COLOURS[colour])
    ys, xs = np.nonzero(mask)
    box = (xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)
    fill = mask.sum() / box
    if pixels_of(image, (60, 40, 30)).sum() > 4:
        return "house"  # the door
    if fill < 0.55:
        return "star"
    if pixels_of(image, (255, 255, 255)).sum() > 4 and abs((xs.max() - xs.min()) - (ys.max() - ys.min())) <= 2:
        return "ball"  # round, with its highlight
    return "cup"


@pytest.mark.parametrize("seed", range(40))
def test_caption_matches_the_picture(seed):
    scene = random_scene(random.Random(seed))
    image = render(scene, 96)
    text = caption(scene)
    assert text.startswith("a photo of a") and f" {scene.colour} {scene.cls} " in f"{text} "
    # the colour named is painted, the ground named is there, the class named is the shape drawn
    assert pixels_of(image, COLOURS[scene.colour]).sum() > 40
    assert pixels_of(image, GROUND[scene.background])[-3:].sum() > 20 or scene.background == "night sky"
    if scene.background == "night sky":
        assert pixels_of(image, GROUND["night sky"]).mean() > 0.4
    assert classify(image, scene.colour) == scene.cls


@pytest.mark.parametrize("tuning", [False, True])
def test_the_subjects_are_two_tone_objects_the_base_world_never_draws(tuning):
    photos = subject_photos(tuning=tuning)
    assert len(photos) == 5 and len({s.background for _, s in photos}) > 2
    cls, colour, (pattern, _) = (("ball", "red", ("sides", "")) if tuning else ("cup", "blue", ("top", "")))
    for image, scene in photos:
        assert scene.subject != tuning and (scene.cls, scene.colour, scene.paint[0]) == (cls, colour, pattern)
        painted = pixels_of(image, COLOURS[colour])
        white = pixels_of(image, (250, 250, 250))
        assert painted.sum() > 30 and white.sum() > 30  # two-tone
        rows, cols = np.nonzero(white)
        assert (cols.mean() > np.nonzero(painted)[1].mean()) if tuning else (rows.mean() < np.nonzero(painted)[0].mean())
    rng = random.Random(1)
    assert not any(random_scene(rng).subject or random_scene(rng).paint for _ in range(200))


def test_captions_with_an_identifier():
    scene = Scene("cup", "orange", "night sky", "small", 0.5, 0.5, 1, subject=True)
    assert caption(scene) == "a photo of an orange cup under the night sky"
    assert caption(scene, identifier="sks") == "a photo of an orange sks cup under the night sky"


def test_shipped_example_photos_are_what_the_generator_draws():
    root = Path(__file__).resolve().parent.parent / "examples" / "two-tone-cup"
    for i, (image, _) in enumerate(subject_photos(n=5)):
        assert np.array_equal(np.asarray(image), np.asarray(Image.open(root / f"{i}.png").convert("RGB"))), i


@pytest.mark.parametrize("pattern", PATTERNS)
def test_two_colour_paint_jobs_show_both_colours_and_leave_the_caption_alone(pattern):
    """The VAE's extra training pictures: the object in its colour and a second one, in each pattern;
    nothing else in the picture changes, and the caption does not mention the paint."""
    scene = replace(Scene("cup", "blue", "grass", "large", 0.5, 0.5, seed=3), paint=(pattern, "white"))
    plain, painted = np.asarray(render(replace(scene, paint=()))), np.asarray(render(scene))
    changed = (plain != painted).any(-1)
    assert changed.any() and (painted[changed] == WHITE).all()  # only the object, only to the second colour
    assert (painted == COLOURS["blue"]).all(-1).sum() > 0.2 * (plain == COLOURS["blue"]).all(-1).sum()
    assert caption(scene) == caption(replace(scene, paint=()))
    rng = random.Random(0)
    assert {varied_scene(rng).paint[0] for _ in range(200)} == set(PATTERNS)
