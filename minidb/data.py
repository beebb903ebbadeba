"""Reading the training photos: a folder of JPEG, PNG or WebP files -> one (N, 3, R, R) tensor.

DreamBooth learns a subject from a handful of photos (3-20) and, with prior preservation, a few
hundred photos of its class. Both folders are read here the same way (but for captions, below):

    every regular, non-hidden file, sorted by name (a stable order, since train.py caches one
    latent per image), opened by content with PIL, whatever its extension
    -> turned upright as the camera's EXIF orientation tag says
    -> 8-bit RGB; transparent areas become white, 16-bit values are scaled down to 8 bits
    -> short side resized to R, the centre R×R kept   (one Lanczos resize, so it is antialiased)
    -> channels first, scaled from [0, 255] to [-1, 1], the range the VAE encoder was trained on

A photo may have a caption: `photo.txt` beside `photo.jpg` (the convention of diffusers' and kohya's
datasets), read as UTF-8; train.py uses it instead of the instance prompt for that photo, with "[V]"
standing for the subject's identifier. Caption files are not photos, so they are never warned about.
Class photos' captions are never used, so with captions=False (train.py's --class-dir) they are not
read at all: an empty one does not stop the run, and a stray one is not warned of.

With --random-crop, each photo is also kept whole (short side R, not cropped), for a fresh crop per
step.

SDXL also wants to know what each photo looked like before that: its size as taken, (height, width)
upright, and the top-left corner of the crop in the resized photo (Podell et al. 2023, section 2.2:
micro-conditioning). Those two come back beside the pixels.

Files that are not readable images are skipped with one warning that names them all, and so are
photos smaller than R, which are upscaled and come out blurry. PIL's own warnings while reading a
photo (a decompression bomb's size, damaged EXIF data) come back with the photo's path in front, so
the user knows which one it is. One file is decoded at a time, so memory holds full-size pixels of a
single photo only.
"""

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Formats we accept ("JPEG" also opens MPO, the multi-picture JPEG that many phone cameras write).
# Naming them also stops PIL from guessing that a random file is, say, a headerless TGA image.
FORMATS = ("JPEG", "PNG", "WEBP")


class DataError(ValueError):
    """A photo folder that minidb cannot use. The message is one sentence for the user."""


class Photos(NamedTuple):
    pixels: torch.Tensor  # (N, 3, R, R) float32 in [-1, 1]
    names: list  # the file each row came from
    original_sizes: list  # (height, width) of each photo as taken, upright, before resizing
    crops: list  # (top, left) of the R x R crop in the photo resized to a short side of R
    captions: list  # each photo's own caption (from photo.txt), or None
    whole: list = None  # with whole=True: each photo resized to a short side of R, uncropped (3, H', W')


MIRRORED = " (mirrored)"  # what --flip adds to a photo's name for its mirrored copy


def fingerprint(photos):
    """What --resume checks a run's photos against (minidb/resume.py): a short sha256 of each photo as training
    reads it (its pixels, caption, size and crop), by name. A photo added, removed, edited or recaptioned makes
    another run; a file saved again with the same pixels (its metadata changed, say) does not."""
    wholes = photos.whole or [None] * len(photos.names)
    found = {}
    for i, name in enumerate(photos.names):
        digest = hashlib.sha256(json.dumps([photos.captions[i], photos.original_sizes[i], photos.crops[i]]).encode())
        for pixels in (photos.pixels[i], wholes[i]):
            if pixels is not None:
                digest.update(pixels.contiguous().numpy())
        found[name] = digest.hexdigest()[:12]
    return found


