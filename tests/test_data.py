"""Reading training photos: every image is drawn here with PIL / numpy into a temporary folder,
with a known colour or marker, and we check where that colour or marker comes out."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from minidb import data
from minidb.data import DataError, load_images

RED, GREEN, BLUE, WHITE, GREY = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (128,) * 3


def pixels(images, i=0):
    """Row i of the loaded tensor back to (H, W, 3) values in 0..255, for readable comparisons."""
    return ((images[i].permute(1, 2, 0) + 1) * 127.5).numpy()


def load_quietly(folder, resolution, **kw):
    """load_images, failing the test on any warning the test did not ask for."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return load_images(folder, resolution, **kw)


def one_sentence(error):
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    return message


# ----- output format and geometry -----

def test_flat_colour_exact_values(tmp_path):
    Image.new("RGB", (40, 30), RED).save(tmp_path / "red.png")
    images, names, *_ = load_quietly(tmp_path, 16)
    assert images.shape == (1, 3, 16, 16) and images.dtype == torch.float32 and names == ["red.png"]
    assert torch.equal(images[0], torch.tensor([1.0, -1.0, -1.0])[:, None, None].expand(3, 16, 16))


def test_value_range_of_a_noisy_photo(tmp_path):
    # Lanczos overshoots at sharp edges; the result must still stay inside [-1, 1].
    noise = np.random.default_rng(0).integers(0, 256, (90, 70, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "noise.png")
    images, *_ = load_quietly(tmp_path, 32)
    assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.2  # really varied, in range


def test_wide_image_is_cropped_at_the_sides_not_squashed(tmp_path):
    # 200×100: the centre 100×100 square is kept, then halved to 50×50. Green outside that square
    # must vanish; a blue stripe just inside its left edge (x 50..60) must land at columns 0..5.
    im = Image.new("RGB", (200, 100), GREY)
    draw = ImageDraw.Draw(im)
    draw.rectangle((0, 0, 49, 99), fill=GREEN)
    draw.rectangle((150, 0, 199, 99), fill=GREEN)
    draw.rectangle((50, 0, 59, 99), fill=BLUE)
    draw.rectangle((90, 40, 109, 59), fill=RED)  # marker at the centre
    im.save(tmp_path / "wide.png")
    p = pixels(load_quietly(tmp_path, 50)[0])
    assert p[:, :, 1].max() < 140  # no green left (grey is 128)
    assert np.abs(p[:, 1:4] - BLUE).max() < 20  # the stripe starts at the left edge
    assert np.abs(p[:, 7:] - BLUE).max() > 100  # and ends by column 5
    assert np.abs(p[21:29, 21:29] - RED).max() < 20  # marker still in the centre...
    assert np.abs(p[:17, 20:30] - GREY).max() < 20 and np.abs(p[33:, 20:30] - GREY).max() < 20  # ...and round


def test_tall_image_keeps_its_centre(tmp_path):
    im = Image.new("RGB", (60, 120), GREY)
    ImageDraw.Draw(im).rectangle((0, 0, 59, 29), fill=GREEN)  # top quarter: outside the centre square
    ImageDraw.Draw(im).rectangle((24, 54, 35, 65), fill=RED)
    im.save(tmp_path / "tall.png")
    p = pixels(load_quietly(tmp_path, 30)[0])
    assert p[:, :, 1].max() < 140
    assert np.abs(p[13:17, 13:17] - RED).max() < 20 and np.abs(p[:8] - GREY).max() < 20


def test_downscaling_is_antialiased(tmp_path):
    # One-pixel black and white stripes shrunk 4×: a proper filter averages them to grey, while
    # picking one source pixel per output pixel (nearest neighbour) keeps pure black or white.
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::2] = 255
    Image.fromarray(stripes).save(tmp_path / "stripes.png")
    p = pixels(load_quietly(tmp_path, 16)[0])
    assert np.abs(p - 127.5).max() < 20


