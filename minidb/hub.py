"""Models by Hugging Face Hub id: `--model stable-diffusion-v1-5/stable-diffusion-v1-5[@revision]`.

A --model value that is no local path but reads `owner/name`, or `owner/name@revision` (a branch, a
tag or a commit), names a diffusers repository on the Hugging Face Hub. local_path() turns it into a
folder that minidb/load.py loads as it is: the repository's snapshot in the shared Hugging Face cache
(~/.cache/huggingface/hub, or HF_HUB_CACHE), where diffusers and transformers keep theirs, so a model
that one of them downloaded is not downloaded a second time. huggingface_hub does the talking, so
its settings hold: HF_TOKEN or the token `hf auth login` saved (gated and private models), HF_ENDPOINT
(a mirror) and HF_HUB_OFFLINE (no network: the cache only, which is also what happens when the Hub
cannot be reached).

Only what minidb loads is downloaded: model_index.json, the config of unet/, vae/, text_encoder/ and
(SDXL) text_encoder_2/, scheduler/scheduler_config.json, tokenizer/ and tokenizer_2/, and ONE weights
file per part: the fp16 safetensors variant where there is one (half the bytes; train.py trains in
fp32 whatever it trains), else the plain safetensors, and a pickled .bin only where there is no
safetensors file at all (minidb reads it with torch.load(weights_only=True)). A weights file that is
already in the cache wins, so a folder diffusers downloaded in fp32 is used as it is. The big single
files at the root (v1-5-pruned-emaonly.safetensors and the like, 4-7 GB each), safety_checker/ and
feature_extractor/ are never downloaded.

How a resolution goes:
  1. the revision (main unless @revision says otherwise) is resolved to a commit once, so every file
     comes from the same commit; huggingface_hub notes it in the cache's refs/, which is how an
     offline run finds the snapshot of `owner/name` again;
  2. the small files are downloaded, and with them the list of the repository's files at that commit,
     which huggingface_hub keeps in the cache beside the snapshot;
  3. from that list, one weights file per part is picked and downloaded (files already there are
     not downloaded again: a second run asks the Hub one question, the commit of the revision).
"""

import json
import os
import re
from pathlib import Path
from urllib.parse import unquote, urlsplit

from minidb.files import ModelFileError

# owner/name, then optionally @revision. Anything else (a path with more folders, an absolute path,
# a file name with its suffix) is left to load(), which says that there is no model there.
HUB_ID = re.compile(r"(?P<repo>\w[\w.-]*/\w[\w.-]*)(?:@(?P<revision>[^@\s]+))?")
SMALL_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
               "text_encoder_2/config.json", "scheduler/scheduler_config.json", "tokenizer/*", "tokenizer_2/*"]

# --model value -> folder, so that a run asks the Hub once: train.py resolves --model four times (is_sdxl,
# check, load, the class prior's cache key)
_resolved = {}


def local_path(model):
    """The local path of a --model value: a path that exists, or a value that is no Hub id, comes back
    unchanged; `owner/name[@revision]` comes back as its snapshot folder in the Hugging Face cache,
    downloaded first where needed. Every failure is a ModelFileError of one sentence."""
    hub_id = HUB_ID.fullmatch(str(model))
    if Path(model).exists() or not hub_id or str(model).endswith((".safetensors", ".ckpt")):
        return model
    if model not in _resolved:
        _resolved[model] = _download(model, hub_id["repo"], hub_id["revision"])
    return _resolved[model]


