"""Long prompts (--long-prompts): AUTOMATIC1111's 75-token chunks, encoded chunk by chunk and
concatenated, proven against transformers' CLIP text model and diffusers' pipeline fed the same
embeddings; and both scripts take the flag."""

import pytest
import torch

from conftest import diffusers
from minidb.load import load
from minidb.pipeline import encode_prompt, sample_latents
from minidb.tokenizer import BOS, EOS, Tokenizer
from test_load_save import reference_pipeline

WORDS = "red green blue yellow purple orange".split()


def words(n):
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.for_version("SD 1.x")


def test_chunks_are_75_tokens_between_bos_and_eos(tok):
    rows = tok.chunks(words(160))
    assert rows.shape == (3, 77) and (rows[:, 0] == BOS).all() and (rows[:, -1] == EOS).all()
    assert (rows[2, 11:] == EOS).all() and rows[2, 10] != EOS  # 160 = 75 + 75 + 10
    assert torch.equal(rows[0], tok(words(75))[0])  # a full first chunk is the truncated prompt
    assert tok.chunks("").shape == (1, 77) and tok.chunks("a cat", count=3).shape == (3, 77)
    assert torch.equal(tok.chunks("a cat", count=3)[1:], tok.chunks("", count=2))


def test_a_chunk_that_fills_up_soon_after_a_comma_is_cut_after_it(tok):
    """A1111's comma_padding_backtrack (20): the words after the comma move to the next chunk whole."""
    near = words(60) + ", " + words(30)  # the comma is token 61: 14 tokens from the end of the chunk
    rows = tok.chunks(near)
    assert rows[0, 61] == tok.vocab[",</w>"] and (rows[0, 62:] == EOS).all()
    assert torch.equal(rows[1, 1:31], torch.tensor(tok.encode(words(30))))
    far = words(50) + ", " + words(40)  # the comma is 24 tokens from the end: no cut
    assert (tok.chunks(far)[0] != EOS).sum() == 76


def test_sd2_chunks_pad_with_its_pad_token():
    rows = Tokenizer.for_version("SD 2.x").chunks(words(80))
    assert rows[1, 6] == EOS and (rows[1, 7:] == 0).all()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("long")
    reference_pipeline("SD 1.x", tmp).save_pretrained(tmp / "model")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp / "model", safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    return ref, load(tmp / "model")


def test_long_prompt_encoding_and_picture_equal_diffusers_fed_the_chunk_embeddings(saved):
    ref, model = saved
    prompt, negative = words(100), words(90)  # two chunks each
    context, _ = encode_prompt(model, [prompt], long=True)
    with torch.no_grad():
        theirs = lambda text: torch.cat([ref.text_encoder(row[None])[0] for row in model.tokenizer.chunks(text)], dim=1)
        assert context.shape == (1, 154, 32)
        torch.testing.assert_close(context, theirs(prompt), rtol=1e-5, atol=1e-5)
        image = ref(prompt_embeds=theirs(prompt), negative_prompt_embeds=theirs(negative), num_inference_steps=3,
                    guidance_scale=7.5, height=32, width=32, generator=torch.Generator().manual_seed(3),
                    output_type="latent").images
    ours = sample_latents(model, prompt, negative, steps=3, seed=3, height=32, width=32, progress=False,
                          long_prompts=True)
    torch.testing.assert_close(ours, image, rtol=1e-4, atol=1e-4)


def test_prompt_and_negative_of_different_lengths_are_guided_in_two_passes(saved):
    _, model = saved
    one = sample_latents(model, words(100), "", steps=2, seed=1, height=32, width=32, progress=False, long_prompts=True)
    assert one.shape[:2] == (1, 4) and torch.isfinite(one).all()
    with pytest.warns(UserWarning, match="longer than CLIP's 77 tokens"):  # without the flag: cut, and said so
        cut = sample_latents(model, words(100), "", steps=2, seed=1, height=32, width=32, progress=False)
    assert not torch.equal(one, cut)  # the words after the 75th now count


def test_both_scripts_explain_the_flag(capsys):
    import sample
    import train
    for script in (sample, train):
        with pytest.raises(SystemExit):
            script.main(["--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "in 75-token chunks whose encodings are concatenated" in help_text
        assert "SD 1.x, SD 2.x and SDXL (base)" in help_text and "How the prediction type" in help_text
        assert "MODEL may also be a LoRA" not in help_text  # as minidb.info's may: these two refuse one
