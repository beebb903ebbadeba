"""Writing files so that a crash, a full disk or a second process never leaves half of one.

- Every file goes to a temporary name in its own folder and is then renamed over the target (atomic_write),
  so an interrupted save leaves the old file or the new one, never a half-written file under the real name.
- A folder of files (a diffusers model) is written beside the old one and swapped in (replace_folder).
- A full disk is one sentence saying how much was needed and how much is free (DiskFull).
- Weights with NaN or infinity are found before they are written (first_non_finite): a run never exports them.
"""

import errno
import json
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file


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
