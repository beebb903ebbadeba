"""The toy world: small procedural photos with captions, drawn with PIL, deterministic by seed.

    scene = random_scene(random.Random(0))      # Scene(cls='cup', colour='green', background='snow', ...)
    image = render(scene, size=64)               # a PIL image
    caption(scene)                               # 'a photo of a green cup on the snow'

Four classes of object in six colours and three sizes, anywhere in the frame, on five backgrounds.
Everything is real in this world: the same minidb tokenizer, text encoder, VAE, UNet and samplers as
Stable Diffusion, at small configs, trained on these pictures (minidb/toy/lab.py).

The subject is one particular object the base model never sees: a two-tone cup, its upper half white
(SUBJECT, SUBJECT_PAINT). Its photos play the part of the user's 3-5 photos of a dog. A second one,
a ball with a white right half (TUNING_SUBJECT), is used only to pick the DreamBooth recipe, so that
the subject the docs report on was never tuned on.
"""

import math
import random
from dataclasses import dataclass, replace

from PIL import Image, ImageDraw

CLASSES = ("star", "ball", "cup", "house")
COLOURS = {"red": (214, 48, 40), "blue": (44, 88, 214), "green": (46, 160, 64), "yellow": (236, 200, 40),
           "purple": (134, 62, 186), "orange": (238, 128, 36)}
BACKGROUNDS = ("beach", "snow", "grass", "night sky", "wooden floor")
SIZES = {"small": 0.28, "medium": 0.4, "large": 0.52}  # object height as a fraction of the image


@dataclass(frozen=True)
class Scene:
    cls: str
    colour: str
    background: str
    size: str
    x: float  # object centre, as a fraction of the width
    y: float
    seed: int  # details: background texture, star rotation
    subject: bool = False  # the two-tone cup (the probe's "subject" head reads this)
    paint: tuple = ()  # (pattern, second colour) for an object painted in two colours (see varied_scene)


# Two-colour paint jobs. The captioned world never has them (the base UNet never sees one); the toy VAE
# is trained on them too, as SD's VAE was trained on far more kinds of picture than any caption names,
# so that a subject painted in two colours survives the round trip into latents and back.
PATTERNS = ("checker", "halves", "band", "stripes", "sides", "top")
WHITE = (250, 250, 250)

SUBJECT, SUBJECT_PAINT, SUBJECT_COLOUR = "cup", ("top", "white"), "blue"  # the reported subject
TUNING_SUBJECT, TUNING_PAINT, TUNING_COLOUR = "ball", ("sides", "white"), "red"  # only for tuning the recipe


def random_scene(rng, subject=False):
    cls = SUBJECT if subject else rng.choice(CLASSES)
    return Scene(cls, rng.choice(sorted(COLOURS)), rng.choice(BACKGROUNDS), rng.choice(sorted(SIZES)),
                 rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.65), rng.randrange(2**31), subject,
                 SUBJECT_PAINT if subject else ())


def as_tuning_subject(scene):
    return replace(scene, cls=TUNING_SUBJECT, paint=TUNING_PAINT, subject=False)


def which_subject(scene):
    """'subject', 'tuning' (the tuning subject) or 'none': what the probe's subject head reads."""
    if scene.subject:
        return "subject"
    return "tuning" if (scene.cls, scene.paint) == (TUNING_SUBJECT, TUNING_PAINT) else "none"


def varied_scene(rng):
    """A world scene whose object is painted in a random pattern of its colour and white or another colour."""
    scene = random_scene(rng)
    second = rng.choice(["white", *sorted(COLOURS)])
    return replace(scene, paint=(rng.choice(PATTERNS), second))


def caption(scene, identifier=None):
    """'a photo of a red star on the beach'; with an identifier: 'a photo of a red sks cup on the beach'."""
    thing = f"{identifier} {scene.cls}" if identifier else scene.cls
    where = {"beach": "on the beach", "snow": "on the snow", "grass": "on the grass",
             "night sky": "under the night sky", "wooden floor": "on a wooden floor"}[scene.background]
    article = "an" if scene.colour[0] in "aeiou" else "a"
    return f"a photo of {article} {scene.colour} {thing} {where}"


# ---- drawing ----

