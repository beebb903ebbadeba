"""Reading tensor files safely.

- `.safetensors` is the format to prefer: a JSON header and raw tensor bytes, nothing executable.
- `.ckpt` / `.bin` / `.pt` are pickles. A pickle can run arbitrary code when loaded, so we only ever
  read them with `torch.load(weights_only=True)`, which accepts tensors and plain containers and
  refuses everything else.
- A file that cannot be read (truncated, corrupt, not weights at all) is a ModelFileError: one sentence
  for the user. Writing is the other half, in minidb/writes.py.
"""

import json
import pickle
import re
import struct
import warnings
import zipfile
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")  # PyTorch's pickles: read with weights_only, never written
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)  # what a weights file's name ends with


class ModelFileError(ValueError):
    """A model file or folder that minidb cannot use. The message is one sentence for the user."""


def read_tensors(path):
    """Read every tensor of a weights file -> (dict name -> tensor, safetensors metadata or {})."""
    path = Path(path)
    problem = not_a_file(path)
    if problem:
        raise ModelFileError(problem)
    if path.suffix.lower() == ".safetensors":
        return _read_safetensors(path)
    return _read_pickle(path), {}


def not_a_file(path):
    """Why `path` cannot be read as a weights file (a folder, nothing, a device or a pipe), or None."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*") if p.suffix.lower() in WEIGHT_SUFFIXES)
        held = f" (it holds {', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''})" if inside else ""
        return f"{path} is a folder, not a weights file; pass the file itself{held}."
    if not path.is_file():
        return f"{path} {'is not a regular file (a device or a pipe)' if path.exists() else 'does not exist'}; check the path."
    return None


def read_metadata(path):
    """A .safetensors file's metadata alone, no tensors read; {} for anything else or a file that cannot be read."""
    if Path(path).suffix.lower() != ".safetensors" or not Path(path).is_file():
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return {}


def tensor_names(path):
    """The names of a .safetensors file's tensors, from its header alone (none is read); None for a file that is
    not safetensors or cannot be read."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return set(f.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None


def _read_safetensors(path):
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise ModelFileError(f"{path} is not a readable safetensors file ({_first_line(e)}); "
                             "it may be truncated or corrupt, so download or export it again.") from None


class _LightningCallback:
    """Stands in for the callback *class* that PyTorch Lightning used as a dictionary key in the
    training state of the original SD 1.x checkpoints. Nothing of it is called or kept."""


# Harmless names found in the training state of public SD checkpoints, allowed by name only.
# Everything else that is not a tensor or a plain container is refused by weights_only.
_ALLOWED_GLOBALS = [
    (_LightningCallback, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (np.dtype, "numpy.dtype"),
    (np.dtypes.Float64DType, "numpy.dtypes.Float64DType"),
    (np.dtypes.Float32DType, "numpy.dtypes.Float32DType"),
    (np._core.multiarray.scalar, "numpy.core.multiarray.scalar"),
    (np._core.multiarray.scalar, "numpy._core.multiarray.scalar"),
]


def _allowed_globals():
    """_ALLOWED_GLOBALS for the next torch.load: scoped to it from torch 2.5 on (safe_globals). torch 2.4
    has only the process-wide list, and takes no name aliases: there the plain classes are added, and a
    checkpoint holding Lightning's callback is refused in one sentence, as any unknown object is."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals(_ALLOWED_GLOBALS)
    torch.serialization.add_safe_globals([g for g, _ in _ALLOWED_GLOBALS if g is not _LightningCallback])
    return nullcontext()


def _read_pickle(path):
    # mmap keeps the file's pages on disk until each tensor is used: no second copy in RAM.
    # Only the zip-based format (torch >= 1.6) can be memory-mapped.
    try:
        with _allowed_globals(), warnings.catch_warnings():  # torch's "please file an issue" about a pickle
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # it refuses anyway: not the user's
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        if "GLOBAL" not in str(e):  # not a refused object: bytes that are no pickle at all
            raise _not_a_checkpoint(path, f" ({_pickle_problem(e)})") from None
        raise ModelFileError(f"{path} holds pickled Python objects besides tensors ({_unsafe_global(e)}), and "
                             "loading them could run code; convert it to .safetensors with a tool you trust.") from None
    except (KeyError, IndexError, ValueError, TypeError, AssertionError):
        # Other bytes that are no pickle (a text file, a safetensors file named .pt, a damaged legacy .ckpt):
        # torch's unpickler reads them as opcodes and fails in any of these ways.
        raise _not_a_checkpoint(path) from None
    except (RuntimeError, EOFError, struct.error, zipfile.BadZipFile):
        # A file that ends early. torch's own text is a paragraph of advice, cut off if quoted whole.
        raise ModelFileError(f"{path} is not a complete PyTorch checkpoint; it may be truncated or corrupt, "
                             "so download or export it again.") from None
    except OSError as e:
        raise ModelFileError(f"{path} is not a readable PyTorch checkpoint ({_first_line(e)}); "
                             "it may be truncated or corrupt.") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path} holds a {type(data).__name__}, not a dictionary of tensors.")
    return data


def _not_a_checkpoint(path, problem=""):
    if _holds_safetensors(path):  # ComfyUI's .sft, or a download saved without its suffix
        return ModelFileError(f"{path} is a safetensors file under another name; rename it to end in .safetensors, "
                              "by which minidb tells the format.")
    return ModelFileError(f"{path} is not a PyTorch checkpoint or safetensors file{problem}; "
                          "check the path, or download or export it again.")


def _unsafe_global(error):
    # torch names the refused object as "GLOBAL module.name"; show the user just that.
    m = re.search(r"GLOBAL ([\w.]+)", str(error))
    return m[1] if m else "an object torch refuses to load safely"


def _pickle_problem(error):
    # torch wraps the unpickler's complaint ("Unsupported operand 120") in a long paragraph
    m = re.search(r"WeightsUnpickler error:\s*(.+)", str(error))
    return m[1].strip().splitlines()[0][:120] if m else _first_line(error)


def _first_line(error):
    return str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__


def json_loads(text):
    """json.loads, with JSON nested past Python's recursion limit ('[' * 100000 in a file's metadata) raised
    as any other bad JSON, a JSONDecodeError, rather than a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to read", text[:40], 0) from None


def read_json(path):
    try:
        with open(path, encoding="utf-8") as f:  # vocab files hold non-ASCII characters
            return json_loads(f.read())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(f"{path} is not a readable JSON file ({_first_line(e)}); download or export it again.") from None


def _holds_safetensors(path):
    """Whether the file begins as safetensors does: an 8-byte header length, then that much JSON."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return 2 <= size <= min(100_000_000, Path(path).stat().st_size - 8) and \
                isinstance(json.loads(f.read(size)), dict)
    except (OSError, ValueError, RecursionError):
        return False