def _download(model, repo, revision):
    # huggingface_hub is imported here, not at the top: only Hub ids need it, and it is slow to import.
    import httpx2  # huggingface_hub's HTTP client: its errors are what a broken network looks like
    from huggingface_hub import HfApi, constants, errors, get_cached_repo_tree, snapshot_download
    site = f"the Hugging Face Hub at {constants.ENDPOINT}"
    try:
        offline = constants.is_offline_mode()  # HF_HUB_OFFLINE: read refs/ without trying the Hub first
        commit = HfApi().resolve_revision(repo, revision=revision, local_files_only=offline)  # (1)
        folder = Path(snapshot_download(repo, revision=commit, allow_patterns=SMALL_FILES))  # (2)
        try:
            files = {f.path for f in get_cached_repo_tree(repo, revision=commit)}  # the Hub's list, kept in (2)
        except errors.CachedRepoTreeNotFoundError:  # offline, in a snapshot an older huggingface_hub downloaded
            files = None
        weights = _pick_weights(files, folder, model)
        snapshot_download(repo, revision=commit, allow_patterns=weights)  # (3)
        return str(folder)
    except errors.GatedRepoError:  # before RepositoryNotFoundError, which it is a kind of
        raise ModelFileError(f"{repo} on {site} is gated: accept its conditions on its page, then log in with "
                             "`hf auth login` (or set HF_TOKEN) and run again.") from None
    except errors.RepositoryNotFoundError:
        raise ModelFileError(f"No model at {model}: there is no such local path, and {site} has no repository "
                             f"{repo} (if it is private or gated, log in with `hf auth login` or set "
                             "HF_TOKEN).") from None
    except errors.RevisionNotFoundError:
        raise ModelFileError(f"{repo} on {site} has no revision {revision!r}; pass a branch, tag or commit it has "
                             f"after the @, or leave out @{revision} for its main branch.") from None
    except (errors.RevisionResolutionError, errors.LocalEntryNotFoundError) as e:  # no Hub to ask, nothing cached
        if isinstance(e.__cause__, errors.HfHubHTTPError):  # reached, but it answered an error (after retrying 5xx)
            raise _answered(e.__cause__, site, model) from None
        reason = _first_line(e.__cause__ or e)
        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else f"{site} could not be reached ({reason})"
        folder = Path(repo).parent
        if folder.is_dir():  # runs/dreambooth-9: a mistyped local path, more likely than an uncached Hub id
            raise ModelFileError(f"No model at {model}: {folder}/ holds no {Path(repo).name}, and as a Hub id it is "
                                 f"not in the Hugging Face cache ({why}); check the path.") from None
        if constants.is_offline_mode():
            raise ModelFileError(f"{model} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and "
                                 "HF_HUB_OFFLINE is set; run once with a network and without HF_HUB_OFFLINE to "
                                 "download it.") from None
        raise ModelFileError(f"Could not reach {site} ({reason}), and {model} is not in the "
                             f"Hugging Face cache ({constants.HF_HUB_CACHE}); check the network (or HF_ENDPOINT) "
                             "and run again to download it.") from None
    except errors.HfHubHTTPError as e:  # the Hub answered, with an error of its own (a refused token, 5xx, ...)
        raise _answered(e, site, model) from None
    except errors.HFValidationError:
        raise ModelFileError(f"No model at {model}: there is no such local path, and it is no valid Hugging Face "
                             "Hub id (owner/name, or owner/name@revision).") from None
    except httpx2.RequestError as e:  # the connection broke, stalled or spoke no HTTP, after huggingface_hub's retries
        reason = "no data came for a while" if isinstance(e, httpx2.TimeoutException) else _first_line(e)
        file = _file_of(e)
        what, again = (f"{file} of {model}", "run again to resume") if file else (model, "run again")
        raise ModelFileError(f"Could not download {what} from {site} ({reason}); check the network (or a proxy, "
                             f"or HF_ENDPOINT) and {again}.") from None
    except json.JSONDecodeError:  # the API answered 200 with something else: a proxy's or a captive portal's page
        raise ModelFileError(f"{site} answered the question about {model} with a page that is not the Hub's (a proxy "
                             "or a network login page?); check the network (or HF_ENDPOINT) and run again.") from None
    except OSError as e:
        if e.errno is None:  # huggingface_hub's own, such as "Consistency check failed" for a file shorter than listed
            sizes = re.search(r"should be of size (\d+) but has size (\d+)", str(e))
            reason = (f"a file came in shorter than the Hub lists it, {int(sizes[2]):,} of {int(sizes[1]):,} bytes"
                      if sizes else _first_line(e))
            raise ModelFileError(f"Could not download {model} from {site} ({reason}); check the network (or a "
                                 "proxy) and run again to resume.") from None
        # the disk side: the cache cannot be written (full, read-only, ...)
        where = os.fsdecode(e.filename) if e.filename else constants.HF_HUB_CACHE
        raise ModelFileError(f"Could not save {model} in the Hugging Face cache ({where}: {e.strerror}); free some "
                             "space or set HF_HUB_CACHE to a folder you can write, then run again.") from None


def _answered(e, site, model):
    """The sentence for an HTTP error the Hub answered with, naming the file it was asked for where there is one."""
    status, file = e.response.status_code, _file_of(e)
    what = f"{file} of {model}" if file else model
    if status in (401, 403):
        fix = "check your token (`hf auth login` or HF_TOKEN)"
    elif status == 404 and file:  # minidb asks only for files the repository's list names
        what, fix = f"{what}, a file its list names", "run again later, or tell the repository's owner"
    else:
        fix = "run again later"
    return ModelFileError(f"{site} answered HTTP {status} when asked for {what}; {fix}.")


def _file_of(e):
    """The repository file an httpx or huggingface_hub error was about (from .../resolve/<commit>/<file>), or None."""
    try:
        response = getattr(e, "response", None)
        url = str((e if response is None else response).request.url)
    except (AttributeError, RuntimeError):  # httpx raises RuntimeError for an error without its request
        return None
    path = unquote(urlsplit(url).path)
    return path.split("/resolve/", 1)[1].split("/", 1)[-1] if "/resolve/" in path else None


def _pick_weights(files, folder, model):
    """The weights file of each part, from the repository's list of files; None for `files` means only
    the snapshot folder is known (offline), so what is in it is all there is."""
    from minidb.load import WEIGHT_FILES  # here: load.py imports this module
    offline = files is None
    if offline:
        files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    where = f"the Hugging Face cache's copy of {model}" if offline else f"{model} on the Hugging Face Hub"
    fix = ("run once with a network (and without HF_HUB_OFFLINE) to download the rest" if offline else
           "minidb needs a diffusers repository (for a repository of single .safetensors files, download one "
           "and pass its path)")
    missing = [f"{part}/config.json" for part in ("unet", "vae", "text_encoder") if f"{part}/config.json" not in files]
    if missing:
        raise ModelFileError(f"{where} is not a diffusers model (it has no {' or '.join(missing)}); {fix}.")
    picked = []
    for part in [p for p in WEIGHT_FILES if f"{p}/config.json" in files]:
        names = [f"{part}/{name}" for name in WEIGHT_FILES[part] if f"{part}/{name}" in files]
        names = [n for n in names if n.endswith(".safetensors")] or names  # a pickle only if nothing else
        cached = [n for n in names if (folder / n).is_file()]
        fp16 = [n for n in names if ".fp16." in n]
        if not names:
            raise ModelFileError(f"{where} has no weights for its {part} ({part}/{WEIGHT_FILES[part][0]} or a "
                                 f"variant of it); {fix}.")
        picked.append((cached or fp16 or names)[0])
    return picked


def _first_line(error):
    return (str(error).strip().splitlines() or [type(error).__name__])[0].rstrip(".")
