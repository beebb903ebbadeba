"""A diffusers tokenizer/ folder, read strictly: vocab.json with merges.txt (or transformers 5's
tokenizer.json alone), and the pad token its config names. A damaged or cut-short file is one
sentence, rather than a paragraph from the tokenizers library or a tokenizer that quietly spells
every word letter by letter. minidb/tokenizer.py builds the tokenizer from what this returns.
"""

import json
import os
from pathlib import Path

from minidb.files import ModelFileError, read_json


def read_folder(folder: str | os.PathLike, num_merges: int, default_pad: str) -> tuple[dict, list, str]:
    """(vocab, merges, pad token) of a tokenizer/ folder, checked; `num_merges`: how many CLIP has, and
    `default_pad`: the pad token of a folder that names none (both from minidb/tokenizer.py)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFileError(
            f"Tokenizer folder {folder} does not exist; pass the tokenizer/ folder of a diffusers checkpoint."
        )
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        vocab, merges = read_json(vocab_file), _read_merges_txt(merges_file)
    elif (folder / "tokenizer.json").is_file():  # transformers 5 saves only this file
        vocab_file = merges_file = folder / "tokenizer.json"
        vocab, merges = _read_tokenizer_json(vocab_file)
    else:
        raise ModelFileError(
            f"Tokenizer folder {folder} has neither vocab.json with merges.txt nor tokenizer.json; "
            "pass the tokenizer/ folder of a diffusers checkpoint."
        )
    _check_vocab(vocab, vocab_file)
    _check_merges(merges, vocab, merges_file, vocab_file.name, num_merges)
    merges = [tuple(m) for m in merges]
    pad_token = _pad_token(folder, default_pad)
    if pad_token not in vocab:
        raise ModelFileError(f"The pad token {pad_token!r} named in {folder} is not in its vocab.json.")
    return vocab, merges, pad_token


def _unusable(path: Path, problem: str) -> ModelFileError:
    return ModelFileError(f"{path} is not a usable CLIP tokenizer file ({problem}); "
                          "download or export the model's tokenizer/ folder again.")


def _read_merges_txt(path: Path) -> list[list[str]]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise _unusable(path, "it is not UTF-8 text") from None
    return [line.split() for line in lines if line and not line.startswith("#version")]


def _read_tokenizer_json(path: Path) -> tuple:
    """The vocabulary and merges of a tokenizer.json as found; _check_vocab and _check_merges judge them."""
    saved = read_json(path)
    model = saved.get("model") if isinstance(saved, dict) else None
    if not isinstance(model, dict):
        raise _unusable(path, 'it has no "model" entry')
    merges = model.get("merges")
    if isinstance(merges, list):  # older files write a merge as "a b", newer ones as ["a", "b"]
        merges = [m.split() if isinstance(m, str) else m for m in merges]
    return model.get("vocab"), merges


def _check_vocab(vocab, path: Path) -> None:
    if not isinstance(vocab, dict):
        raise _unusable(path, "its vocabulary is not a JSON object of token ids")
    is_id = lambda i: isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(vocab)
    bad = next((token for token, i in vocab.items() if not is_id(i)), None)
    if bad is not None:
        raise _unusable(path, f"it gives {bad!r} the id {json.dumps(vocab[bad])[:40]}, not one of 0 to {len(vocab) - 1}")


def _check_merges(merges, vocab: dict, path: Path, vocab_name: str, num_merges: int) -> None:
    """Refuse a merges list that the tokenizers library would fail on with a paragraph of its own, or,
    given none at all, take quietly and then spell every word letter by letter."""
    if not isinstance(merges, list):
        raise _unusable(path, "it has no list of merges")
    is_pair = lambda m: isinstance(m, list) and len(m) == 2 and all(isinstance(t, str) for t in m)
    bad = next((m for m in merges if not is_pair(m)), None)
    if bad is not None:
        raise _unusable(path, f"the merge {json.dumps(bad, ensure_ascii=False)[:60]} is not two tokens")
    if len(merges) != num_merges:  # none, or cut short by an interrupted download
        raise _unusable(path, f"it holds {len(merges):,} merges where CLIP has {num_merges:,}")
    unknown = next((m for m in merges if not {m[0], m[1], m[0] + m[1]} <= vocab.keys()), None)
    if unknown is not None:
        raise _unusable(path, f"the merge {' '.join(unknown)!r} makes tokens that {vocab_name} lacks")


def _pad_token(folder: Path, default_pad: str) -> str:
    """The pad token a tokenizer folder names, resolved as transformers resolves it.

    special_tokens_map.json overrides tokenizer_config.json, unless the config lists its own added
    tokens (the newer format), in which case the map is ignored. Without either, CLIP pads with EOS.
    """
    read = lambda name: read_json(folder / name) if (folder / name).is_file() else {}
    config, special = read("tokenizer_config.json"), read("special_tokens_map.json")
    if "added_tokens_decoder" in config:
        special = {}
    pad = special.get("pad_token") or config.get("pad_token") or default_pad
    return pad["content"] if isinstance(pad, dict) else pad