def test_small_image_is_upscaled_with_one_warning(tmp_path):
    Image.new("RGB", (12, 10), BLUE).save(tmp_path / "small.png")
    Image.new("RGB", (10, 20), RED).save(tmp_path / "small2.png")
    Image.new("RGB", (64, 64), RED).save(tmp_path / "big.png")
    with pytest.warns(UserWarning) as record:
        images, names, *_ = load_images(tmp_path, 32)
    assert len(record) == 1
    message = str(record[0].message)
    assert "small.png (12×10)" in message and "small2.png (10×20)" in message and "big.png" not in message
    assert images.shape == (3, 3, 32, 32) and names == ["big.png", "small.png", "small2.png"]
    assert np.abs(pixels(images, 1) - BLUE).max() < 1


def test_files_are_sorted_by_name(tmp_path):
    for name, colour in [("b.png", GREEN), ("c.png", BLUE), ("a.png", RED)]:
        Image.new("RGB", (8, 8), colour).save(tmp_path / name)
    images, names, *_ = load_quietly(tmp_path, 8)
    assert names == ["a.png", "b.png", "c.png"]
    assert [tuple(pixels(images, i)[0, 0].round()) for i in range(3)] == [RED, GREEN, BLUE]


def test_flip_appends_mirrored_copies(tmp_path):
    for name, colour in [("a.png", RED), ("b.png", BLUE)]:
        im = Image.new("RGB", (16, 16), GREY)
        ImageDraw.Draw(im).rectangle((0, 0, 3, 15), fill=colour)  # a stripe on the left
        im.save(tmp_path / name)
    plain, *_ = load_quietly(tmp_path, 16)
    images, names, *_ = load_quietly(tmp_path, 16, flip=True)
    assert names == ["a.png", "b.png", "a.png (mirrored)", "b.png (mirrored)"]
    assert torch.equal(images[:2], plain)
    assert torch.equal(images[2:], plain.flip(-1))
    assert np.abs(pixels(images, 2)[:, -4:] - RED).max() < 1  # the stripe is now on the right


def test_each_photo_reports_its_size_as_taken_and_its_crop(tmp_path):
    """SDXL's micro-conditioning: (height, width) before resizing, and the crop's top-left corner in the
    photo resized to a short side of R, as diffusers' train_dreambooth_lora_sdxl.py computes them."""
    Image.new("RGB", (200, 100), RED).save(tmp_path / "a-wide.png")
    Image.new("RGB", (60, 125), RED).save(tmp_path / "b-tall.png")
    Image.new("RGB", (48, 48), RED).save(tmp_path / "c-square.png")
    big = np.random.default_rng(0).integers(0, 256, (300, 1000, 3), dtype=np.uint8)
    Image.fromarray(big).save(tmp_path / "d-big.jpg")  # JPEG: draft() decodes it smaller, the size is still its own
    photos = load_quietly(tmp_path, 40, flip=True)
    assert photos.original_sizes == [(100, 200), (125, 60), (48, 48), (300, 1000)] * 2
    # resized to a short side of 40: 40x80 -> left (80 - 40) / 2; 83x40 (torchvision truncates 83.3) -> top
    # round(21.5) = 22; 40x40 -> none; 40x133 -> left round(46.5) = 46 (Python rounds half to even)
    assert photos.crops == [(0, 20), (22, 0), (0, 0), (0, 46)] * 2


def test_a_photo_stored_sideways_reports_its_upright_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 60 wide, 40 high; seen 40 wide, 60 high
    Image.new("RGB", (60, 40), RED).save(tmp_path / "sideways.jpg", exif=exif)
    photos = load_quietly(tmp_path, 20)
    assert photos.original_sizes == [(60, 40)] and photos.crops == [(5, 0)]


# ----- orientation and colour modes -----

