"""train.py --method lora and textual-inversion (and --new-token): one loop for every method, only what
trains in the optimizer and the checkpoints, each method's files, and exact resume for each."""

import json
import re
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

import sample
from minidb import runs
from minidb.files import read_tensors
from minidb.info import main as info
from minidb.load import load
from minidb.lora import LoRA
from test_run_readme import as_the_readme_says, assert_same_weights, readme_calls
from test_runs import base_args, refused
from test_train import ROOT, run, world  # noqa: F401  (world is a fixture)


def settings(out):
    return json.loads((out / "settings.json").read_text())


def test_lora_trains_adapters_only_and_writes_a_kohya_file(world, tmp_path):
    out = run(world, tmp_path / "out", "--method", "lora", "--lora-rank", 4, "--save-every", 1, steps=2)
    assert not (out / "model.safetensors").exists() and not (out / "model").exists()  # the base is not copied
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert f.get_tensor(next(k for k in keys if k.endswith(".lora_up.weight"))).dtype == torch.float16
    assert all(k.startswith("lora_unet_") for k in keys) and any(k.endswith(".alpha") for k in keys)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0" and meta["ss_steps"] == "2"
    assert meta["ss_sd_model_name"] == "base" and settings(out)["identifier"] in meta["ss_training_comment"]
    # A1111 names the LoRA by its alias, ss_output_name, and disables one that two files share: each run's
    # file goes by its run folder's name, which the run's README tells the user to write in the tag
    assert meta["ss_output_name"] == "out" and "`<lora:out:1>`" in (out / "README.md").read_text()
    # the checkpoint holds the adapters, not the UNet: kilobytes here, megabytes for SD 1.5
    (ckpt,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["lora.safetensors", "state.pt"]
    weights, _ = read_tensors(ckpt / "lora.safetensors")
    unet_numel = sum(p.numel() for p in load(world / "base").unet.parameters())
    assert sum(t.numel() for t in weights.values()) < unet_numel / 10
    state = read_tensors(ckpt / "state.pt")[0]
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert sum(m.numel() for m in moments) == sum(t.numel() for k, t in weights.items() if not k.endswith(".alpha"))
    assert settings(out)["lr"] == 1e-4 and settings(out)["lora_alpha"] == 4.0  # lora's own defaults


def test_lora_at_step_zero_is_the_base_model(world):
    base = load(world / "base")
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    ids = base.tokenizer(["a photo of a ball"])
    with torch.no_grad():
        before_text, before = base.text_encoder(ids), base.unet(x, t, base.text_encoder(ids))
        LoRA(base, rank=4, text_encoder=True).attach()  # B starts at zero
        assert torch.equal(base.text_encoder(ids), before_text) and torch.equal(base.unet(x, t, before_text), before)


def test_textual_inversion_trains_one_word(world, tmp_path):
    out = run(world, tmp_path / "out", "--method", "textual-inversion", "--num-vectors", 2, steps=3, prior=False)
    s = settings(out)
    word = s["identifier"]
    assert s["lr"] == 5e-3 and s["new_token"] and word not in load(world / "base").tokenizer.vocab
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == [f"{word}.safetensors"]
    vectors, _ = read_tensors(out / f"{word}.safetensors")
    assert list(vectors) == ["emb_params"] and vectors["emb_params"].shape == (2, 32)
    (ckpt,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["new_word.safetensors", "state.pt"]
    # it moved away from its start, the class word's embedding
    model = load(world / "base")
    (ball,) = model.tokenizer.encode("ball")
    start = model.text_encoder.embeddings.token_embedding.weight[ball]
    assert not torch.allclose(vectors["emb_params"][0], start)
    assert "--embedding" in (out / "README.md").read_text()
    assert [s["new_word"] for s in runs.recorded_subjects([out / f"{word}.safetensors"])] == [True]


def test_textual_inversion_leaves_the_prior_off_by_default(world, tmp_path):
    out = run(world, tmp_path / "out", "--method", "textual-inversion", steps=1, prior=False)
    assert settings(out)["prior_weight"] == 0.0
    assert all(json.loads(line)["prior_loss"] is None for line in open(out / "log.jsonl"))


def test_pivotal_tuning_writes_the_lora_and_the_word(world, tmp_path, capsys):
    out = run(world, tmp_path / "out", "--method", "lora", "--new-token", "--train-text-encoder", "--lora-rank", 2,
              steps=2)
    word = settings(out)["identifier"]
    assert (out / "lora.safetensors").is_file() and (out / f"{word}.safetensors").is_file()
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in f.keys())
    (ckpt,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["lora.safetensors", "new_word.safetensors", "state.pt"]

    # the LoRA records its identifier as a new word, which needs the embedding file beside it
    embedding = out / f"{word}.safetensors"
    with pytest.warns(UserWarning, match=f"{word} in the prompt is a new word .* add --embedding {re.escape(str(embedding))}"):
        sample.fill_identifier("a photo of a [V] ball", [world / "base", out / "lora.safetensors"], [])
    capsys.readouterr()
    assert info([str(out / "lora.safetensors")]) == 0
    described = capsys.readouterr().out
    assert f"{word} is a new word that needs its embedding: add --embedding {embedding}\n" in described
    assert f"--lora {out / 'lora.safetensors'} --embedding {embedding} --prompt" in described


@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated")  # 0.42 prefers dtype=, which older ones ignore
def test_full_with_a_new_word_writes_the_model_and_the_word(world, tmp_path, capsys):
    out = run(world, tmp_path / "out", "--new-token", "--save-dtype", "fp16", steps=1)  # half, as SD 1.5's own files
    word = settings(out)["identifier"]
    assert (out / "model.safetensors").is_file() and (out / f"{word}.safetensors").is_file()

    # the run's README says how other tools load the model, and its diffusers lines, run as written, load it in fp16
    # (test_load_save.py: such a model draws there what the fp32 model draws)
    readme = (out / "README.md").read_text()
    assert "`model.safetensors` into `models/Stable-diffusion`; ComfyUI: copy it into `models/checkpoints`" in readme
    calls = readme_calls(readme)
    assert calls == {
        "from_pretrained": f'StableDiffusionPipeline.from_pretrained("{out / "model"}", torch_dtype=torch.float16)',
        "from_single_file": f'StableDiffusionPipeline.from_single_file("{out / "model.safetensors"}", '
                            f'config="{out / "model"}", torch_dtype=torch.float16)'}
    folder, single = (as_the_readme_says(code) for code in calls.values())
    assert {name: getattr(folder, name).dtype for name in ("unet", "vae", "text_encoder")} == dict.fromkeys(
        ("unet", "vae", "text_encoder"), torch.float16)
    assert_same_weights(single, folder)
    assert torch.equal(folder.unet.conv_out.weight, load(out / "model").unet.out[2].weight)
    (ckpt,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in ckpt.iterdir()) == ["new_word.safetensors", "state.pt", "unet.safetensors"]

    # the exports record the identifier as a new word, which the model knows only with the run's embedding file
    embedding = out / f"{word}.safetensors"
    for export in (out / "model.safetensors", out / "model", embedding):
        assert [(s["identifier"], s["new_word"], s["embedding"]) for s in runs.recorded_subjects([export])] == [
            (word, True, embedding)], export
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(out / "model.safetensors"), "--prompt",
                        "a photo of a [V] ball", "--steps", "2", "--height", "32", "--out", str(tmp_path / "drawn")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and len(list((tmp_path / "drawn").glob("*.png"))) == 1, r.stderr  # warned, and drawn
    assert r.stderr.count("warning") == 1 and r.stderr.startswith(
        f"warning: {word} in the prompt is a new word that the train.py run learned as an embedding, so without it "
        f"the model reads {word} as letters and leaves the subject out; add --embedding {embedding}.\n"), r.stderr
    written = f"a photo of a {word.upper()} ball"  # the word written out, not [V] (prompts are read in lower case)
    with pytest.warns(UserWarning, match=f"add --embedding {re.escape(str(embedding))}"):
        assert sample.fill_identifier(written, [out / "model"], []) == written
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with its embedding the word is known, and inside another word it is not there
        assert sample.fill_identifier("a [V] ball", [out / "model"], [embedding]) == f"a {word} ball"
        assert sample.fill_identifier(f"a {word}x ball", [out / "model"], []) == f"a {word}x ball"
        # renamed, the embedding's word is its file's name (A1111 reads it so), and [V] reads as that word; the
        # recorded one, not loaded, was drawn as letters, with a warning to add the embedding already given
        renamed = shutil.copy(embedding, tmp_path / "Mine.safetensors")
        assert sample.fill_identifier("a [V] ball", [world / "base"], [renamed]) == "a mine ball"
        assert sample.fill_identifier("a [V] ball", [out / "model"], [renamed]) == "a mine ball"  # (it records uq)
    capsys.readouterr()
    assert info([str(renamed)]) == 0
    described = capsys.readouterr().out
    assert f"identifier {word}, class ball; renamed since, so the word is mine\n" in described
    assert described.endswith(f'--embedding {renamed} --prompt "a photo of mine ball"\n')
    embedding.rename(tmp_path / "elsewhere.safetensors")  # the path unknown: the run's file is named
    with pytest.warns(UserWarning, match=f"add --embedding the run's {word}.safetensors"):
        sample.fill_identifier("a photo of a [V] ball", [out / "model.safetensors"], [])
    capsys.readouterr()
    assert info([str(out / "model")]) == 0
    assert (f"identifier     {word}: the subject train.py trained; sample.py reads [V] as it, but {word} is a new word "
            f"that needs its embedding: add --embedding the run's {word}.safetensors\n") in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:--mixed-precision bf16 on this CPU")  # bf16 on purpose, emulated or not
def test_lora_trains_under_bf16_autocast_and_checkpointing(world, tmp_path):
    out = run(world, tmp_path / "out", "--method", "lora", "--lora-rank", 2, "--mixed-precision", "bf16",
              "--gradient-checkpointing", "--lr", 1e-2, steps=2)
    weights, _ = read_tensors(out / "lora.safetensors")
    ups = [t for k, t in weights.items() if k.endswith("lora_up.weight")]
    assert all(torch.isfinite(t).all() for t in ups) and any(t.abs().sum() > 0 for t in ups)  # it learned


@pytest.mark.parametrize("method", ["lora", "textual-inversion"])
def test_resume_is_bitwise_equal_for_every_method(world, tmp_path, method):
    extra = ["--method", method] + (["--lora-rank", 2, "--train-text-encoder"] if method == "lora" else [])
    straight = run(world, tmp_path / "straight", *extra, steps=4)
    split = run(world, tmp_path / "split", *extra, steps=2)
    run(world, split, *extra, "--resume", steps=4)
    name = "lora.safetensors" if method == "lora" else f"{settings(straight)['identifier']}.safetensors"
    a, b = read_tensors(straight / name)[0], read_tensors(split / name)[0]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(x)["loss"] for x in open(straight / "log.jsonl")] == \
           [json.loads(x)["loss"] for x in open(split / "log.jsonl")]


@pytest.mark.parametrize("args,message", [
    (["--method", "lora", "--lora-rank", "0"], "argument --lora-rank: must be between 1 and 1024, not 0"),
    (["--method", "lora", "--lora-rank", "-4"], "argument --lora-rank: must be between 1 and 1024"),
    (["--method", "lora", "--lora-alpha", "nan"], "argument --lora-alpha: must be a finite number"),
    (["--lora-rank", "8"], "--lora-rank applies to --method lora only, not to --method full"),
    (["--method", "lora", "--save-dtype", "fp32"], "--save-dtype applies to --method full only, not to --method lora"),
    (["--method", "textual-inversion", "--train-text-encoder"],
     "--train-text-encoder applies to --method full or lora only, not to --method textual-inversion"),
    (["--method", "lora", "--num-vectors", "2"], "--num-vectors sets the vectors of a new word; add --new-token"),
    (["--method", "textual-inversion", "--num-vectors", "0"], "argument --num-vectors: must be between 1 and 16"),
    (["--method", "dreambooth"], "argument --method: invalid choice: 'dreambooth'"),
])
def test_method_flags_that_do_not_fit_are_refused(world, tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert message in refused(capsys, base_args(world, out) + args)
    assert not out.exists()


def test_a_new_word_must_be_new(world, tmp_path, capsys):
    err = refused(capsys, base_args(world, tmp_path / "out") + ["--method", "textual-inversion", "--identifier", "a"])
    assert "--identifier a is already a token" in err


def test_resume_refuses_another_method(world, tmp_path, capsys):
    out = run(world, tmp_path / "out", steps=1)
    assert "--method is 'lora' now but the run" in refused(capsys, base_args(world, out) + [
        "--method", "lora", "--resume", "--steps", 2])
    assert runs.latest_state(out / "checkpoints").name == "step-000001"


# ---- the files a run writes draw the same picture in diffusers as in sample.py ----

def draw_with_sample_py(world, tmp_path, prompt, *extra):
    import subprocess
    import sys
    from PIL import Image
    from test_train import ROOT
    out = tmp_path / "drawn"
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--dtype", "fp32", "--model", str(world / "base"), "--prompt", prompt,
                        "--steps", "4", "--seed", "5", "--height", "32", "--out", str(out), *map(str, extra)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png)).astype(np.float64)


