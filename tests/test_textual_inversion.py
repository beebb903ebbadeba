"""Textual inversion (Gal et al. 2022): a new word with embedding vectors of its own. Its file is proven
to mean the same in diffusers (load_textual_inversion) as in minidb, and to have AUTOMATIC1111's layout."""

import random

import numpy as np
import pytest
import torch
from safetensors import safe_open

from conftest import diffusers
from minidb.dreambooth import NewWord, pick_new_word
from minidb.files import ModelFileError
from minidb.load import load
from minidb.pipeline import decode, sample_latents
from minidb.tokenizer import Tokenizer
from test_bad_input import one_sentence
from test_load_save import reference_pipeline


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ti")
    reference_pipeline("SD 1.x", tmp).save_pretrained(tmp / "model")
    return tmp / "model"


def random_word(model, word, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return NewWord(model, word, torch.randn(n, model.text_encoder.cfg.width, generator=g))


def test_the_new_word_is_a_new_token_that_stands_for_all_its_vectors():
    tok = Tokenizer.for_version("SD 1.x")
    word = pick_new_word(tok, random.Random(0))
    assert word not in tok.vocab and word + "</w>" in tok.vocab  # rare, but never a token of its own
    ids = tok.add_word(word, 3)
    assert ids == [49408, 49409, 49410]
    row = tok(f"a photo of {word} cup")[0].tolist()
    assert row[:9] == [49406, *tok.encode("a photo of"), *ids, tok.encode("cup")[0], 49407]
    assert tok.encode(f"x{word}y") != [ids[0]]  # inside another word it is plain BPE
    with pytest.raises(ValueError, match="already a token"):
        tok.add_word("dog</w>")


def test_attached_word_changes_only_its_own_positions(folder):
    model = load(folder)
    ids = model.tokenizer(["a photo of a cup"])
    with torch.no_grad():
        before = model.text_encoder(ids)
        word = random_word(model, "abz", 2).attach(model.text_encoder)
        assert torch.equal(model.text_encoder(ids), before)  # prompts without the word: bit-identical
        with_word = model.text_encoder(model.tokenizer(["a photo of abz"]))
        word.detach()
        assert torch.equal(model.text_encoder(ids), before)
    assert with_word.shape == before.shape and not torch.equal(with_word, before)
    assert not model.text_encoder.embeddings.token_embedding._forward_hooks  # detach leaves no hook


def test_starting_vectors_are_the_class_words_embedding(folder):
    model = load(folder)
    word = NewWord.starting_as(model, "abz", "cup", n=3)
    table = model.text_encoder.embeddings.token_embedding.weight
    (cup,) = model.tokenizer.encode("cup")
    assert word.emb_params.shape == (3, table.shape[1]) and all(torch.equal(v, table[cup]) for v in word.emb_params)
    assert word.emb_params.requires_grad


@pytest.mark.parametrize("family,n", [("SD 1.x", 1), ("SD 1.x", 3), ("SD 2.x", 3)])
def test_the_file_means_the_same_in_diffusers(folder, tmp_path, family, n):
    """SD 2.x: OpenCLIP's tower (1024 wide at full size), a tokenizer that pads with 0, v-prediction. A word of
    several vectors is several tokens in diffusers, which its pipeline spells out (maybe_convert_prompt)."""
    if family == "SD 2.x":
        reference_pipeline(family, tmp_path).save_pretrained(tmp_path / "sd2")
        folder = tmp_path / "sd2"
    model = load(folder)
    assert model.version == family
    word = random_word(model, "abz", n).attach(model.text_encoder)
    path = tmp_path / "abz.safetensors"
    word.save(path)
    with safe_open(str(path), "pt") as f:  # AUTOMATIC1111's layout: one tensor emb_params (n, width)
        assert list(f.keys()) == ["emb_params"]
        assert f.get_tensor("emb_params").shape == (n, model.text_encoder.cfg.width)

    ref = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    ref.load_textual_inversion(str(path), token="abz")
    prompt = "a photo of abz on the beach"
    latents = sample_latents(model, prompt, steps=4, seed=3, height=32, width=32, progress=False)
    ref_latents = ref(prompt, num_inference_steps=4, height=32, width=32, output_type="latent",
                      generator=torch.Generator("cpu").manual_seed(3)).images
    assert torch.allclose(latents, ref_latents, atol=1e-4 * ref_latents.abs().max().item())
    images = np.asarray(decode(model, latents)[0]).astype(float)
    ref_image = (ref(prompt, num_inference_steps=4, height=32, width=32, output_type="np",
                     generator=torch.Generator("cpu").manual_seed(3)).images[0] * 255).round()
    assert np.abs(images - ref_image).mean() < 0.1
    base = sample_latents(load(folder), prompt, steps=4, seed=3, height=32, width=32, progress=False)
    assert not torch.allclose(latents, base, atol=1e-3)  # the word does something


def test_reading_the_file_back_gives_the_same_word(folder, tmp_path):
    model = load(folder)
    word = random_word(model, "abz", 2)
    word.save(tmp_path / "abz.safetensors")
    again = NewWord.from_file(load(folder), tmp_path / "abz.safetensors")
    assert again.word == "abz" and torch.equal(again.emb_params, word.emb_params)
    torch.save({"string_to_param": {"*": word.emb_params.detach()}, "name": "abz"}, tmp_path / "abz.pt")  # A1111 .pt
    assert torch.equal(NewWord.from_file(load(folder), tmp_path / "abz.pt").emb_params, word.emb_params)


def test_embeddings_that_do_not_fit_are_one_sentence(folder, tmp_path):
    from safetensors.torch import save_file
    save_file({"emb_params": torch.zeros(1, 1024)}, tmp_path / "wide.safetensors")
    with pytest.raises(ModelFileError) as e:
        NewWord.from_file(load(folder), tmp_path / "wide.safetensors")
    assert "1024-wide vectors (made for SD 2.x)" in one_sentence(e)
    save_file({"a.weight": torch.zeros(2, 32), "b.weight": torch.zeros(2, 32)}, tmp_path / "lora.safetensors")
    with pytest.raises(ModelFileError) as e:
        NewWord.from_file(load(folder), tmp_path / "lora.safetensors")
    assert "is not a textual-inversion embedding" in one_sentence(e)
    save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "a photo.safetensors")
    with pytest.raises(ModelFileError) as e:
        NewWord.from_file(load(folder), tmp_path / "a photo.safetensors")
    assert "rename the file" in one_sentence(e)


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_an_fp8_embedding_is_read_as_its_numbers(folder, tmp_path, dtype):
    """torch has no isfinite for float8_e4m3fn: checking such a file was a traceback."""
    from safetensors.torch import save_file
    vectors = torch.randn(2, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    save_file({"emb_params": vectors}, tmp_path / "abz.safetensors")
    assert torch.equal(NewWord.from_file(load(folder), tmp_path / "abz.safetensors").emb_params, vectors.float())


@pytest.mark.parametrize("tensors,words", [
    ({"emb_params": torch.zeros(0, 32)}, "holds no vectors (emb_params has the shape (0, 32))"),
    ({"emb_params": torch.zeros(0)}, "holds no vectors (emb_params has the shape (0,))"),
    ({"emb_params": torch.tensor(1.0)}, "is not a textual-inversion embedding"),
    ({"emb_params": torch.ones(1, 1, 32)}, "); it holds emb_params (1, 1, 32)."),  # not an embedding: it named no shape
    ({"emb_params": torch.full((1, 32), float("nan"))}, "holds NaN or infinite numbers in emb_params"),
    ({"emb_params": torch.full((2, 32), float("-inf"))}, "holds NaN or infinite numbers in emb_params"),
    # used silently: cast to float, int8 vectors became zeros and bool ones 0 and 1
    ({"emb_params": torch.ones(1, 32, dtype=torch.int8)}, "holds int8 values in emb_params where an embedding holds "
     "floating-point numbers; the file is damaged or of another kind, so make it again."),
    ({"emb_params": torch.ones(1, 32, dtype=torch.bool)}, "holds bool values in emb_params where an embedding holds"),
    ({"emb_params": torch.ones(1, 32, dtype=torch.complex64)}, "holds complex64 values in emb_params"),
])
def test_empty_and_non_finite_embeddings_are_one_sentence(folder, tmp_path, tensors, words):
    """0 vectors, 0-wide ones (which would not even reshape) and NaN ones (black pictures) are refused."""
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "abz.safetensors")
    with pytest.raises(ModelFileError) as e:
        NewWord.from_file(load(folder), tmp_path / "abz.safetensors")
    assert words in one_sentence(e)
    torch.save({"string_to_param": {"*": tensors["emb_params"]}}, tmp_path / "abz.pt")  # AUTOMATIC1111's .pt
    with pytest.raises(ModelFileError) as e:
        NewWord.from_file(load(folder), tmp_path / "abz.pt")
    assert words.replace("emb_params", "*") in one_sentence(e)
