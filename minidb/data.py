"""Reading the training photos: a folder of JPEG, PNG or WebP files -> one (N, 3, R, R) tensor.

DreamBooth learns a subject from a handful of photos (3-20) and, with prior preservation, a few
hundred photos of its class. Both folders are read here the same way:

    every regular, non-hidden file, sorted by name (a stable order, since train.py caches one
    latent per image), opened by content with PIL, whatever its extension
    -> turned upright as the camera's EXIF orientation tag says
    -> 8-bit RGB; transparent areas become white, 16-bit values are scaled down to 8 bits
    -> short side resized to R, the centre R×R kept   (one Lanczos resize, so it is antialiased)
    -> channels first, scaled from [0, 255] to [-1, 1], the range the VAE encoder was trained on

Files that are not readable images are skipped with one warning that names them all, and so are
photos smaller than R, which are upscaled and come out blurry. One file is decoded at a time, so
memory holds full-size pixels of a single photo only.
"""

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

# Formats we accept ("JPEG" also opens MPO, the multi-picture JPEG that many phone cameras write).
# Naming them also stops PIL from guessing that a random file is, say, a headerless TGA image.
FORMATS = ("JPEG", "PNG", "WEBP")


class DataError(ValueError):
    """A photo folder that minidb cannot use. The message is one sentence for the user."""


def load_images(folder, resolution, flip=False):
    """Read every photo in `folder` -> (images (N, 3, R, R) float32 in [-1, 1], names).

    `names[i]` is the file that row i came from. With `flip=True` a mirrored copy of every photo is
    appended (rows N..2N-1, named "<file> (mirrored)"), a cheap way to double a small data set."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder} does not exist; check the path to your photos.")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; pass the folder that holds your photos.")

    images, names, unreadable, small = [], [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        try:
            with Image.open(path, formats=FORMATS) as im:
                w, h = im.size  # as stored, before draft() shrinks it; turning it does not change the short side
                images.append(_to_tensor(_square(_to_rgb(_upright(im, resolution)), resolution)))
            names.append(path.name)
            if min(w, h) < resolution:
                small.append(f"{path.name} ({w}×{h})")
        except UnidentifiedImageError:
            unreadable.append(f"{path.name} (not a JPEG, PNG or WebP image)")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            unreadable.append(f"{path.name} ({str(e).splitlines()[0] if str(e) else 'damaged'})")

    if unreadable:
        warnings.warn(f"Skipped {len(unreadable)} file(s) in {folder} that could not be read as photos: "
                      f"{', '.join(unreadable)}.", stacklevel=2)
    if not images:
        raise DataError(f"{folder} has no readable JPEG, PNG or WebP photos; put the photos to train on there.")
    if small:
        warnings.warn(f"{len(small)} photo(s) in {folder} are smaller than {resolution} pixels on the short side "
                      f"and were upscaled, which blurs them; use larger photos if you can: {', '.join(small)}.",
                      stacklevel=2)

    images = torch.stack(images)  # (N, 3, R, R)
    if flip:
        # Appended in a fixed order, not flipped at random per step: each row must stay the same
        # picture, because train.py encodes every row to a latent once and reuses it.
        images = torch.cat([images, images.flip(3)])  # (2N, 3, R, R); dim 3 is the width
        names = names + [f"{n} (mirrored)" for n in names]
    return images, names


def _upright(im, resolution):
    """Decode the pixels, turned as the EXIF orientation tag says (phones store photos sideways)."""
    # For JPEG, draft() lets the decoder skip detail we would throw away: it decodes at 1/2, 1/4 or
    # 1/8 scale while both sides stay >= resolution. A 24-megapixel photo then needs a fraction of
    # the memory and time. Other formats ignore it.
    im.draft(im.mode, (resolution, resolution))
    im.load()  # decode now, so a truncated file fails here with a clear OSError
    return ImageOps.exif_transpose(im)


def _to_rgb(im):
    """Any PIL mode -> 8-bit RGB, without the classic mistakes."""
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        # 16-bit greyscale. PIL's convert() clips these to 255 instead of scaling, so a 16-bit
        # PNG would come out almost all white. 65535 / 257 = 255 exactly.
        pixels = np.asarray(im).astype(np.float32) / 257
        im = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8), mode="L")
    if im.has_transparency_data:
        # RGBA, LA, PA, or a palette / greyscale image with a transparent colour. Dropping alpha
        # would leave whatever colour hides under it, usually black; a white backdrop is what the
        # user saw in their image viewer.
        rgba = im.convert("RGBA")
        im = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im.alpha_composite(rgba)
    return im.convert("RGB")  # L, P, CMYK, YCbCr, RGBA-over-white -> RGB; a no-op for RGB


def _square(im, resolution):
    """Short side -> resolution, then the centre resolution × resolution crop, in one resize."""
    w, h = im.size
    s = min(w, h)
    # The box is the centred s × s square in source pixels (fractional edges are fine), so the crop
    # is exact and Lanczos filtering averages every source pixel that maps to an output pixel.
    box = ((w - s) / 2, (h - s) / 2, (w + s) / 2, (h + s) / 2)
    return im.resize((resolution, resolution), Image.Resampling.LANCZOS, box=box)


def _to_tensor(im):
    """8-bit RGB image -> (3, H, W) float32 in [-1, 1]: 0 -> -1, 255 -> 1."""
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32))  # (H, W, 3)
    return (pixels / 127.5 - 1).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
