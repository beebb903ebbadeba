"""Reading and writing tensor files safely.

- `.safetensors` is the format to prefer: a JSON header and raw tensor bytes, nothing executable.
- `.ckpt` / `.bin` / `.pt` are pickles. A pickle can run arbitrary code when loaded, so we only ever
  read them with `torch.load(weights_only=True)`, which accepts tensors and plain containers and
  refuses everything else.
- Every write goes to a temporary file in the same folder and is then renamed over the target, so
  an interrupted save never leaves a half-written file under the real name.
"""

import errno
import json
import os
import pickle
import re
import shutil
import struct
import sys
import tempfile
import zipfile
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

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
        with _allowed_globals():
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


def atomic_write(path, write):
    """Call write(tmp_path), then rename tmp_path to path. The tmp file lives in the same folder,
    so the rename is atomic and never crosses file systems. The file and then its folder are
    fsynced, so after a power cut the path holds the old file or the new one, never a hole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes files private (0600); saved models are ordinary files
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync(path.parent)


def dangling_link(path):
    """The first of `path` and its parents that is a link to nothing (or a loop of links), or None: the
    OSError of a write under it says only "File exists"."""
    return next((p for p in (Path(path), *Path(path).parents) if p.is_symlink() and not p.exists()), None)


def fsync(path):
    """Flush a file's or a folder's contents to the disk (a folder's: the names in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_folder(path, write):
    """Call write(tmp_folder), then swap it in for the folder `path`. A crash leaves the old folder
    (or, between the two renames, its copy `.NAME.old`), never a mix of old and new files; a failed
    write (a full disk, say) removes what it wrote and leaves the old folder as it was. (Two processes
    must not replace one folder at once: the second deletes the first's `.NAME.tmp` as a leftover; see
    writing_into.)"""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        write(tmp)
        for folder, _, _ in os.walk(tmp):  # the files fsynced themselves; now their names
            fsync(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    fsync(path.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def writing_into(folder):
    """Hold an exclusive lock on `folder` itself (no lock file is left behind), waiting for another process
    that holds it. The operating system lets go when a process ends, however it ends. Where folders cannot
    be locked (Windows, some network file systems) nothing is guarded."""
    try:
        import fcntl
        fd = os.open(folder, os.O_RDONLY)
    except (ImportError, OSError):
        fcntl = fd = None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another process that is writing into {folder} ...", file=sys.stderr, flush=True)
                with suppress(OSError):  # this file system refuses locks after all
                    fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:  # no locks on this file system
                pass
        yield
    finally:
        if fd is not None:
            os.close(fd)


class DiskFull(Exception):
    """A write that found the disk full. The message is one sentence for the user."""


@contextmanager
def disk_full_is_an_error(folder, needed_bytes, what, advice):
    """Turn 'No space left on device' inside the block into a DiskFull sentence saying how much `what`
    needs and how much is free. The writers here have already removed their partial files."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        free = shutil.disk_usage(next(p for p in (Path(folder), *Path(folder).parents) if p.exists())).free
        raise DiskFull(f"The disk holding {folder} is full: {what} needs about {_size(needed_bytes)} and "
                       f"{_size(free)} are free; free some space, then {advice}.") from None


def room_problem(folder, needed_bytes, what, advice):
    """One sentence if the disk holding `folder` has less free than `what` needs, else None: checked
    before the work starts, so that a long run does not find a full disk at its first checkpoint."""
    free = shutil.disk_usage(folder).free
    if free >= needed_bytes:
        return None
    return f"The disk holding {folder} has {_size(free)} free, but {what} needs about {_size(needed_bytes)}; {advice}."


def _size(n):
    """Bytes for a person: MB, or kB below one MB (a PNG's few kB are not '0 MB')."""
    return f"{n / 1e6:,.0f} MB" if n >= 1e6 else f"{n / 1e3:,.0f} kB"


def first_non_finite(named):
    """The name of the first tensor in {name: tensor} that holds NaN or infinity, or None. One fp32 sum per
    tensor and one look at them all (NaN and infinity survive a sum), not a host sync per tensor; a sum that
    overflows though every number is finite is told apart by looking at its tensor."""
    floats = {k: t for k, t in named.items() if torch.is_tensor(t) and t.is_floating_point() and t.numel()}
    if not floats:
        return None
    sums = [t.sum(dtype=torch.float32) for t in floats.values()]
    if torch.isfinite(torch.stack([s.to(sums[0].device) for s in sums])).all():
        return None
    return next((k for k, t in floats.items() if not torch.isfinite(t.float()).all()), None)  # fp8 has no isfinite


def write_safetensors(path, tensors, metadata=None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: _save_file(tensors, tmp, metadata))


def _save_file(tensors, filename, metadata):
    """safetensors' save_file, with a full disk raised as the OSError it is: safetensors reports it as
    its own error ("I/O error: No space left on device (os error 28)"), which would escape the
    handlers that turn a full disk into a sentence (disk_full_is_an_error)."""
    try:
        save_file(tensors, filename, metadata=metadata)
    except SafetensorError as e:
        for code in (errno.ENOSPC, errno.EDQUOT):
            if f"(os error {code})" in str(e):
                raise OSError(code, os.strerror(code), str(filename)) from None
        raise


def write_pickle(path, obj):
    """torch.save(obj, path), with a full disk raised as the OSError it is. Given a path, torch.save's
    writer reports a failed write as a RuntimeError ("unexpected pos"); given a file object, the
    OSError comes first, and the writer's RuntimeError at closing hides it. (Not atomic: the caller
    writes into a temporary folder. Read back with weights_only=True: tensors and plain values only.)"""
    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        if isinstance(e.__context__, OSError):
            raise e.__context__ from None
        raise


def write_json(path, obj):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    atomic_write(path, write)


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