def _background(draw, name, s, rng):
    horizon = int(s * rng.uniform(0.45, 0.6))
    if name == "beach":
        draw.rectangle([0, 0, s, horizon], fill=(150, 200, 240))
        draw.rectangle([0, horizon - s // 10, s, horizon], fill=(40, 110, 180))  # the sea
        draw.rectangle([0, horizon, s, s], fill=(226, 200, 140))
    elif name == "snow":
        draw.rectangle([0, 0, s, horizon], fill=(196, 214, 232))
        draw.rectangle([0, horizon, s, s], fill=(246, 248, 252))
        for _ in range(s // 4):
            x, y = rng.uniform(0, s), rng.uniform(0, horizon)
            draw.ellipse([x, y, x + s / 64, y + s / 64], fill=(255, 255, 255))
    elif name == "grass":
        draw.rectangle([0, 0, s, horizon], fill=(130, 190, 245))
        draw.rectangle([0, horizon, s, s], fill=(72, 150, 52))
        for _ in range(s):
            x, y = rng.uniform(0, s), rng.uniform(horizon, s)
            draw.line([x, y, x + rng.uniform(-1, 1), y - s / 25], fill=(44, 110, 36))
    elif name == "night sky":
        draw.rectangle([0, 0, s, s], fill=(14, 18, 52))
        for _ in range(s // 3):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            draw.point([x, y], fill=(250, 250, 220))
        draw.ellipse([s * 0.75, s * 0.08, s * 0.9, s * 0.23], fill=(240, 236, 200))  # the moon
    else:  # wooden floor
        draw.rectangle([0, 0, s, s], fill=(150, 98, 54))
        for y in range(0, s, max(s // 6, 2)):
            draw.line([0, y, s, y], fill=(108, 66, 34), width=max(s // 64, 1))


def _paint(image, mask, scene):
    """Fill the object's mask with its colour; for the subject, a colour-and-white checkerboard; for a
    two-colour paint job, its pattern in the object's colour and the second one."""
    colour = COLOURS[scene.colour]
    fill = Image.new("RGB", image.size, colour)
    pattern, second = scene.paint or (None, None)
    second = WHITE if second == "white" else COLOURS.get(second)
    d, s = ImageDraw.Draw(fill), image.size[0]
    x0, y0, x1, y1 = mask.getbbox() or (0, 0, s, s)
    if pattern == "checker":
        cell = max(s // 10, 2)
        for i in range(0, s, cell):
            for j in range(0, s, cell):
                if (i // cell + j // cell) % 2:
                    d.rectangle([i, j, i + cell - 1, j + cell - 1], fill=second)
    elif pattern == "halves":  # the lower half
        d.rectangle([0, (y0 + y1) // 2, s, s], fill=second)
    elif pattern == "top":  # the upper half
        d.rectangle([0, 0, s, (y0 + y1) // 2 - 1], fill=second)
    elif pattern == "band":  # the middle third
        d.rectangle([0, y0 + (y1 - y0) // 3, s, y0 + 2 * (y1 - y0) // 3], fill=second)
    elif pattern == "stripes":
        step = max((y1 - y0) // 4, 2)
        for y in range(y0 + step, y1, 2 * step):
            d.rectangle([0, y, s, y + step - 1], fill=second)
    elif pattern == "sides":  # the right half
        d.rectangle([(x0 + x1) // 2, 0, s, s], fill=second)
    image.paste(fill, (0, 0), mask)


def _shape(cls, cx, cy, h, rng):
    """A function that draws the object's silhouette, in white, into a mask image."""
    def draw(mask):
        d = ImageDraw.Draw(mask)
        if cls == "ball":
            d.ellipse([cx - h / 2, cy - h / 2, cx + h / 2, cy + h / 2], fill=255)
        elif cls == "star":
            turn = rng.uniform(0, 2 * math.pi / 5)
            points = [(cx + (h / 2 if k % 2 == 0 else h / 5) * math.sin(turn + k * math.pi / 5),
                       cy - (h / 2 if k % 2 == 0 else h / 5) * math.cos(turn + k * math.pi / 5)) for k in range(10)]
            d.polygon(points, fill=255)
        elif cls == "cup":
            w = h * 0.7
            d.polygon([(cx - w / 2, cy - h / 2), (cx + w / 2, cy - h / 2), (cx + w * 0.38, cy + h / 2),
                       (cx - w * 0.38, cy + h / 2)], fill=255)
            d.ellipse([cx + w * 0.3, cy - h * 0.3, cx + w * 0.75, cy + h * 0.15], outline=255, width=max(int(h / 9), 1))
        else:  # house: a square body and a triangular roof
            w = h * 0.8
            d.rectangle([cx - w / 2, cy - h * 0.1, cx + w / 2, cy + h / 2], fill=255)
            d.polygon([(cx - w * 0.6, cy - h * 0.1), (cx + w * 0.6, cy - h * 0.1), (cx, cy - h / 2)], fill=255)
    return draw


def render(scene, size=64):
    """Draw `scene` as a size x size RGB image. The same scene always gives the same pixels."""
    rng = random.Random(scene.seed)
    image = Image.new("RGB", (size, size))
    _background(ImageDraw.Draw(image), scene.background, size, rng)
    h = SIZES[scene.size] * size
    cx, cy = scene.x * size, scene.y * size
    mask = Image.new("L", (size, size), 0)
    _shape(scene.cls, cx, cy, h, rng)(mask)
    _paint(image, mask, scene)
    draw = ImageDraw.Draw(image)
    if scene.cls == "ball":  # a highlight, so a ball reads as round
        r = h / 8
        draw.ellipse([cx - h / 4 - r, cy - h / 4 - r, cx - h / 4 + r, cy - h / 4 + r], fill=(255, 255, 255))
    if scene.cls == "house":  # a door
        draw.rectangle([cx - h / 12, cy + h / 4, cx + h / 12, cy + h / 2], fill=(60, 40, 30))
    return image


def subject_photos(n=5, seed=7, size=64, tuning=False):
    """The user's photos of the subject, the two-tone cup, in several places and positions (one
    colouring, as a real object has); with tuning=True, of the tuning subject instead."""
    rng = random.Random(seed)
    scenes = [replace(random_scene(rng, subject=True), colour=SUBJECT_COLOUR) for _ in range(n)]
    if tuning:
        scenes = [replace(as_tuning_subject(s), colour=TUNING_COLOUR) for s in scenes]
    return [(render(s, size), s) for s in scenes]
