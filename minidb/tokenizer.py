"""The CLIP tokenizer of Stable Diffusion: a prompt becomes 77 token ids.

CLIP (Radford et al., 2021) tokenizes text with byte-level BPE, as GPT-2 does. The text is cleaned,
lower-cased and split into words; each word's UTF-8 bytes are spelled with 256 printable characters;
then learned merges join characters into longer pieces. The last piece of a word carries the suffix
'</w>', so "dog" at the end of a word (id 1929) differs from "dog" inside "doghouse".

Stable Diffusion feeds the text encoder exactly 77 ids: <|startoftext|>, at most 75 prompt tokens,
<|endoftext|>, then padding. SD 1.x pads with <|endoftext|> (49407), SD 2.x with '!' (id 0).

We reproduce transformers' CLIPTokenizer, which diffusers uses, with the `tokenizers` library.
OpenAI's original tokenizer (clip/simple_tokenizer.py) also runs ftfy and html.unescape on the
prompt, so the two differ on text such as "&amp;" or curly quotes; we follow transformers.
"""

import gzip
import json
import os
import unicodedata
import warnings
from itertools import accumulate, groupby
from pathlib import Path

import tokenizers
import torch
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from minidb.files import ModelFileError
from minidb.writes import atomic_write
from minidb.tokenizer_files import read_folder

# Ids and sizes of OpenAI's CLIP vocabulary (clip/simple_tokenizer.py): 256 byte characters, the
# same with '</w>', 48,894 merges, then the two special tokens last.
BOS, EOS = 49406, 49407
BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77  # CLIP's text transformer has 77 learned positions.
NUM_MERGES = 49152 - 256 - 2  # as in simple_tokenizer.py: 2*256 + 48,894 + 2 = 49,408 ids

# The merges list OpenAI ships with CLIP (MIT license beside it); single-file checkpoints carry none.
DEFAULT_BPE_PATH = Path(__file__).resolve().parent.parent / "weights" / "bpe_simple_vocab_16e6.txt.gz"

# CLIP's word-splitting pattern (simple_tokenizer.py): special tokens, English contractions,
# runs of letters, single digits, runs of other non-space characters.
SPLIT_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (OpenAI's encoder.py).

    Printable Latin-1 bytes stand for themselves; the others (space, control bytes) are shifted to
    code points 256 and up. The order of this dict is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    codes = printable + [256 + n for n in range(len(others))]
    return {b: chr(c) for b, c in zip(printable + others, codes)}


def read_openai_bpe(path: str | os.PathLike = DEFAULT_BPE_PATH) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges built from OpenAI's bpe_simple_vocab_16e6.txt.gz, as CLIP builds them."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(
            f"CLIP's BPE merges file {path} is missing; it ships in minidb's weights/ folder, "
            "so restore it (for example with `git checkout weights/`) or pass its path."
        )
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]  # line 0 is a version header
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