@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied(tmp_path, fmt):
    # A 60×40 photo stored sideways with orientation 6 ("rotate 90° clockwise to view"). A red
    # block in the top-left of its centre square must end up top-right after turning. Turning the
    # wrong way puts it bottom-left; ignoring the tag leaves it top-left.
    im = Image.new("RGB", (60, 40), GREY)
    ImageDraw.Draw(im).rectangle((10, 0, 19, 9), fill=RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation
    im.save(tmp_path / f"photo.{fmt.lower()}", fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {}))
    p = pixels(load_quietly(tmp_path, 40)[0])
    corners = {"top-left": p[1:8, 1:8], "top-right": p[1:8, 32:39],
               "bottom-left": p[32:39, 1:8], "bottom-right": p[32:39, 32:39]}
    red = [name for name, c in corners.items() if np.abs(c - RED).max() < 40]
    assert red == ["top-right"]


def test_jpeg_png_webp_read_by_content(tmp_path):
    colour = (200, 100, 50)
    Image.new("RGB", (20, 20), colour).save(tmp_path / "a.jpg", quality=95)
    Image.new("RGB", (20, 20), colour).save(tmp_path / "b.png")
    Image.new("RGB", (20, 20), colour).save(tmp_path / "c.webp", lossless=True)
    Image.new("RGB", (20, 20), colour).save(tmp_path / "d.png", "JPEG")  # a JPEG with the wrong extension
    Image.new("RGB", (20, 20), colour).save(tmp_path / "e", "WEBP")  # and one with none
    images, names, *_ = load_quietly(tmp_path, 20)
    assert names == ["a.jpg", "b.png", "c.webp", "d.png", "e"]
    for i in range(len(names)):
        assert np.abs(pixels(images, i) - colour).max() < 6, names[i]


def _half_transparent(mode):
    """A 20×20 image whose left half is fully transparent (black underneath) and right half opaque."""
    if mode == "RGBA":
        a = np.zeros((20, 20, 4), np.uint8)
        a[:, 10:] = (0, 0, 255, 255)
        return Image.fromarray(a, "RGBA"), BLUE
    if mode == "LA":
        a = np.zeros((20, 20, 2), np.uint8)
        a[:, 10:] = (100, 255)
        return Image.fromarray(a, "LA"), (100,) * 3
    im = Image.new("P", (20, 20), 0)  # "P": palette index 0 black and transparent, index 1 green
    im.putpalette([0, 0, 0, 0, 255, 0])
    ImageDraw.Draw(im).rectangle((10, 0, 19, 19), fill=1)
    im.info["transparency"] = 0
    return im, GREEN


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparent_background_becomes_white(tmp_path, mode):
    im, opaque = _half_transparent(mode)
    im.save(tmp_path / "cutout.png", **({"transparency": 0} if mode == "P" else {}))
    assert Image.open(tmp_path / "cutout.png").mode == mode
    p = pixels(load_quietly(tmp_path, 20)[0])
    assert np.abs(p[:, :8] - WHITE).max() < 1  # not black
    assert np.abs(p[:, 12:] - opaque).max() < 1


def test_half_transparent_pixels_are_blended_with_white(tmp_path):
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(tmp_path / "ghost.png")
    p = pixels(load_quietly(tmp_path, 8)[0])
    assert np.abs(p - (255, 127, 127)).max() < 2


