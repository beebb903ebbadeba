"""Download Stable Diffusion weights, resumably and checked: `python -m minidb.fetch [--model sdxl]`.

minidb never downloads anything on its own; this command does, and only when asked (so does a --model
given as a Hugging Face Hub id: minidb/hub.py).
By default it fetches SD 1.5's `v1-5-pruned-emaonly.safetensors` (4.27 GB) into weights/, the default
--model of sample.py and train.py; `--model sdxl` fetches SDXL base 1.0's `sd_xl_base_1.0.safetensors`
(6.94 GB). weights/README.md lists the other checkpoints that work.

Why plain urllib and not huggingface_hub: the file is public, so one HTTP GET is all it takes, and a
Range header is all that resuming takes. The standard library does both without another dependency,
and the code below is the whole story.

How a download goes:
  0. the .part file is locked (flock), so that a second fetch to the same --out stops at once;
  1. bytes go to `<out>.part`; the final name appears only once the file is complete and verified;
  2. if a .part file is there, ask only for the rest (`Range: bytes=N-`); a server that ignores the
     Range header answers 200 (or a 206 from byte 0) with the whole file, and then we start again from zero;
     an HTML page (a login page) or a 206 from another byte is refused, and the .part kept;
  3. once all bytes are there, the sha256 of the whole .part file is computed from disk (so the kept
     prefix is checked too); on a match the file is renamed to its final name (atomic: same
     folder), on a mismatch it is deleted (kept, for resuming, when the server did not say how long
     the file is: the body may just have been cut short).
"""

import argparse
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.request
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlparse

from tqdm import tqdm

from minidb.cli import nonempty_path
from minidb.writes import DiskFull, disk_full_is_an_error, room_problem

WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_URL = ("https://huggingface.co/stable-diffusion-v1-5/stable-diffusion-v1-5/resolve/main/"
               "v1-5-pruned-emaonly.safetensors")
# The Git LFS object id of the file on Hugging Face; AUTOMATIC1111 shows its first ten digits, 6ce0161689.
DEFAULT_SHA256 = "6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa"
DEFAULT_MODEL = WEIGHTS / "v1-5-pruned-emaonly.safetensors"
# What `--model NAME` fetches: (address, sha256, bytes). The sha256 values are the Git LFS object ids
# of the files on Hugging Face (weights/README.md says where each was checked).
MODELS = {"sd15": (DEFAULT_URL, DEFAULT_SHA256, 4_265_146_304),
          "sdxl": ("https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/sd_xl_base_1.0.safetensors",
                   "31e35c80fc4829d14f90153f4c74cd59c90b779f6afe05a74cd6120b893f7e5b", 6_938_078_334)}
TOY_MODEL = WEIGHTS / "toy.safetensors"  # ships with minidb: the toy world's base model (minidb/toy/lab.py)
CHUNK = 1 << 20  # bytes read and hashed at a time
TIMEOUT = 60  # seconds without a byte before we give up (the .part file stays for resuming)
REDIRECTS = (301, 302, 303, 307, 308)


class FetchError(Exception):
    """A download that did not end with a verified file. The message is one sentence for the user."""


def default_model():
    """What --model means when it is not given: SD 1.5 once it has been fetched, else the small
    toy model that ships with minidb, so that everything runs offline from a fresh clone."""
    return DEFAULT_MODEL if DEFAULT_MODEL.exists() else TOY_MODEL


def how_to_get_weights(path=DEFAULT_MODEL):
    """The one sentence to print when --model is missing: how to download it, or what else to pass."""
    command = "python -m minidb.fetch" + ("" if Path(path) == DEFAULT_MODEL else f" --out {path}")
    return (f"There is no model at {path}; run `{command}` to download Stable Diffusion 1.5 there "
            "(4.27 GB), or pass --model a diffusers folder or a .safetensors / .ckpt file you have "
            "(weights/README.md lists the ones that work).")


def part_path(out):
    return Path(out).with_name(Path(out).name + ".part")


