"""What a PNG says about how it was drawn, written as AUTOMATIC1111 writes it.

A1111 stores a picture's settings as one text chunk named "parameters": the prompt, a line
"Negative prompt: ...", and a last line of "Key: value" fields (modules/processing.py create_infotext).
Its "PNG Info" tab, ComfyUI and civitai read that chunk back. ComfyUI reads a chunk named "prompt" as
its own JSON workflow before it looks at "parameters", so no other chunk may be called that; minidb's
own settings go into one chunk named "minidb" (JSON), with no paths of the user's machine. A1111 leaves
the negative line out when there is no negative prompt, but ComfyUI builds a workflow from the chunk
only when it finds "\nNegative prompt:" (ComfyUI_frontend, src/scripts/pnginfo.ts importA1111), so
minidb always writes it, empty if need be: A1111 reads an empty one as no negative prompt.

Hashes are A1111's short ones: a model's first 10 hex digits of the file's sha256; a LoRA's first 12
of the sha256 of the bytes after a safetensors file's header (the "addnet" hash, modules/hashes.py),
or of the whole file for a LoRA saved as a pickle (.bin, .pt, .ckpt: extensions-builtin/Lora/network.py
takes the addnet hash only where is_safetensors); an embedding's first 12 of the file's sha256.
"""

import hashlib
import json
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from minidb.writes import atomic_write


def sha256(path, skip_header=False):
    """The file's sha256 in hex; with skip_header, of what follows a .safetensors file's header (A1111's addnet
    hash). Any other file, such as a pickle, has no such header and is hashed whole, as A1111 hashes it."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header and Path(path).suffix.lower() == ".safetensors":  # 8 bytes of header length, then the header
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def quote(value):
    """A1111's infotext_utils.quote: a value holding a comma, colon or newline is written as a JSON string."""
    value = str(value)
    return json.dumps(value, ensure_ascii=False) if any(c in value for c in ",:\n") else value



def hashes(named):
    """A1111's "Lora hashes" and "TI hashes" fields: "name: hash, name: hash", or None for none. The names lose
    the ":" and "," that would split the field, as A1111 writes them (extra_networks_lora.py, sd_hijack_clip.py)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {short}" for name, short in named) or None

def parameters(prompt, negative_prompt, fields):
    """The "parameters" text. `fields` in A1111's order (None values left out): Steps, Sampler, Schedule type,
    CFG scale, Seed, Size, Model hash, Model, RNG, then extras such as Lora hashes and TI hashes."""
    lines = [prompt, f"Negative prompt: {negative_prompt or ''}"]  # even empty: see above
    lines.append(", ".join(f"{k}: {quote(v)}" for k, v in fields.items() if v is not None))
    return "\n".join(lines)


def save_png(image, path, parameters_text, settings):
    """Write the PNG with A1111's one text chunk and minidb's, nothing else. add_text writes tEXt when the
    text is Latin-1 and iTXt (UTF-8) otherwise, as A1111 does."""
    info = PngInfo()
    info.add_text("parameters", parameters_text)
    info.add_text("minidb", json.dumps(settings))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))