@pytest.mark.parametrize("mode, colour, expected", [
    ("L", 100, (100, 100, 100)),
    ("P", 1, (10, 200, 30)),  # palette without transparency
    ("CMYK", (0, 255, 255, 0), RED),  # full magenta + yellow ink = red
    ("CMYK", (255, 0, 0, 0), (0, 255, 255)),  # cyan
    ("CMYK", (0, 0, 0, 128), (127, 127, 127)),  # half black ink = mid grey
])
def test_colour_modes_become_rgb(tmp_path, mode, colour, expected):
    im = Image.new(mode, (16, 16), colour)
    if mode == "P":
        im.putpalette([0, 0, 0, 10, 200, 30])
    im.save(tmp_path / "x.jpg" if mode == "CMYK" else tmp_path / "x.png")  # PNG cannot hold CMYK
    assert Image.open(next(tmp_path.iterdir())).mode == mode
    p = pixels(load_quietly(tmp_path, 16)[0])
    assert np.abs(p - expected).max() < 8


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    a = np.zeros((30, 30), np.uint16)
    a[:, 10:20], a[:, 20:] = 32768, 65535
    Image.fromarray(a).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    p = pixels(load_quietly(tmp_path, 30)[0])
    assert np.allclose(p[:, 2:8], 0) and np.allclose(p[:, 12:18], 128) and np.allclose(p[:, 22:28], 255)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_modes(mode):
    values = np.array([[0, 257, 32768, 250 * 257, 65535]])  # 8-bit value v is 16-bit v * 257
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    im = Image.frombytes(mode, (5, 1), values.astype(dtype).tobytes())
    assert np.asarray(data._to_rgb(im))[0, :, 0].tolist() == [0, 1, 128, 250, 255]


# ----- unreadable files and unusable folders -----

def test_unreadable_files_are_skipped_with_one_warning(tmp_path):
    Image.new("RGB", (16, 16), RED).save(tmp_path / "good.png")
    Image.new("RGB", (16, 16), BLUE).save(tmp_path / "good2.jpg")
    rng = np.random.default_rng(0)
    full = tmp_path / "full.jpg"
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(full)
    (tmp_path / "truncated.jpg").write_bytes(full.read_bytes()[:1500])
    full.unlink()
    (tmp_path / "random.jpg").write_bytes(rng.bytes(5000))
    (tmp_path / "notes.md").write_text("shot on a sunny day\n")
    Image.new("RGB", (16, 16), RED).save(tmp_path / "old.bmp")  # a real image, but not a format we read
    (tmp_path / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + rng.bytes(200))  # an iPhone's photo
    (tmp_path / ".DS_Store").write_bytes(rng.bytes(100))  # hidden: ignored, not reported
    (tmp_path / "more").mkdir()  # folders are not photos either
    with pytest.warns(UserWarning) as record:
        images, names, *_ = load_images(tmp_path, 16)
    assert len(record) == 1
    message = str(record[0].message)
    assert "\n" not in message
    for bad in ["truncated.jpg", "random.jpg", "notes.md", "old.bmp"]:
        assert bad in message
    assert "IMG_0001.HEIC (HEIC, as iPhones save photos: export it as JPEG)" in message
    assert ".DS_Store" not in message and "more" not in message and "good" not in message
    assert names == ["good.png", "good2.jpg"] and images.shape == (2, 3, 16, 16)