class Tokenizer:
    """Turns prompts into the (B, 77) id tensor that Stable Diffusion's text encoder reads."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_id: int = EOS):
        if vocab.get(BOS_TOKEN) != BOS or vocab.get(EOS_TOKEN) != EOS or not 0 <= pad_id < len(vocab):
            raise ModelFileError("This vocabulary is not CLIP's (49,408 ids ending in <|startoftext|>, <|endoftext|>).")
        self.vocab, self.merges, self.pad_id = vocab, merges, pad_id
        self.id_to_token = {i: t for t, i in vocab.items()}
        self.new_words = {}  # word -> its ids after the vocabulary (textual inversion), see add_word

        # The same pipeline transformers builds for CLIPTokenizer (models/clip/tokenization_clip.py).
        tok = tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"))
        # OpenAI: whitespace_clean(...).lower(). NFC first, so that "é" typed as e + accent is one letter.
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
        )
        # Split into words (the matches; the whitespace between them is dropped), then spell bytes.
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        # Special tokens typed in a prompt are kept whole, but only when typed exactly: transformers
        # matches them before lower-casing (OpenAI after, so it also maps "<|ENDOFTEXT|>" to 49407).
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (BOS_TOKEN, EOS_TOKEN)])
        if pad_id not in (BOS, EOS):
            # transformers registers the pad token as a special token too. For SD 2.x that means a
            # '!' in the prompt becomes id 0 rather than the BPE piece '!</w>' (256); diffusers
            # encodes SD 2.x prompts this way, so we do the same.
            tok.add_special_tokens([AddedToken(self.id_to_token[pad_id], normalized=False, special=True)])
        self._tokenizer = tok

    @classmethod
    def from_openai_bpe(cls, path: str | os.PathLike = DEFAULT_BPE_PATH, pad_id: int = EOS) -> "Tokenizer":
        """The tokenizer for a checkpoint without one (single files): from the shipped merges list."""
        return cls(*read_openai_bpe(path), pad_id=pad_id)

    @classmethod
    def for_version(cls, version: str) -> "Tokenizer":
        """The shipped tokenizer for "SD 1.x" or "SD 2.x", which differ only in their pad id."""
        # Pad ids as in the tokenizer/special_tokens_map.json of the SD 1.5 and 2.1 diffusers repos.
        pad_ids = {"SD 1.x": EOS, "SD 2.x": 0}
        if version not in pad_ids:
            raise ValueError(f"Unknown Stable Diffusion version {version!r}; expected 'SD 1.x' or 'SD 2.x'.")
        return cls.from_openai_bpe(pad_id=pad_ids[version])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> "Tokenizer":
        """Load the tokenizer/ folder of a diffusers checkpoint (vocab.json + merges.txt, or tokenizer.json)."""
        vocab, merges, pad_token = read_folder(folder, NUM_MERGES, EOS_TOKEN)
        return cls(vocab, merges, pad_id=vocab[pad_token])

    def save(self, folder: str | os.PathLike) -> None:
        """Write a diffusers tokenizer/ folder; transformers.CLIPTokenizer.from_pretrained reads it back."""
        folder = Path(folder)
        tokens = {
            "bos_token": BOS_TOKEN,
            "eos_token": EOS_TOKEN,
            "unk_token": EOS_TOKEN,  # byte-level BPE never needs one; this is transformers' CLIP default
            "pad_token": self.id_to_token[self.pad_id],
        }
        config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": CONTEXT_LENGTH, **tokens}
        files = {
            "vocab.json": json.dumps(self.vocab, ensure_ascii=False),
            "merges.txt": "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in self.merges),
            "tokenizer_config.json": json.dumps(config, indent=2),
            "special_tokens_map.json": json.dumps(tokens, indent=2),
        }
        for name, text in files.items():  # each file is written whole or not at all
            atomic_write(folder / name, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def add_word(self, word: str, n: int = 1) -> list[int]:
        """Give `word` n ids of its own after the vocabulary (textual inversion: their embeddings are
        learned, see minidb/dreambooth.py). As diffusers' load_textual_inversion does, the extra ids are
        named word_1, word_2, ... and a prompt's `word` stands for all n of them. The vocabulary files
        that save() writes stay CLIP's own: a new word travels in its embedding file, not in the model."""
        if not can_be_a_new_word(word):
            raise ValueError(f"A new word must be one lower-case word, not {word!r}.")
        if word in self.vocab or word in self.new_words:
            raise ValueError(f"{word!r} is already a token; a new word needs a name of its own.")
        names = [word] + [f"{word}_{i}" for i in range(1, n)]
        # single_word: 'nrf' inside 'unrfold' stays BPE; normalized: matched after lower-casing, as prompts are
        self._tokenizer.add_tokens([AddedToken(name, single_word=True, normalized=True) for name in names])
        self.new_words[word] = [self._tokenizer.token_to_id(name) for name in names]
        return self.new_words[word]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without <|startoftext|>, <|endoftext|> or padding."""
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """Text of `ids`, as transformers decodes it: special tokens kept, '</w>' read as a space."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        text = self._tokenizer.decode(ids, skip_special_tokens=False)
        return text.replace("</w>", " ").strip()

    def __call__(self, prompts: str | list[str]) -> torch.Tensor:
        """(B, 77) int64 ids: <|startoftext|>, prompt tokens, <|endoftext|>, padding."""
        if isinstance(prompts, str):
            prompts = [prompts]
        room = CONTEXT_LENGTH - 2  # BOS and EOS always stay
        rows = []
        expand = {ids[0]: ids for ids in self.new_words.values()}  # a new word's first id -> all its ids
        for prompt, encoding in zip(prompts, self._tokenizer.encode_batch(prompts, add_special_tokens=False)):
            spans = [expand.get(i, [i]) for i in encoding.ids]  # each typed token's ids
            ids = [j for span in spans for j in span]
            if len(ids) > room:
                warnings.warn(
                    f"The prompt starting {prompt[:40]!r} is longer than CLIP's {CONTEXT_LENGTH} tokens; "
                    f"dropped its last {len(ids) - room} tokens: {self._dropped(spans, room)}.",
                    stacklevel=2,
                )
                ids = ids[:room]
            row = [BOS, *ids, EOS]
            rows.append(row + [self.pad_id] * (CONTEXT_LENGTH - len(row)))
        return torch.tensor(rows, dtype=torch.long)

    def _dropped(self, spans: list[list[int]], room: int) -> str:
        """The ids after the first `room` in the words the prompt typed (spans: each typed token's ids):
        a new word reads as itself, not as its ids word_1, word_2, ..., and one cut inside is counted."""
        ends = list(accumulate(map(len, spans)))
        k = next(i for i, end in enumerate(ends) if end > room)  # the first typed token that loses ids
        lost, n = ends[k] - room, len(spans[k])
        text = _shorten(self._spell([span[0] for span in spans[k + (lost < n):]]))
        if lost == n:
            return repr(text)
        cut = f"the last {lost} of the {n} vectors of {self._spell(spans[k][:1])!r}"
        return f"{cut}, then {text!r}" if text else cut

    def _spell(self, ids: list[int]) -> str:
        """decode, with each new word (by its first id) spelled as its own word: its added token has no
        '</w>', so decode would glue it to the next word ('a sksdog')."""
        words = {its[0]: word for word, its in self.new_words.items()}
        parts = [" ".join(words[i] for i in run) if new else self.decode(list(run))
                 for new, run in groupby(ids, key=lambda i: i in words)]
        return " ".join(parts)

    def chunks(self, prompt: str, count: int | None = None) -> torch.Tensor:
        """(k, 77) ids: the whole prompt in 75-token chunks, each wrapped in <|startoftext|> ...
        <|endoftext|> and padded, as AUTOMATIC1111 reads a long prompt (sd_hijack_clip.py); their
        encodings are concatenated into a (1, 77 k, C) context. A chunk that fills up within 20
        tokens after a comma is cut after the comma, and the rest starts the next chunk (A1111's
        comma_padding_backtrack). An empty prompt is one chunk; `count` pads with empty chunks."""
        room, backtrack, comma = CONTEXT_LENGTH - 2, 20, self.vocab[",</w>"]
        expand = {ids[0]: ids for ids in self.new_words.values()}
        ids = [j for i in self._tokenizer.encode(prompt, add_special_tokens=False).ids for j in expand.get(i, [i])]
        chunks, chunk, last_comma = [], [], -1
        for token in ids:
            if token == comma:
                last_comma = len(chunk)
            elif len(chunk) == room and last_comma != -1 and len(chunk) - last_comma <= backtrack:
                chunks.append(chunk[:last_comma + 1])  # cut after the comma; the words after it move on
                chunk, last_comma = chunk[last_comma + 1:], -1
            if len(chunk) == room:
                chunks.append(chunk)
                chunk, last_comma = [], -1
            chunk.append(token)
        if chunk or not chunks:
            chunks.append(chunk)
        chunks += [[]] * ((count or 0) - len(chunks))
        rows = [[BOS, *c, EOS] + [self.pad_id] * (room - len(c)) for c in chunks]
        return torch.tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.vocab)


def as_read(text: str) -> str:
    """`text` as the tokenizer reads it (the normalizer above): NFC, each run of spaces one space, lower case;
    two prompts alike here are the same prompt to the model."""
    return " ".join(unicodedata.normalize("NFC", text).split()).lower()


def can_be_a_new_word(word: str) -> bool:
    """One lower-case word: prompts are lower-cased before a new word is looked up."""
    return word == word.lower() and bool(word.strip()) and not any(c.isspace() for c in word)


def _shorten(text, limit=120):
    """A long dropped tail is shown by its two ends, so the warning stays one readable line."""
    return text if len(text) <= limit else f"{text[:limit // 2]} ... {text[-limit // 2:]}"