def fetch(url=DEFAULT_URL, sha256=DEFAULT_SHA256, out=DEFAULT_MODEL, progress=True):
    """Download url to out unless out is already there with this sha256. Returns out."""
    out, part, sha256 = Path(out), part_path(out), sha256.lower()
    if out.exists() and not out.is_file():  # /dev/null: nothing to move away, and no file the download could replace
        raise FetchError(f"{out} is {'a folder' if out.is_dir() else 'a device or a pipe'}, not a file, so the download "
                         "cannot be saved there; give --out a file path (or a folder to save it in).")
    if out.exists():
        digest = file_sha256(out, progress, f"checking {out.name}")
        if digest != sha256:
            raise FetchError(f"{out} already exists but its sha256 is {digest}, not {sha256}; "
                             "move it away or delete it, then run again.")
        print(f"{out} is already there, with the right sha256; nothing to do.")
        return out

    out.parent.mkdir(parents=True, exist_ok=True)
    with _locked(part):  # until the file is in place: a second fetch to the same --out stops at once
        have = part.stat().st_size
        response = _open(url, out, have)
        length_known = True
        if response is not None:  # None: the server says the .part file already holds the whole file
            length_known = _download(response, part, have, progress, out.name)

        digest = file_sha256(part, progress, f"checking {out.name}")
        if digest != sha256 and not length_known:  # the body just ended, perhaps early: keep it for resuming
            raise FetchError(f"The download from {url} ended at byte {part.stat().st_size:,} without the server "
                             f"saying how long the file is, and its sha256 does not match (yet); {part} is kept, so "
                             "run the same command again to resume, or delete it to start over.")
        if digest != sha256:
            part.unlink()
            raise FetchError(f"The file downloaded from {url} has sha256 {digest}, not {sha256}, so it was "
                             "deleted; run again to download it afresh, and if that happens again, check the "
                             "--sha256 value or whether the address serves another file now.")
        os.replace(part, out)
    print(f"saved {out} (sha256 verified)")
    return out


@contextmanager
def _locked(part):
    """Hold an exclusive lock on the .part file (made if need be), or say that another fetch holds it. The
    operating system lets go of it when the process ends, however it ends. An empty .part is not left behind."""
    with open(part, "ab") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # Windows: no flock; fetches are not guarded there
            pass
        except BlockingIOError:
            raise FetchError(f"Another fetch is downloading to {part}; wait for it to finish, or choose "
                             "another --out.") from None
        try:
            yield
        finally:
            if part.exists() and part.stat().st_size == 0:
                part.unlink()


def _open(url, out, have):
    """Send the GET (asking for bytes have.. when resuming) -> the response, or None on HTTP 416."""
    try:
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        return urllib.request.urlopen(request, timeout=TIMEOUT)
    except urllib.error.HTTPError as e:
        # 416 Range Not Satisfiable: we asked to start at or past the end, so the .part file is
        # complete (or too long, which the checksum will catch).
        if e.code == 416 and have:
            return None
        if e.code in REDIRECTS and e.headers.get("Location"):  # urllib gives up on a loop, or after 10 redirects
            raise FetchError(_by_hand(url, out, f"the server redirected in a loop or too many times (HTTP "
                                                f"{e.code})")) from None
        raise FetchError(_by_hand(url, out, f"the server answered HTTP {e.code} {e.reason}")) from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise FetchError(_by_hand(url, out, f"the server could not be reached ({reason})")) from None
    except ValueError as e:  # urllib's word for a malformed address
        raise FetchError(f"{url} is not an address that can be downloaded ({e}); give an https:// URL.") from None


def _download(response, part, have, progress, name):
    """Write the body to part: appended when the server sent the rest (206), from zero when it
    ignored the Range header and sent the whole file (200). Returns whether the server said how long it is."""
    with response:
        start = _start_of(response, part, have)
        if start == 0 and have:
            print(f"the server sent the whole file, not the rest; starting {part} again")
        have = start
        # http.client's reading of Content-Length: None when it is absent or no number
        total = have + response.length if response.length is not None else None
        if have:
            print(f"resuming {part} at byte {have:,}")
        if total is not None and (problem := room_problem(part.parent, total - have, f"the rest of {name}",
                                                          "free some space or choose another --out")):
            raise FetchError(problem)
        full = (disk_full_is_an_error(part.parent, total - have, f"the rest of {name}",
                                      "run the same command again to resume") if total is not None else nullcontext())
        with full, \
                open(part, "ab" if have else "wb") as f, tqdm(
                    total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                    disable=not progress) as bar:
            while chunk := _read(response, part, have):
                f.write(chunk)  # an OSError here is the disk's, which main() tells apart from the network's
                f.flush()  # on disk at once, so even a killed process can resume from here
                have += len(chunk)
                bar.update(len(chunk))
    if total is not None and have < total:  # the server closed the connection early
        raise FetchError(f"The download stopped at byte {have} of {total}; {part} is kept, "
                         "so run the same command again to resume.")
    return total is not None


def _start_of(response, part, have):
    """The byte the body starts at: 0 for a 200, have for a 206 that answers our Range. Refuses an HTML page
    (a login or error page sent with 200) and a 206 that starts elsewhere, before the .part is touched."""
    kind = response.headers.get("Content-Type", "")
    if kind.startswith("text/html"):
        raise FetchError(f"The server sent an HTML page ({response.length or 'unknown number of'} bytes) instead "
                         f"of the file, perhaps a login or error page; open {response.url} in a browser to see it.")
    if response.status != 206:
        return 0
    first = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    start = int(first[1]) if first else have
    if start not in (0, have):
        raise FetchError(f"The server answered the request for the bytes from {have:,} on with the bytes from "
                         f"{start:,} on; {part} is kept, so run again later, or delete it to start over.")
    return start


