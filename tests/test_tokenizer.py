"""Parity tests for minidb.tokenizer against transformers' CLIPTokenizer (what diffusers runs)
and OpenAI's original clip/simple_tokenizer.py (from clip-anytorch).

Everything is built offline from the repo's weights/bpe_simple_vocab_16e6.txt.gz and from folders
written under tmp_path; nothing is downloaded.
"""

import gzip
import importlib.util
import json
import os
import warnings
from pathlib import Path

import pytest
import torch
import transformers

from minidb.files import ModelFileError
from minidb.tokenizer import BOS, CONTEXT_LENGTH, DEFAULT_BPE_PATH, EOS, VOCAB_SIZE, Tokenizer
from test_bad_input import one_sentence

BPE_PATH = Path(__file__).resolve().parent.parent / "weights" / "bpe_simple_vocab_16e6.txt.gz"
SD1_PAD, SD2_PAD = EOS, 0  # SD 1.x pads with <|endoftext|>, SD 2.x with '!'

LONG = (
    "a highly detailed photograph of a sks dog sitting on a wooden porch at golden hour, shallow depth "
    "of field, bokeh, 85mm lens, f/1.4, warm tones, soft rim light, film grain, kodak portra 400, "
    "award winning, trending on artstation, masterpiece, best quality, ultra realistic, 8k uhd, "
    "intricate fur texture, expressive eyes, cinematic composition, volumetric light, by greg rutkowski"
)
PROMPTS = [
    "", "a", "sks", "sks dog", "a photo of sks dog", "a photo of a dog", "[V] dog", "a olis backpack",
    "a sks dog in the jungle, oil painting, trending on artstation",
    "A Photo Of SKS Dog", "ALL CAPS PROMPT", "MiXeD cAsE",
    "it's a dog's life", "don't stop, we're here, I've, I'm, you'll, he'd",
    "photo of a dog     with   many\tspaces\nand\r\nnewlines", "   leading and trailing   ",
    "tab\tseparated\tvalues", "non\u00a0breaking\u3000space", "zero\u200bwidth",
    "numbers 1234567890 and 3.14159 and 1,000,000", "year 2024, 4k, 8k uhd, 35mm, f/1.8",
    "punctuation ??? ... --- ;;; (parens) [brackets] {braces} <angle> @#$%^*",
    "hyphen-ated snake_case camelCase", "url https://example.com/path?q=1",
    "masterpiece, best quality, (sks dog:1.2), [blurry]",
    "naïve café résumé façade", "e\u0301 composed by NFC", "über straße",
    "日本の犬の写真", "東京タワー", "한국어 문장", "привет мир", "ελληνικά", "مرحبا", "हिन्दी",
    "emoji 🐶🐱🚀 and skin tone 👍🏽 and flag 🇺🇸",
    "a photo of <|endoftext|>", "<|startoftext|>a dog", "a dog<|endoftext|>cat",
    "wow!", "hello!world", "!", "!!!!!",  # '!' is SD 2.x's pad token: see test_sd2_pad_token_in_prompt
    "fish &amp; chips", "“curly quotes” and ‘single’", "ﬁne ligature",  # OpenAI's ftfy/html would change these
    "ΟΔΥΣΣΕΥΣ", "A <|ENDOFTEXT|>", "dog,<|endoftext|>",  # see test_known_differences_from_openai
    "a " * 75, "a " * 76, LONG, LONG + " " + LONG,  # at, just past and far past the 75-token limit
]

# Prompts where OpenAI's tokenizer gives other ids than transformers (and minidb), with the reason.
OPENAI_DIFFERS = {
    "fish &amp; chips": "OpenAI runs html.unescape",
    "“curly quotes” and ‘single’": "OpenAI runs ftfy, which straightens quotes",
    "ﬁne ligature": "OpenAI runs ftfy, which splits ligatures",
    "ΟΔΥΣΣΕΥΣ": "Python's str.lower() turns a word-final Σ into ς; tokenizers lower-cases per character",
    "A <|ENDOFTEXT|>": "OpenAI lower-cases before finding special tokens; transformers matches them as typed",
    "dog,<|endoftext|>": "OpenAI's regex glues '<|' to the preceding punctuation; transformers splits "
    "special tokens out first",
}