def load_images(folder, resolution, flip=False, whole=False, captions=True, what="photos"):
    """Read every photo in `folder` -> Photos(pixels, names, original_sizes, crops, captions[, whole]).

    With `flip=True` a mirrored copy of every photo is appended (rows N..2N-1, named "<file>
    (mirrored)"), a cheap way to double a small data set; a centred crop is mirrored onto itself, so
    the copies keep their photo's size and crop. With `captions=False` no caption file is read or
    warned of, and every caption is None (for class photos, whose captions nothing uses). `what` names
    the photos in the errors ("class photos (--class-dir)")."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder} does not exist; check the path to your {what}.")
    if not folder.is_dir():
        raise DataError(f"{folder} is a file, not a folder; pass the folder that holds your {what}.")

    images, names, sizes, texts, wholes, unreadable, small = [], [], [], [], [], [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                       and p.suffix.lower() != ".txt"):
        try:
            # PIL's warnings (DecompressionBombWarning, "Corrupt EXIF data", ...) do not say which file they
            # are about: catch them here and pass each on with the photo's path in front, on one line.
            with warnings.catch_warnings(record=True) as caught, Image.open(path, formats=FORMATS) as im:
                w, h = im.size  # as stored, before draft() shrinks it; turning it does not change the short side
                turned = im.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)  # a quarter turn
                rgb = _to_rgb(_upright(im, resolution))
                images.append(_to_tensor(_square(rgb, resolution)))
                if whole:
                    wholes.append(_to_tensor(_short_side(rgb, resolution)))
            for warning in caught:
                warnings.warn(f"{path}: {' '.join(str(warning.message).split())}", warning.category, stacklevel=2)
            names.append(path.name)
            sizes.append((w, h) if turned else (h, w))  # (height, width) upright
            if min(w, h) < resolution:
                small.append(f"{path.name} ({w}×{h})")
        except UnidentifiedImageError:
            unreadable.append(f"{path.name} (" + ("HEIC, as iPhones save photos: export it as JPEG"
                                                  if path.suffix.lower() in (".heic", ".heif")
                                                  else "not a JPEG, PNG or WebP image") + ")")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            unreadable.append(f"{path.name} ({str(e).splitlines()[0] if str(e) else 'damaged'})")
        else:  # outside the try: a bad caption is an error, not a skipped photo
            texts.append(_caption(path) if captions else None)

    if unreadable:
        warnings.warn(f"Skipped {len(unreadable)} file(s) in {folder} that could not be read as photos: "
                      f"{', '.join(unreadable)}.", stacklevel=2)
    if not images:
        raise DataError(f"{folder} has no readable JPEG, PNG or WebP photos; put the {what} to train on there.")
    # samefile, below: on a case-insensitive disk Photo1.txt is photo1.txt; a link to nothing is no caption
    read = [r for name in names if (r := _caption_path(folder / name))]
    orphans = [] if not captions else sorted(  # class photos: their caption files are not read, nor warned of
        t.name for t in {*folder.glob("*.txt"), *folder.glob("*.TXT")}
        if not t.name.startswith(".") and t.exists() and not any(os.path.samefile(t, r) for r in read))
    if orphans:  # most likely a caption whose name does not match its photo's: Photo1.txt for photo1.jpg
        warnings.warn(f"{len(orphans)} caption file(s) in {folder} have no photo of the same name and are not used: "
                      f"{', '.join(orphans[:5])}{', ...' if len(orphans) > 5 else ''} (photo.jpg takes its caption "
                      "from photo.txt).", stacklevel=2)
    if small:
        warnings.warn(f"{len(small)} photo(s) in {folder} are smaller than {resolution} pixels on the short side "
                      f"and were upscaled, which blurs them; use larger photos if you can: {', '.join(small)}.",
                      stacklevel=2)

    images = torch.stack(images)  # (N, 3, R, R)
    if flip:
        # Appended in a fixed order, not flipped at random per step: each row must stay the same
        # picture, because train.py encodes every row to a latent once and reuses it.
        images = torch.cat([images, images.flip(3)])  # (2N, 3, R, R); dim 3 is the width
        names, sizes = names + [n + MIRRORED for n in names], sizes + sizes
        texts, wholes = texts + texts, wholes + [w.flip(2) for w in wholes]
    return Photos(images, names, sizes, [crop_top_left(size, resolution) for size in sizes], texts,
                  wholes if whole else None)


def _caption_path(photo):
    """photo.txt beside the photo (or photo.TXT, as cameras and Windows tools name it), or None."""
    return next((path for path in (photo.with_suffix(".txt"), photo.with_suffix(".TXT")) if path.exists()), None)


def _caption(photo):
    """The caption in photo.txt beside the photo, or None; an empty or unreadable one is an error."""
    path = _caption_path(photo)
    if path is None:
        return None
    try:
        text = " ".join(path.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"The caption {path} cannot be read ({e.__class__.__name__}); save it as UTF-8 text, "
                        "or remove it to use the instance prompt.") from None
    if not text:
        raise DataError(f"The caption {path} is empty; write the photo's caption in it, or remove it to use "
                        "the instance prompt.")
    return text


def crop_top_left(size, resolution):
    """(top, left) of the centred R x R crop, in the photo resized to a short side of R: what SDXL's
    crop conditioning means. Computed as diffusers' train_dreambooth_lora_sdxl.py does (torchvision's
    Resize truncates the long side, the offset is rounded), so that its runs and ours agree."""
    h, w = size
    short = min(h, w)
    h, w = (resolution, int(resolution * w / short)) if h == short else (int(resolution * h / short), resolution)
    return round((h - resolution) / 2), round((w - resolution) / 2)


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


def _short_side(im, resolution):
    """Short side -> resolution, nothing cropped (for --random-crop)."""
    w, h = im.size
    s = min(w, h)
    size = (resolution, int(resolution * h / s)) if w == s else (int(resolution * w / s), resolution)
    return im.resize(size, Image.Resampling.LANCZOS)


def _to_tensor(im):
    """8-bit RGB image -> (3, H, W) float32 in [-1, 1]: 0 -> -1, 255 -> 1."""
    pixels = torch.from_numpy(np.asarray(im, dtype=np.float32))  # (H, W, 3)
    return (pixels / 127.5 - 1).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)