def draw_with_diffusers(pipe, prompt, **kwargs):
    return pipe(prompt, num_inference_steps=4, height=32, width=32, generator=torch.Generator("cpu").manual_seed(5),
                output_type="np", **kwargs).images[0] * 255


@pytest.fixture(scope="module")
def lora_run(world, tmp_path_factory):
    # a large learning rate, so that three steps change the picture visibly
    return run(world, tmp_path_factory.mktemp("lora") / "out", "--method", "lora", "--train-text-encoder",
               "--lora-rank", 4, "--lr", 3e-2, steps=3)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_a_trained_lora_draws_the_same_in_diffusers(world, lora_run, tmp_path, scale):
    from test_lora import complaints, pipeline
    prompt = f"a photo of a {settings(lora_run)['identifier']} ball"
    ours = draw_with_sample_py(world, tmp_path, prompt, "--lora", f"{lora_run / 'lora.safetensors'}:{scale}")
    pipe = pipeline(world / "base")
    base = draw_with_diffusers(pipe, prompt)
    with complaints() as left_out:
        pipe.load_lora_weights(str(lora_run), weight_name="lora.safetensors")
    assert not left_out, left_out  # diffusers took every key of the file
    theirs = draw_with_diffusers(pipe, prompt, cross_attention_kwargs={"scale": scale})
    assert np.abs(ours - theirs.round()).mean() < 0.1  # in 8-bit levels: far below 1/255
    assert np.abs(theirs - base).mean() > 1.0  # and the LoRA does change the picture


def test_a_trained_word_draws_the_same_in_diffusers(world, tmp_path):
    from test_lora import pipeline
    out = run(world, tmp_path / "out", "--method", "textual-inversion", "--num-vectors", 2, "--lr", 0.5, steps=3,
              prior=False)
    word = settings(out)["identifier"]
    prompt = f"a photo of a {word} ball"
    ours = draw_with_sample_py(world, tmp_path, prompt, "--embedding", out / f"{word}.safetensors")
    pipe = pipeline(world / "base")
    base = draw_with_diffusers(pipe, f"a photo of a {word} ball")  # the plain rare token, before loading
    pipe.load_textual_inversion(str(out / f"{word}.safetensors"), token=word)
    theirs = draw_with_diffusers(pipe, prompt)
    assert np.abs(ours - theirs.round()).mean() < 0.1
    assert np.abs(theirs - base).mean() > 1.0