def test_pil_warnings_name_the_photo(tmp_path, monkeypatch):
    """PIL's own warnings (here its decompression-bomb warning, with the limit lowered so that a small
    photo trips it) said nothing of which photo they were about: each now names it, once, on one line."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40 x 30 = 1200 pixels: a warning, not yet an error
    Image.new("RGB", (40, 30), RED).save(tmp_path / "huge.png")
    Image.new("RGB", (20, 20), BLUE).save(tmp_path / "fine.png")
    with pytest.warns(Image.DecompressionBombWarning) as record:
        images, names, *_ = load_images(tmp_path, 16)
    assert [str(r.message) for r in record] == [f"{tmp_path / 'huge.png'}: Image size (1200 pixels) exceeds limit "
                                                "of 1000 pixels, could be decompression bomb DOS attack."]
    assert record[0].filename == __file__  # pointed at the caller, as the folder's other warnings are
    assert names == ["fine.png", "huge.png"] and images.shape == (2, 3, 16, 16)  # the photo is still read


def test_empty_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_images(tmp_path, 16)
    assert "no readable JPEG, PNG or WebP" in one_sentence(e)
    assert isinstance(e.value, ValueError)


def test_folder_without_images(tmp_path):
    (tmp_path / "readme.md").write_text("my dog")
    with pytest.warns(UserWarning, match="readme.md"), pytest.raises(DataError) as e:
        load_images(tmp_path, 16)
    assert str(tmp_path) in one_sentence(e)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError) as e:
        load_images(tmp_path / "no-such-folder", 16)
    assert "does not exist" in one_sentence(e)


def test_file_instead_of_folder(tmp_path):
    Image.new("RGB", (16, 16), RED).save(tmp_path / "dog.png")
    with pytest.raises(DataError) as e:
        load_images(tmp_path / "dog.png", 16)
    assert "not a folder" in one_sentence(e)


# ----- captions -----

def test_a_caption_without_its_photo_is_warned_of_and_the_others_are_read(tmp_path):
    """photo.txt captions photo.jpg; a caption whose name matches no photo (Photo1.txt beside photo1.png)
    would otherwise be dropped without a word."""
    for name in ("photo1", "photo2"):
        Image.new("RGB", (16, 16), RED).save(tmp_path / f"{name}.png")
    (tmp_path / "photo1.txt").write_text("a [V] dog on grass\n")
    assert load_quietly(tmp_path, 16).captions == ["a [V] dog on grass", None]  # matched: no warning
    (tmp_path / "zz.txt").symlink_to(tmp_path / "nowhere")  # a link to nothing is no caption (it was a traceback)
    assert load_quietly(tmp_path, 16).captions == ["a [V] dog on grass", None]
    (tmp_path / "Photo2.txt").write_text("a [V] dog asleep")
    with pytest.warns(UserWarning, match=r"1 caption file\(s\) in .* have no photo of the same name and are not "
                                         r"used: Photo2.txt \(photo.jpg takes its caption from photo.txt\)."):
        photos = load_images(tmp_path, 16)
    assert photos.captions == ["a [V] dog on grass", None]
    # a camera's upper-case names caption as well (IMG_1.TXT beside IMG_1.PNG was dropped without a word)
    upper = tmp_path / "upper"
    upper.mkdir()
    Image.new("RGB", (16, 16), RED).save(upper / "IMG_1.PNG")
    (upper / "IMG_1.TXT").write_text("a [V] dog by the sea")
    assert load_quietly(upper, 16).captions == ["a [V] dog by the sea"]


def test_class_photos_captions_are_not_read(tmp_path):
    """Class photos train with the class prompt, never a caption: with captions=False an empty or non-UTF-8
    caption does not stop the run (it did, for train.py --class-dir), and a stray one is not warned of."""
    for name in ("a", "b", "c"):
        Image.new("RGB", (16, 16), RED).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("  \n")
    (tmp_path / "b.TXT").write_bytes(b"\xff\xfe a dog")
    (tmp_path / "c.txt").write_text("a dog on grass")
    (tmp_path / "stray.txt").write_text("a dog")
    photos = load_quietly(tmp_path, 16, captions=False)
    assert photos.names == ["a.png", "b.png", "c.png"] and photos.captions == [None, None, None]
    with pytest.raises(DataError, match="is empty"):  # a subject's captions are still read, and checked
        load_images(tmp_path, 16)


def test_captions_are_counted_once_with_flip_and_class_photos_are_named_as_such(tmp_path):
    """--flip printed "2 photos use their own captions" for one caption (its mirrored copy counted too), and a
    missing --class-dir was "check the path to your photos", as if the subject's."""
    from minidb.concepts import Subject
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), RED).save(tmp_path / f"{name}.png")
    (tmp_path / "a.txt").write_text("[V] on grass")
    subject = Subject(str(tmp_path), "ball", "sks", "a photo of sks ball", "a photo of a ball")
    subject.photos = load_quietly(tmp_path, 16, flip=True)
    assert len(subject.photos.captions) == 4 and "4 images at 16px" in subject.describe(16)
    assert "(1 photo uses its own caption)" in subject.describe(16)
    with pytest.raises(DataError) as e:
        load_images(tmp_path / "nope", 16, what="class photos (--class-dir)")
    assert str(e.value) == f"{tmp_path / 'nope'} does not exist; check the path to your class photos (--class-dir)."