def batch_ids(hf_tokenizer, prompts):
    """transformers' ids as diffusers' StableDiffusionPipeline asks for them."""
    out = hf_tokenizer(prompts, padding="max_length", max_length=CONTEXT_LENGTH, truncation=True)
    return torch.tensor(out["input_ids"])


def quietly(tokenizer, prompts):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # truncation warnings are tested on their own
        return tokenizer(prompts)


@pytest.fixture(scope="module")
def minidb_tok():
    return {pad: Tokenizer.from_openai_bpe(BPE_PATH, pad_id=pad) for pad in (SD1_PAD, SD2_PAD)}


@pytest.fixture(scope="module")
def saved(minidb_tok, tmp_path_factory):
    folders = {}
    for pad, tok in minidb_tok.items():
        folders[pad] = tmp_path_factory.mktemp(f"tokenizer_pad{pad}")
        tok.save(folders[pad])
    return folders


@pytest.fixture(scope="module")
def hf_tok(saved):
    return {pad: transformers.CLIPTokenizer.from_pretrained(folder) for pad, folder in saved.items()}


@pytest.fixture(scope="module")
def openai():
    """OpenAI's SimpleTokenizer, loaded by file path: `import clip` would pull in torchvision."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("clip-anytorch is not installed (pip install --no-deps clip-anytorch==2.6.0)")
    path = Path(next(iter(spec.submodule_search_locations))) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except ImportError as e:
        pytest.skip(f"OpenAI's simple_tokenizer.py needs {e.name} (pip install ftfy regex)")
    return module.SimpleTokenizer(str(BPE_PATH)), module


def test_shipped_bpe_file_is_the_default():
    assert DEFAULT_BPE_PATH == BPE_PATH and BPE_PATH.is_file()


def test_saved_vocabulary_equals_openai(openai, saved):
    reference, _ = openai
    for folder in saved.values():
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        assert vocab == reference.encoder  # same tokens and ids
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        assert lines[0].startswith("#version")
        assert [tuple(line.split()) for line in lines[1:]] == list(reference.bpe_ranks)  # same merges, same order
    assert len(vocab) == VOCAB_SIZE and vocab["<|startoftext|>"] == BOS and vocab["<|endoftext|>"] == EOS


@pytest.mark.parametrize("pad", [SD1_PAD, SD2_PAD], ids=["sd1_pad_eos", "sd2_pad_0"])
def test_ids_match_transformers(minidb_tok, hf_tok, pad):
    assert hf_tok[pad].pad_token_id == pad
    ours = quietly(minidb_tok[pad], PROMPTS)
    assert ours.dtype == torch.long and ours.shape == (len(PROMPTS), CONTEXT_LENGTH)
    expected = batch_ids(hf_tok[pad], PROMPTS)
    for prompt, a, b in zip(PROMPTS, ours, expected):
        assert a.tolist() == b.tolist(), f"ids differ for {prompt!r}"
    assert (ours[:, 0] == BOS).all()
    assert ((ours == EOS).sum(1) >= 1).all()


def test_encode_matches_openai(minidb_tok, openai):
    reference, module = openai
    # Only prompts that OpenAI's cleaning (ftfy, html.unescape) leaves alone can agree.
    same = [p for p in PROMPTS if p not in OPENAI_DIFFERS and module.basic_clean(p) == p.strip()]
    assert len(same) >= 40, "the comparison must cover most prompts"
    for prompt in same:
        assert minidb_tok[SD1_PAD].encode(prompt) == reference.encode(prompt), f"ids differ for {prompt!r}"


@pytest.mark.parametrize("prompt", list(OPENAI_DIFFERS))
def test_known_differences_from_openai(minidb_tok, hf_tok, openai, prompt):
    """We follow transformers where it departs from OpenAI; this pins down each known case."""
    reference, _ = openai
    ours = minidb_tok[SD1_PAD].encode(prompt)
    assert ours == hf_tok[SD1_PAD](prompt, add_special_tokens=False)["input_ids"]
    assert ours != reference.encode(prompt), OPENAI_DIFFERS[prompt]


def test_sd2_pad_token_in_prompt(minidb_tok, hf_tok):
    """transformers makes the pad token special, so with SD 2.x a typed '!' becomes id 0, not '!</w>'."""
    sd1, sd2 = minidb_tok[SD1_PAD], minidb_tok[SD2_PAD]
    assert sd1.encode("wow!")[-1] == sd1.vocab["!</w>"]
    reference = hf_tok[SD2_PAD]("wow!", add_special_tokens=False)["input_ids"]
    assert sd2.encode("wow!") == reference and reference[-1] == SD2_PAD


@pytest.mark.parametrize("version, pad", [("SD 1.x", SD1_PAD), ("SD 2.x", SD2_PAD)])
def test_for_version_matches_transformers(hf_tok, version, pad):
    tok = Tokenizer.for_version(version)
    assert tok.pad_id == pad and len(tok) == VOCAB_SIZE
    assert torch.equal(quietly(tok, PROMPTS), batch_ids(hf_tok[pad], PROMPTS))


@pytest.mark.parametrize("pad", [SD1_PAD, SD2_PAD], ids=["sd1_pad_eos", "sd2_pad_0"])
def test_save_and_load_round_trip(minidb_tok, saved, pad):
    names = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]
    assert sorted(os.listdir(saved[pad])) == names  # and no temporary files left behind
    loaded = Tokenizer.from_folder(saved[pad])
    assert loaded.pad_id == pad
    assert torch.equal(quietly(loaded, PROMPTS), quietly(minidb_tok[pad], PROMPTS))


def test_loads_folder_saved_by_transformers(minidb_tok, hf_tok, tmp_path):
    """transformers 5 writes tokenizer.json and tokenizer_config.json only."""
    hf_tok[SD2_PAD].save_pretrained(tmp_path)
    for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
        (tmp_path / name).unlink(missing_ok=True)  # exercise the tokenizer.json path whatever was written
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.pad_id == SD2_PAD
    assert torch.equal(quietly(loaded, PROMPTS), quietly(minidb_tok[SD2_PAD], PROMPTS))


SPECIAL_EOS = {"content": "<|endoftext|>", "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
PAD_CASES = {  # (tokenizer_config.json, special_tokens_map.json); None means the file is absent
    "no_config": (None, None),
    "sd1_style": ({"pad_token": "<|endoftext|>"}, {"pad_token": "<|endoftext|>", "eos_token": SPECIAL_EOS}),
    "sd2_style": ({"pad_token": "<|endoftext|>"}, {"pad_token": "!", "eos_token": SPECIAL_EOS}),
    "config_only": ({"pad_token": "!"}, None),
    "map_overrides_config": ({"pad_token": "!"}, {"pad_token": "<|endoftext|>"}),
    "new_format_ignores_map": ({"pad_token": "!", "added_tokens_decoder": {}}, {"pad_token": "<|endoftext|>"}),
    "pad_as_dict": (None, {"pad_token": {"content": "!", "lstrip": False, "normalized": False, "rstrip": False}}),
}


@pytest.mark.parametrize("case", list(PAD_CASES))
def test_pad_token_resolved_like_transformers(saved, tmp_path, case):
    config, special_map = PAD_CASES[case]
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((saved[SD1_PAD] / name).read_bytes())
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CLIPTokenizer", **config}))
    if special_map is not None:
        (tmp_path / "special_tokens_map.json").write_text(json.dumps(special_map))
    expected = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    ours = Tokenizer.from_folder(tmp_path)
    assert ours.pad_id == expected.pad_token_id
    assert torch.equal(quietly(ours, PROMPTS), batch_ids(expected, PROMPTS))


def test_truncation_keeps_bos_and_eos_and_warns(minidb_tok):
    tok = minidb_tok[SD1_PAD]
    ids = tok.encode(LONG + " " + LONG)
    room = CONTEXT_LENGTH - 2
    dropped = len(ids) - room
    assert dropped > 0
    with pytest.warns(UserWarning, match=f"dropped its last {dropped} tokens") as caught:
        row = tok(LONG + " " + LONG)[0]
    cut = tok.decode(ids[room:])
    shown = cut if len(cut) <= 120 else f"{cut[:60]} ... {cut[-60:]}"
    assert shown in str(caught[0].message)  # the user sees what was cut, by its two ends when it is long
    assert row.tolist() == [BOS, *ids[:room], EOS]
    with pytest.warns(UserWarning) as caught:  # a pasted essay still gives a one-line warning
        tok("a very good dog " * 5000)
    assert len(str(caught[0].message)) < 300


@pytest.mark.parametrize("prompt,shown", [
    ("a photo of sks", "dropped its last 8 tokens: the last 8 of the 80 vectors of 'sks'."),
    ("a photo of sks, in the park", "dropped its last 12 tokens: the last 8 of the 80 vectors of 'sks', then ', in the park'."),
    ("a " * 74 + "dog sks in a park", "dropped its last 83 tokens: 'sks in a park'."),
], ids=["cut_inside", "cut_inside_then_words", "whole_word"])
def test_truncation_shows_a_new_word_as_typed_not_its_internal_tokens(prompt, shown):
    """A textual-inversion word of 80 vectors stands for the ids sks, sks_1, ..., sks_79; the warning
    speaks of the word the user typed, and says how much of it was cut."""
    tok = Tokenizer.for_version("SD 1.x")  # a fresh one: add_word changes it
    tok.add_word("sks", 80)
    with pytest.warns(UserWarning) as caught:
        tok(prompt)
    message = str(caught[0].message)
    assert message.endswith(shown) and "sks_" not in message


def test_no_warning_at_exactly_75_tokens(minidb_tok):
    tok = minidb_tok[SD1_PAD]
    assert len(tok.encode("a " * 75)) == CONTEXT_LENGTH - 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        row = tok("a " * 75)[0]
    assert row[-1] == EOS and (row[1:-1] == tok.encode("a")[0]).all()


def test_single_prompt_gives_one_row(minidb_tok):
    ids = minidb_tok[SD2_PAD]("a photo of sks dog")
    n = len(minidb_tok[SD2_PAD].encode("a photo of sks dog"))
    assert ids.shape == (1, CONTEXT_LENGTH)
    assert ids[0, : n + 2].tolist() == [BOS, *minidb_tok[SD2_PAD].encode("a photo of sks dog"), EOS]
    assert (ids[0, n + 2 :] == SD2_PAD).all()


@pytest.mark.parametrize("text", ["a photo of sks dog", "a dog in the jungle", "the quick brown fox jumps over it", ""])
def test_decode_inverts_encode(minidb_tok, text):
    tok = minidb_tok[SD1_PAD]
    assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("pad", [SD1_PAD, SD2_PAD], ids=["sd1_pad_eos", "sd2_pad_0"])
def test_decode_matches_transformers(minidb_tok, hf_tok, pad):
    for row in quietly(minidb_tok[pad], PROMPTS):
        assert minidb_tok[pad].decode(row) == hf_tok[pad].decode(row.tolist())


def test_missing_bpe_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="BPE merges file .* is missing"):
        Tokenizer.from_openai_bpe(tmp_path / "nope.txt.gz")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ModelFileError, match="does not exist"):
        Tokenizer.from_folder(tmp_path / "nope")


def test_folder_without_vocab_files_is_a_clear_error(saved, tmp_path):
    (tmp_path / "vocab.json").write_bytes((saved[SD1_PAD] / "vocab.json").read_bytes())  # merges.txt missing
    with pytest.raises(ModelFileError, match="neither vocab.json with merges.txt nor tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_corrupt_vocab_is_a_clear_error(saved, tmp_path):
    (tmp_path / "vocab.json").write_text('{"a": 0,')  # cut short, as by an interrupted download
    (tmp_path / "merges.txt").write_bytes((saved[SD1_PAD] / "merges.txt").read_bytes())
    with pytest.raises(ModelFileError, match="vocab.json is not a readable JSON file"):
        Tokenizer.from_folder(tmp_path)


def test_unknown_version_is_a_clear_error():
    with pytest.raises(ValueError, match="Unknown Stable Diffusion version 'SD 3'"):
        Tokenizer.for_version("SD 3")


def test_unknown_pad_token_is_a_clear_error(saved, tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_bytes((saved[SD1_PAD] / name).read_bytes())
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(ModelFileError, match="pad token '<pad>'"):
        Tokenizer.from_folder(tmp_path)


def test_non_clip_vocabulary_is_a_clear_error(tmp_path):
    with gzip.open(tmp_path / "tiny.txt.gz", "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\n")  # no merges: the special tokens land at ids 512 and 513
    with pytest.raises(ModelFileError, match="not CLIP's"):
        Tokenizer.from_openai_bpe(tmp_path / "tiny.txt.gz")


def _first_merges_line(folder):
    return (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1]


BROKEN_FILES = {  # name -> (file, what to write, words the sentence holds)
    "merges_latin1": ("merges.txt", b"#version: 0.2\n\xff\xfe a\n", "it is not UTF-8 text"),
    "merges_line_of_one": ("merges.txt", "#version: 0.2\ngarbage\n", 'the merge ["garbage"] is not two tokens'),
    "merges_empty": ("merges.txt", "", "it holds 0 merges where CLIP has 48,894"),
    "merges_cut_short": ("merges.txt", lambda folder: (folder / "merges.txt").read_text(encoding="utf-8")[:5000],
                         "merges where CLIP has 48,894"),
    "merges_unknown_tokens": ("merges.txt", lambda folder: (folder / "merges.txt").read_text(encoding="utf-8")
                              .replace(_first_merges_line(folder), "\u2603 \u2604", 1),
                              "makes tokens that vocab.json lacks"),
    "vocab_id_not_a_number": ("vocab.json", lambda folder: json.dumps(
        {**json.loads((folder / "vocab.json").read_text(encoding="utf-8")), "a</w>": "x"}),
        "it gives 'a</w>' the id \"x\""),
    "vocab_a_list": ("vocab.json", "[]", "its vocabulary is not a JSON object of token ids"),
    "tokenizer_json_empty": ("tokenizer.json", "{}", 'it has no "model" entry'),
    "tokenizer_json_a_list": ("tokenizer.json", "[]", 'it has no "model" entry'),
    "tokenizer_json_no_merges": ("tokenizer.json", '{"model": {"vocab": {"a": 0}}}', "it has no list of merges"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_tokenizer_file_is_one_sentence_naming_it(saved, tmp_path, case):
    """A damaged tokenizer/ folder is refused naming the file, rather than failing inside the tokenizers
    library (or, for an empty merges.txt, quietly spelling every prompt letter by letter)."""
    name, content, words = BROKEN_FILES[case]
    if name != "tokenizer.json":  # tokenizer.json is read only when vocab.json and merges.txt are absent
        for good in ("vocab.json", "merges.txt"):
            (tmp_path / good).write_bytes((saved[SD1_PAD] / good).read_bytes())
    content = content(saved[SD1_PAD]) if callable(content) else content
    (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    with pytest.raises(ModelFileError) as e:
        Tokenizer.from_folder(tmp_path)
    message = one_sentence(e)
    assert message.startswith(f"{tmp_path / name} is not a usable CLIP tokenizer file (") and words in message, message