def _read(response, part, have):
    """The next bytes that have arrived (up to CHUNK), b"" at the end; a network failure becomes a FetchError."""
    try:
        return response.read1(CHUNK)
    except (OSError, http.client.HTTPException) as e:  # connection reset, timeout, ...
        raise FetchError(f"The download stopped at byte {have} ({e}); {part} is kept, "
                         "so run the same command again to resume.") from None


def file_sha256(path, progress=False, desc=None):
    """The sha256 of a file, read in chunks so that a 5 GB file costs no memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f, tqdm(total=os.path.getsize(path), unit="B", unit_scale=True,
                                     unit_divisor=1024, desc=desc, disable=not progress) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def url_problem(url):
    """Why url is not an address to download from, as a sentence for argparse, or None. Only http(s) is
    downloaded: urllib's answer for file:// or ftp:// is no HTTP response (no length, no ranges)."""
    try:
        parts = urlparse(url)
    except ValueError as e:  # e.g. "Invalid IPv6 URL"
        return f"--url {url!r} is not a valid address ({e}); give an https:// URL"
    if parts.scheme == "file":
        return (f"--url {url!r} names a file already on this machine, which needs no download; pass its path to "
                f"--model, or move it into {WEIGHTS}/")
    if not parts.scheme or not parts.netloc:
        return f"--url {url!r} is not a full address with a host; give an https:// URL"
    if parts.scheme not in ("http", "https"):
        return f"--url {url!r} is not an http:// or https:// address; give an https:// URL"
    return None


def file_in_the_way(error):
    """For an OSError that met a file where a folder should be (mkdir's FileExistsError, NotADirectoryError):
    that file, the path itself or one of its parents. Else None."""
    if not isinstance(error, (FileExistsError, NotADirectoryError)) or not error.filename:
        return None
    path = Path(os.fsdecode(error.filename))
    return next((p for p in (path, *path.parents) if p.is_file()), None)


def _by_hand(url, out, what):
    return (f"Could not download {url}: {what}; open that address in a browser (logged in to Hugging "
            f"Face if the model asks for it) and save the file as {out}.")


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m minidb.fetch", description=__doc__.splitlines()[0],
        epilog=f"Without a network, download {DEFAULT_URL} (SDXL: {MODELS['sdxl'][0]}) in a browser and save it "
               f"in {WEIGHTS}/. An interrupted download resumes when you run the same command again.")
    parser.add_argument("--model", choices=list(MODELS), default=None,
                        help="which known checkpoint: sd15 (Stable Diffusion 1.5, 4.27 GB) or sdxl (SDXL base 1.0, "
                             "6.94 GB) (default: sd15)")
    parser.add_argument("--url", default=None, help="download this file instead of a known one (needs --sha256)")
    parser.add_argument("--sha256", default=None,
                        help="the file's expected sha256; required with --url (default: the known model's)")
    parser.add_argument("--out", default=None, type=nonempty_path,
                        help=f"where to save it: a file name, or a folder to save it in under the URL's file name "
                             f"(default: {WEIGHTS}/)")
    args = parser.parse_args(argv)
    if args.url is not None and args.model is not None:  # the URL's file was fetched, and --model went unread
        parser.error(f"--model {args.model} and --url name two files; give one of them")
    if args.url is None:
        args.url, known_sha256, _ = MODELS[args.model or "sd15"]
        args.sha256 = args.sha256 or known_sha256
    elif args.sha256 is None:
        parser.error("--url needs --sha256 too, so that the download can be verified")
    if len(args.sha256) != 64 or any(c not in "0123456789abcdefABCDEF" for c in args.sha256):
        parser.error(f"--sha256 must be 64 hexadecimal digits, not {args.sha256!r}")
    if problem := url_problem(args.url):
        parser.error(problem)
    name = Path(urlparse(args.url).path).name
    # --out names the file, or a folder to save it in (one that exists, or written with a trailing /)
    folder = not args.out or Path(args.out).is_dir() or args.out.endswith(("/", os.sep))
    if folder and name in ("", ".."):
        parser.error(f"--url {args.url!r} does not end in a file name; give --out a file name too")
    out = Path(args.out or WEIGHTS) / name if folder else Path(args.out)
    try:
        fetch(args.url, args.sha256, out)
    except (FetchError, DiskFull) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk side: a folder we cannot create, a file we cannot write
        blocker = file_in_the_way(e)
        what = f"{blocker} is a file, not a folder" if blocker else f"{e.filename or out}: {e.strerror}"
        print(f"error: {what}; choose another --out.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = f": {part_path(out)} is kept; run the same command again to resume" if part_path(out).exists() else ""
        print(f"\ninterrupted{kept}.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
