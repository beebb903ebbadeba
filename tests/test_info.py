"""`python -m minidb.info`: describes a model, converts it, and fails with one line on bad input."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from minidb import text_encoder as te, unet as un, vae as va
from minidb.info import main
from minidb.load import StableDiffusion, load
from minidb.save import save_diffusers, save_single_file
from minidb.tokenizer import Tokenizer
from conftest import TINY_TEXT, TINY_UNET, diffusers, randomize_, tiny_model
from test_load_save import assert_same_outputs

ROOT = Path(__file__).resolve().parent.parent


def run(*args):
    return subprocess.run([sys.executable, "-m", "minidb.info", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_describes_and_converts_a_model(tmp_path):
    torch.manual_seed(0)
    model = StableDiffusion(Tokenizer.for_version("SD 2.x"), te.TextEncoder(te.TINY), va.AutoencoderKL(va.TINY),
                            un.UNet(un.TINY), "SD 2.x", "v_prediction")
    save_single_file(model, tmp_path / "m.safetensors")
    r = run(tmp_path / "m.safetensors", "--convert", tmp_path / "folder")
    assert r.returncode == 0, r.stderr
    assert "SD 2.x, predicts v_prediction" in r.stdout and "pads with id 0" in r.stdout
    n = sum(p.numel() for p in model.unet.parameters()) / 1e6
    assert f"{n:.1f} M params" in r.stdout.splitlines()[1]

    again = load(tmp_path / "folder")  # the converted diffusers folder holds the same model
    assert again.prediction_type == "v_prediction"
    assert all(torch.equal(a, b) for a, b in zip(again.unet.state_dict().values(), model.unet.state_dict().values()))

    r = run(tmp_path / "folder", "--prediction-type", "epsilon")
    assert r.returncode == 0 and "predicts epsilon" in r.stdout
    assert "identifier" not in r.stdout  # no train.py run recorded one


def test_info_names_the_identifier_an_exported_model_records(tmp_path, capsys):
    run = json.dumps({"identifier": "zwx", "class": "cup", "method": "full"})
    save_single_file(tiny_model(), tmp_path / "model.safetensors", metadata={"minidb_run": run})
    assert main([str(tmp_path / "model.safetensors")]) == 0
    assert "  identifier     zwx: the subject train.py trained; sample.py reads [V] as it" in capsys.readouterr().out
    # a --concepts run's: sample.py reads [V] as none of them (it warns), so info does not say it would
    subjects = [{"identifier": "zwx", "class": "cup"}, {"identifier": "qpv", "class": "dog"}]
    run = json.dumps({"identifier": "zwx", "class": "cup", "method": "full", "subjects": subjects})
    save_single_file(tiny_model(), tmp_path / "two.safetensors", metadata={"minidb_run": run})
    assert main([str(tmp_path / "two.safetensors")]) == 0
    assert ("  identifier     zwx, qpv: the subjects train.py trained, each by its own word (sample.py reads [V] "
            "as none of them)\n") in capsys.readouterr().out


def test_a_converted_model_keeps_the_identifier_it_was_trained_with(tmp_path, capsys):
    """--convert dropped train.py's record, so a trained model, converted, read as a base: info named no
    identifier, sample.py read [V] as nothing, and the toy lab's train-base would write over it. Now the
    single file and the folder keep it, and a model merged with one recorded LoRA takes the LoRA's."""
    from minidb.lora import LoRA, save_kohya
    from minidb.runs import recorded_identifiers
    from minidb.toy.arguments import is_toy_base
    run = json.dumps({"identifier": "zwx", "class": "cup", "method": "full"})
    save_single_file(tiny_model(), tmp_path / "model.safetensors", metadata={"minidb_run": run})
    for out in ("one.safetensors", "folder"):
        assert main([str(tmp_path / "model.safetensors"), "--convert", str(tmp_path / out)]) == 0
        assert recorded_identifiers([tmp_path / out]) == ["zwx"]
    capsys.readouterr()
    assert main([str(tmp_path / "one.safetensors")]) == 0
    assert "identifier     zwx: the subject train.py trained" in capsys.readouterr().out
    from minidb.toy.lab import identifier_of  # the lab's evaluate reads it too, outside any run folder
    assert identifier_of(tmp_path / "one.safetensors") == "zwx" != identifier_of(tmp_path / "model-missing")
    save_single_file(tiny_model(), tmp_path / "base.safetensors")
    about = {"minidb": json.dumps({"identifier": "qpv", "class": "dog", "method": "lora"})}
    save_kohya(LoRA(tiny_model(), rank=2), tmp_path / "lora.safetensors", metadata=about)
    save_kohya(LoRA(tiny_model(), rank=2), tmp_path / "other.safetensors")  # no record
    cases = {"merged.safetensors": ["lora"], "two.safetensors": ["lora", "other"], "base-copy.safetensors": []}
    for out, loras in cases.items():
        merges = [a for name in loras for a in ("--merge-lora", str(tmp_path / f"{name}.safetensors"))]
        assert main([str(tmp_path / "base.safetensors"), *merges, "--convert", str(tmp_path / out)]) == 0
    assert recorded_identifiers([tmp_path / "merged.safetensors"]) == ["qpv"]
    assert recorded_identifiers([tmp_path / "two.safetensors"]) == []  # two LoRAs: whose word, no record says
    assert recorded_identifiers([tmp_path / "base-copy.safetensors"]) == []
    assert main([str(tmp_path / "model.safetensors"), "--merge-lora", str(tmp_path / "lora.safetensors"),
                 "--convert", str(tmp_path / "trained-merged.safetensors")]) == 0
    assert recorded_identifiers([tmp_path / "trained-merged.safetensors"]) == ["zwx"]  # the model's own first
    from minidb.fetch import TOY_MODEL  # the toy lab's train-base replaces a toy base model, not a trained one
    for name, record in (("toy-base", {}), ("toy-trained", {"minidb_run": run})):
        save_single_file(load(TOY_MODEL), tmp_path / f"{name}.safetensors", metadata=record)
        assert main([str(tmp_path / f"{name}.safetensors"), "--convert", str(tmp_path / f"{name}-2.safetensors")]) == 0
        assert is_toy_base(tmp_path / f"{name}-2.safetensors") == (not record)


def test_info_says_a_new_word_needs_its_embedding(tmp_path, capsys):
    """A --new-token run's model records its identifier as a new word, which it knows only with the run's
    embedding file; a diffusers folder records it in its UNet file's header."""
    run = json.dumps({"identifier": "zwx", "class": "cup", "method": "full", "new_word": True})
    save_diffusers(tiny_model(), tmp_path / "model", metadata={"minidb_run": run})
    assert main([str(tmp_path / "model")]) == 0
    assert ("  identifier     zwx: the subject train.py trained; sample.py reads [V] as it, but zwx is a new word "
            "that needs its embedding: add --embedding the run's zwx.safetensors\n") in capsys.readouterr().out
    save_file({"emb_params": torch.ones(1, 32)}, tmp_path / "zwx.safetensors")  # beside it, as in the run folder
    assert main([str(tmp_path / "model")]) == 0
    assert f"add --embedding {tmp_path / 'zwx.safetensors'}\n" in capsys.readouterr().out


def test_bad_model_is_one_line_without_traceback(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"not a model")
    r = run(tmp_path / "m.safetensors")
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ") and "Traceback" not in r.stderr


# ---- --convert never destroys what is there unless asked (issue 11) ----

@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "m.safetensors"
    save_single_file(tiny_model(), path)
    return path


def error_line(capsys):
    """The one line main() printed on failure, checked to be one sentence."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and err.endswith(".\n"), err
    return err


def test_convert_refuses_an_existing_target(tiny_file, tmp_path, capsys):
    trained = tmp_path / "trained"
    (trained / "unet").mkdir(parents=True)
    (trained / "unet" / "mine.txt").write_text("a week of training")
    (trained / "model_index.json").write_text("{}")
    single = tmp_path / "trained.safetensors"
    single.write_bytes(tiny_file.read_bytes())
    for target in (trained, single):
        assert main([str(tiny_file), "--convert", str(target)]) == 2
        assert "already exists; pass --overwrite to replace it" in error_line(capsys)
    assert (trained / "unet" / "mine.txt").read_text() == "a week of training"
    assert single.read_bytes() == tiny_file.read_bytes()

    (tmp_path / "empty").mkdir()  # an empty folder holds nothing to lose
    assert main([str(tiny_file), "--convert", str(tmp_path / "empty")]) == 0
    assert load(tmp_path / "empty").version == "SD 1.x"


def test_overwrite_replaces_the_target_whole(tiny_file, tmp_path, capsys):
    trained = tmp_path / "trained"
    (trained / "unet").mkdir(parents=True)
    (trained / "unet" / "mine.txt").write_text("old")
    (trained / "model_index.json").write_text("{}")
    single = tmp_path / "out.safetensors"
    save_single_file(tiny_model(), single, dtype=torch.float16)
    for target in (trained, single):
        assert main([str(tiny_file), "--convert", str(target), "--overwrite"]) == 0
        assert load(target).version == "SD 1.x"
    assert next(iter(load_file(single).values())).dtype == torch.float32  # the new one
    assert not (trained / "unet" / "mine.txt").exists()  # replaced, not merged into
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "trained"]  # no temporary debris

    # a folder is not replaced by a file, nor a file by a folder
    (tmp_path / "dir.safetensors").mkdir()
    (tmp_path / "dir.safetensors" / "x").write_text("x")
    assert main([str(tiny_file), "--convert", str(tmp_path / "dir.safetensors"), "--overwrite"]) == 2
    assert "is a folder and would be replaced by a .safetensors file" in error_line(capsys)
    (tmp_path / "plain").write_text("x")
    assert main([str(tiny_file), "--convert", str(tmp_path / "plain"), "--overwrite"]) == 2
    assert "is a file and would be replaced by a diffusers folder" in error_line(capsys)


def test_overwrite_refuses_a_folder_that_is_not_a_model(tiny_file, tmp_path, capsys):
    """As train.py's --overwrite, info's deletes a model only: a thesis in the folder was lost."""
    docs, model = tmp_path / "docs", tmp_path / "model"
    docs.mkdir()
    (docs / "thesis.pdf").write_text("my thesis")
    save_diffusers(tiny_model(), model)
    (model / "notes.txt").write_text("my notes")  # a model folder with the user's own file in it
    for target, held in ((docs, "thesis.pdf"), (model, "notes.txt")):
        for overwrite in ([], ["--overwrite"]):
            assert main([str(tiny_file), "--convert", str(target), *overwrite]) == 2
            assert f"--convert {target} holds files that are not a model ({held}); choose a new or empty folder." \
                in error_line(capsys)
    assert (docs / "thesis.pdf").read_text() == "my thesis" and (model / "notes.txt").read_text() == "my notes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "model"]


@pytest.mark.parametrize("target", [".", "/", "..", "sub/.."])
def test_convert_to_a_path_without_a_name_is_refused(tiny_file, tmp_path, capsys, monkeypatch, target):
    """`.` and `/` have no parent folder (StopIteration), and no name to swap a new folder in under."""
    monkeypatch.chdir(tmp_path)
    for overwrite in ([], ["--overwrite"]):
        assert main([str(tiny_file), "--convert", target, *overwrite]) == 2
        assert f"--convert {target} names no new folder or file; give it a name, such as --convert " \
            f"{Path(target) / 'model'}." in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [[""], [" "], ["M", "--convert", ""], ["M", "--merge-lora", "", "--convert", "x"]])
def test_empty_paths_are_refused_not_read_as_the_current_folder(tiny_file, tmp_path, capsys, monkeypatch, args):
    """An unset shell variable (--convert "$OUT") converted nothing and said nothing, with exit status 0."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main([str(tiny_file) if a == "M" else a for a in args])
    assert e.value.code == 2 and "must not be empty; give a path" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_convert_to_a_pickle_name_is_refused_not_made_a_folder(tiny_file, tmp_path, capsys, suffix):
    """--convert model.ckpt wants one file; minidb writes no pickles, and it used to make a diffusers folder
    of that name. One sentence names the .safetensors path to use instead, and nothing is written."""
    target = tmp_path / f"model{suffix}"
    assert main([str(tiny_file), "--convert", str(target)]) == 2
    line = error_line(capsys)
    assert f"--convert {target} asks for a {suffix} file, which minidb does not write" in line
    assert f"name it {tmp_path / 'model.safetensors'}" in line
    assert list(tmp_path.iterdir()) == []


def test_convert_into_an_unwritable_place(tiny_file, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for target in ("a-file/out", "a-file/out.safetensors"):  # a folder cannot be made inside a file
        r = run(tiny_file, "--convert", tmp_path / target)
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: cannot write") and "Traceback" not in r.stderr


def test_unusable_metadata_is_an_error_not_a_description(tiny_file, tmp_path, capsys):
    with safe_open(str(tiny_file), "pt") as f:
        saved = json.loads(f.metadata()["minidb"])
    save_file(load_file(tiny_file), tmp_path / "m.safetensors",
              metadata={"minidb": json.dumps({**saved, "prediction_type": "banana"})})
    assert main([str(tmp_path / "m.safetensors")]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and err.startswith("error: ") and 'prediction_type "banana"' in err


def test_merge_lora_writes_the_base_plus_the_lora(tiny_file, tmp_path, capsys):
    from minidb.lora import LoRA, save_kohya
    from minidb.lora_files import merge_lora
    model = load(tiny_file)
    lora = LoRA(model, rank=2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_up" in name:
                p.normal_()
    save_kohya(lora, tmp_path / "l.safetensors", dtype=torch.float32)
    assert main([str(tiny_file), "--merge-lora", f"{tmp_path / 'l.safetensors'}:0.5",
                 "--convert", str(tmp_path / "merged.safetensors")]) == 0
    expected = load(tiny_file)
    merge_lora(expected, tmp_path / "l.safetensors", 0.5)
    merged = load(tmp_path / "merged.safetensors")
    a, b = merged.unet.state_dict(), expected.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in load(tiny_file).unet.state_dict().items())
    assert main([str(tiny_file), "--merge-lora", str(tmp_path / "l.safetensors")]) == 2
    assert "add --convert OUT" in capsys.readouterr().err
    # The LoRA given as the model: said first (it said to add --convert, and then that MODEL is a LoRA)
    assert main([str(tmp_path / "l.safetensors"), "--merge-lora", str(tmp_path / "l.safetensors")]) == 2
    assert f"{tmp_path / 'l.safetensors'} is a LoRA, not a full model" in capsys.readouterr().err
    save_file({"emb_params": torch.zeros(1, 32)}, tmp_path / "word.safetensors")  # an embedding, the same
    assert main([str(tmp_path / "word.safetensors"), "--merge-lora", str(tmp_path / "l.safetensors")]) == 2
    assert f"{tmp_path / 'word.safetensors'} is a textual-inversion embedding, not a full model" in capsys.readouterr().err
    assert main([str(tiny_file), "--overwrite"]) == 2  # it was taken, and described the model: nothing to overwrite
    assert capsys.readouterr().err == "error: --overwrite lets --convert replace the model at OUT; add --convert OUT, or " \
                                      "leave it out.\n"


def test_what_convert_writes_opens_in_diffusers(tmp_path):
    """The folder --convert writes, read by diffusers' from_pretrained, and a single file with a LoRA merged in,
    read by its from_single_file with that folder as the config (as a run's README says): the same outputs as
    minidb's model, and as minidb's own merge. An SD 2.x v-prediction model, whose config diffusers cannot guess."""
    from minidb.lora import LoRA, save_kohya
    from minidb.lora_files import merge_lora
    model = StableDiffusion(Tokenizer.for_version("SD 2.x"), randomize_(te.TextEncoder(TINY_TEXT["SD 2.x"])),
                            randomize_(va.AutoencoderKL(va.TINY), 1), randomize_(un.UNet(TINY_UNET["SD 2.x"]), 2),
                            "SD 2.x", "v_prediction")
    save_single_file(model, tmp_path / "m.safetensors")
    assert main([str(tmp_path / "m.safetensors"), "--convert", str(tmp_path / "folder")]) == 0
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "folder")
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert_same_outputs(model, pipe)

    lora = LoRA(model, rank=2, text_encoder=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_up" in name:
                p.normal_(generator=g)
    save_kohya(lora, tmp_path / "l.safetensors", dtype=torch.float32)
    assert main([str(tmp_path / "m.safetensors"), "--merge-lora", f"{tmp_path / 'l.safetensors'}:0.5",
                 "--convert", str(tmp_path / "merged.safetensors")]) == 0
    merged = diffusers.StableDiffusionPipeline.from_single_file(str(tmp_path / "merged.safetensors"),
                                                                config=str(tmp_path / "folder"))
    assert merged.scheduler.config.prediction_type == "v_prediction"
    expected = load(tmp_path / "m.safetensors")
    merge_lora(expected, tmp_path / "l.safetensors", 0.5)
    assert_same_outputs(expected, merged)
    for name in ("unet", "text_encoder"):  # the LoRA is in both
        before, after = getattr(pipe, name).state_dict(), getattr(merged, name).state_dict()
        assert any(not torch.equal(after[k], v) for k, v in before.items()), name


# ---- a LoRA or an embedding: what it holds and how to draw with it ----

def described(capsys, path, *args):
    """main()'s exit status and its lines {heading: text} (the first line under 'kind')."""
    status = main([str(path), *map(str, args)])
    out = capsys.readouterr().out.splitlines()
    lines = {"kind": out[0].split(": ", 1)[1]} if out else {}
    lines.update(line.strip().split(None, 1) for line in out[1:])
    return status, lines


def test_info_describes_a_lora_minidb_trained(tmp_path, capsys):
    from minidb.lora import LoRA, save_kohya
    lora = LoRA(tiny_model(), rank=4, alpha=2, text_encoder=True)
    about = {"ss_steps": "400", "ss_sd_model_name": "base.safetensors",
             "minidb": json.dumps({"identifier": "zwx", "class": "cup", "method": "lora"})}
    save_kohya(lora, tmp_path / "lora.safetensors", metadata=about)
    status, lines = described(capsys, tmp_path / "lora.safetensors")
    assert status == 0
    assert lines["kind"] == "a LoRA for SD 1.x, kohya's (AUTOMATIC1111, ComfyUI) layout, float16"
    names = [name for name, _ in lora.named_children()]  # kohya's names: lora_unet_..., lora_te_...
    unet, text = sum(n.startswith("lora_unet_") for n in names), sum(n.startswith("lora_te_") for n in names)
    assert unet and text and unet + text == len(names)
    assert lines["layers"] == f"{unet} UNet, {text} text encoder"
    assert lines["rank"] == f"4; alpha 2, scale {2 / 4:g}"
    assert lines["trained"] == "by minidb (lora, 400 steps on base.safetensors): identifier zwx, class cup"
    assert lines["use"] == (f'python sample.py --model <an SD 1.x model> --lora {tmp_path / "lora.safetensors"} '
                            '--prompt "a photo of zwx cup"')
    # a --concepts run's LoRA: every subject is named (only the first was)
    subjects = [{"identifier": "zwx", "class": "cup"}, {"identifier": "nrf", "class": "dog"}]
    save_kohya(lora, tmp_path / "two.safetensors", metadata={**about, "minidb": json.dumps(
        {"identifier": "zwx", "class": "cup", "method": "lora", "subjects": subjects})})
    status, lines = described(capsys, tmp_path / "two.safetensors")
    assert status == 0
    assert lines["trained"] == "by minidb (lora, 400 steps on base.safetensors): identifiers zwx (cup), nrf (dog)"


def test_info_shows_a_small_alpha_as_it_is(tmp_path, capsys):
    """An alpha of 1e-05 showed as "alpha 0, scale 0" (rounded to 4 decimals)."""
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{layer}.lora_down.weight": torch.ones(4, 32, 1, 1), f"{layer}.lora_up.weight": torch.ones(32, 4, 1, 1),
               f"{layer}.alpha": torch.tensor(1e-5)}, tmp_path / "small.safetensors")
    status, lines = described(capsys, tmp_path / "small.safetensors")
    assert status == 0 and lines["rank"] == "4; alpha 1e-05, scale 2.5e-06", lines["rank"]


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_info_describes_an_fp8_lora(tmp_path, capsys, dtype):
    """torch has no isfinite for float8_e4m3fn: checking such a file was a traceback."""
    layer = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors = {f"{layer}.lora_down.weight": torch.ones(2, 32, 1, 1), f"{layer}.lora_up.weight": torch.ones(32, 2, 1, 1),
               f"{layer}.alpha": torch.tensor(1.0)}
    save_file({k: t.to(getattr(torch, dtype)) for k, t in tensors.items()}, tmp_path / "f8.safetensors")
    status, lines = described(capsys, tmp_path / "f8.safetensors")
    assert status == 0 and lines["kind"].endswith(f"layout, {dtype}") and lines["rank"] == "2; alpha 1, scale 0.5"


def test_info_describes_a_peft_lora_and_its_metadata_alpha(tmp_path, capsys):
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.1.attn2.to_k"  # depth 2: SDXL's shapes
    tensors = {f"{layer}.lora_A.weight": torch.ones(8, 2048), f"{layer}.lora_B.weight": torch.ones(640, 8),
               "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.ones(8, 1280),
               "text_encoder_2.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.ones(5120, 8)}
    save_file(tensors, tmp_path / "p.safetensors",
              metadata={"lora_adapter_metadata": json.dumps({"unet.r": 8, "unet.lora_alpha": 4})})
    status, lines = described(capsys, tmp_path / "p.safetensors")
    assert status == 0
    assert lines["kind"] == "a LoRA for SDXL, diffusers' / PEFT's layout, float32"
    assert lines["layers"] == "1 UNet, 1 second text encoder"
    assert lines["rank"] == f"8; alpha 4 (lora_adapter_metadata), scale {4 / 8:g}"
    assert "trained" not in lines and lines["use"].endswith('--prompt "..."')


@pytest.mark.parametrize("tensors,family,numbers", [
    ({"emb_params": torch.ones(3, 768)}, "SD 1.x", "3 vectors of 768 numbers"),
    ({"emb_params": torch.ones(1, 1024)}, "SD 2.x", "1 vector of 1024 numbers"),
    ({"clip_l": torch.ones(2, 768), "clip_g": torch.ones(2, 1280)}, "SDXL", "2 vectors of 768 + 1280 numbers"),
])
def test_info_describes_an_embedding(tmp_path, capsys, tensors, family, numbers):
    save_file(tensors, tmp_path / "Zwx.safetensors")
    status, lines = described(capsys, tmp_path / "Zwx.safetensors")
    assert status == 0
    assert lines["kind"].startswith(f"a textual-inversion embedding for {family}, AUTOMATIC1111's layout (")
    assert lines["word"] == f"zwx (the file's name), {numbers}"  # the word is the file's name, lower-cased
    assert lines["use"] == (f"python sample.py --model <an {family} model> --embedding {tmp_path / 'Zwx.safetensors'} "
                            '--prompt "a photo of zwx"')


def test_info_refuses_other_adapter_kinds_and_conversions_of_add_ons(tmp_path, capsys):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.ones(2, 2)}, tmp_path / "h.safetensors")
    assert main([str(tmp_path / "h.safetensors")]) == 2
    assert "is a LoHa adapter" in error_line(capsys)
    save_file({"emb_params": torch.ones(1, 768)}, tmp_path / "w.safetensors")
    assert main([str(tmp_path / "w.safetensors"), "--convert", str(tmp_path / "out.safetensors")]) == 2
    assert "draw with a base model and this file: sample.py --embedding" in error_line(capsys)
    assert not (tmp_path / "out.safetensors").exists()
    for addon in ("w", "l"):  # a prediction type belongs to a model: on an add-on it was taken, then ignored
        if addon == "l":
            save_file({f"{LAYER}.lora_down.weight": torch.ones(2, 32, 1, 1),
                       f"{LAYER}.lora_up.weight": torch.ones(32, 2, 1, 1)}, tmp_path / "l.safetensors")
        assert main([str(tmp_path / f"{addon}.safetensors"), "--prediction-type", "epsilon"]) == 2
        assert "is a LoRA or an embedding, which has none (the model it is drawn with decides); leave it out." \
            in error_line(capsys)
        assert main([str(tmp_path / f"{addon}.safetensors")]) == 0  # described, without the flag


# ---- broken add-ons, odd --convert targets and merges that would write NaN ----

LAYER = "lora_unet_down_blocks_0_attentions_0_proj_in"  # a 1x1 conv of 32 channels in the tiny model


@pytest.mark.parametrize("tensors,words", [
    ({f"{LAYER}.lora_down.weight": torch.zeros(0, 32, 1, 1), f"{LAYER}.lora_up.weight": torch.zeros(32, 0, 1, 1)},
     "of shape (32, 0, 1, 1), which do not fit each other."),  # rank 0
    ({f"{LAYER}.lora_down.weight": torch.tensor(1.0), f"{LAYER}.lora_up.weight": torch.zeros(32, 1, 1, 1)},
     f"has {LAYER}.lora_down.weight of shape () and"),
    ({f"{LAYER}.lora_down.weight": torch.zeros(2, 32, 1, 1), f"{LAYER}.lora_up.weight": torch.zeros(32, 2, 1, 1),
      f"{LAYER}.alpha": torch.zeros(0)}, f"has {LAYER}.alpha of shape (0,) where one number belongs."),
    ({f"{LAYER}.lora_down.weight": torch.zeros(2, 32, 1, 1), f"{LAYER}.lora_up.weight": torch.zeros(32, 2, 1, 1),
      f"{LAYER}.alpha": torch.tensor(float("nan"))}, f"has {LAYER}.alpha holding NaN or infinite numbers"),
    ({"emb_params": torch.zeros(0, 32)}, "holds no vectors (emb_params has the shape (0, 32))"),
    ({"emb_params": torch.zeros(0)}, "holds no vectors (emb_params has the shape (0,))"),
    ({"emb_params": torch.tensor(1.0)}, "is not a textual-inversion embedding"),
    ({f"{LAYER}.lora_down.weight": torch.ones(2, 32, 1, 1, dtype=torch.int8),
      f"{LAYER}.lora_up.weight": torch.ones(32, 2, 1, 1, dtype=torch.int8)},
     f"has {LAYER}.lora_down.weight holding int8 values where a LoRA holds floating-point numbers"),
])
def test_info_refuses_add_ons_that_sample_py_refuses(tmp_path, capsys, tensors, words):
    """A LoRA with rank 0, a 0-d down or an empty alpha, or an embedding of no vectors: the same sentence
    reading it would give, not a traceback and not a description."""
    save_file(tensors, tmp_path / "addon.safetensors")
    assert main([str(tmp_path / "addon.safetensors")]) == 2
    assert words in error_line(capsys) and capsys.readouterr().out == ""


def test_convert_to_an_upper_case_safetensors_name_writes_one_file(tiny_file, tmp_path):
    assert main([str(tiny_file), "--convert", str(tmp_path / "UP.SAFETENSORS")]) == 0
    assert (tmp_path / "UP.SAFETENSORS").is_file()


def test_convert_under_a_file_says_the_parent_is_a_file(tiny_file, tmp_path, capsys):
    (tmp_path / "a-file").write_text("x")
    assert main([str(tiny_file), "--convert", str(tmp_path / "a-file" / "x.safetensors")]) == 2
    assert f"{tmp_path / 'a-file'} is a file, not a folder; choose another path." in error_line(capsys)
    assert (tmp_path / "a-file").read_text() == "x"


def test_merge_that_overflows_writes_no_model(tiny_file, tmp_path, capsys):
    """A finite but absurd alpha (3e38) makes the merged weights infinite: refused, nothing written."""
    from minidb.lora import LoRA, save_kohya
    lora = LoRA(load(tiny_file), rank=2)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_up" in name:
                p.fill_(100.0)
    save_kohya(lora, tmp_path / "l.safetensors", dtype=torch.float32)
    tensors = load_file(tmp_path / "l.safetensors")
    save_file({k: torch.tensor(3e38) if k.endswith(".alpha") else t for k, t in tensors.items()}, tmp_path / "l.safetensors")
    assert main([str(tiny_file), "--merge-lora", str(tmp_path / "l.safetensors"),
                 "--convert", str(tmp_path / "merged.safetensors")]) == 2
    assert "gives weights that are not finite numbers in float32" in error_line(capsys)
    assert not (tmp_path / "merged.safetensors").exists()


def test_overwrite_replaces_only_a_model_file(tiny_file, tmp_path, capsys):
    """--convert X.safetensors --overwrite replaced any file: a LoRA, an embedding, the LoRA being merged."""
    lora, word, other = tmp_path / "lora.safetensors", tmp_path / "sks.safetensors", tmp_path / "notes.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)}, lora)
    save_file({"emb_params": torch.ones(1, 32)}, word)
    other.write_text("my notes")
    before = {p: p.read_bytes() for p in (lora, word, other)}
    for target in (word, other):
        for overwrite in ([], ["--overwrite"]):
            assert main([str(tiny_file), "--convert", str(target), *overwrite]) == 2
            assert f"--convert {target} is a file that is not a model (a LoRA, an embedding or another file), " \
                "which --overwrite does not replace" in error_line(capsys)
    assert main([str(tiny_file), "--merge-lora", str(lora), "--convert", str(lora), "--overwrite"]) == 2
    assert f"--convert {lora} is what it converts from (the model or a LoRA)" in error_line(capsys)
    assert {p: p.read_bytes() for p in (lora, word, other)} == before


def test_a_missing_or_repeated_lora_is_refused_before_the_model_loads(tiny_file, tmp_path, capsys, monkeypatch):
    """A missing --merge-lora file was found only after the model loaded; one given twice was merged twice."""
    import minidb.load
    monkeypatch.setattr(minidb.load, "from_original", lambda *a, **k: pytest.fail("the model was loaded"))
    lora = tmp_path / "lora.safetensors"
    out = tmp_path / "merged.safetensors"
    assert main([str(tiny_file), "--merge-lora", str(lora), "--convert", str(out)]) == 2
    assert error_line(capsys) == f"error: --merge-lora {lora} does not exist; check the path.\n"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 4), "lora_unet_x.lora_up.weight": torch.ones(4, 2)}, lora)
    assert main([str(tiny_file), "--merge-lora", f"{lora}:0.5", "--merge-lora", str(lora), "--convert", str(out)]) == 2
    assert f"error: --merge-lora gives {lora} twice" in error_line(capsys)
    assert not out.exists()


@pytest.mark.skipif(not Path("/dev/null").exists(), reason="a device file")
def test_a_device_as_the_model_is_named_as_one(capsys):
    """It was said not to exist."""
    assert main(["/dev/null"]) == 2
    assert error_line(capsys) == "error: /dev/null is not a regular file (a device or a pipe); check the path.\n"


def test_a_model_with_nan_weights_is_not_converted(tiny_file, tmp_path, capsys):
    """It was written, and with --overwrite it replaced a good model."""
    tensors = load_file(tiny_file)
    key = next(k for k in tensors if k.startswith("first_stage_model.") and k.endswith(".weight"))
    tensors[key] = torch.full_like(tensors[key], float("inf"))
    with safe_open(str(tiny_file), "pt") as f:
        save_file(tensors, tmp_path / "broken.safetensors", metadata=f.metadata())
    good = tmp_path / "good.safetensors"
    good.write_bytes(tiny_file.read_bytes())
    for target, overwrite in ((tmp_path / "new.safetensors", []), (tmp_path / "new", []), (good, ["--overwrite"])):
        assert main([str(tmp_path / "broken.safetensors"), "--convert", str(target), *overwrite]) == 2
        assert f"holds NaN or infinite weights (first in vae.{key.removeprefix('first_stage_model.')}), so it was " \
            "not converted" in error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors", "good.safetensors"]
    assert good.read_bytes() == tiny_file.read_bytes()


@pytest.mark.parametrize("name", ["model.sft", "model.safetensor", "model.gguf", "model.json"])
def test_convert_to_another_files_name_is_refused_not_made_a_folder(tiny_file, tmp_path, capsys, name):
    assert main([str(tiny_file), "--convert", str(tmp_path / name)]) == 2
    assert f"names a {Path(name).suffix} file, but --convert writes a .safetensors file or a diffusers folder; name " \
        f"it {tmp_path / 'model.safetensors'}" in error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_convert_through_a_link_names_it(tiny_file, tmp_path, capsys):
    """A link to a model folder was replaced by a folder, leaving the link's copy behind; a link to nothing said
    '(Not a directory)' and left a hidden .NAME.tmp model."""
    save_diffusers(tiny_model(), tmp_path / "real")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "gone").symlink_to(tmp_path / "nothing")
    for target, says in ((tmp_path / "link", f"a link to {tmp_path / 'real'}; give the real path"),
                         (tmp_path / "gone" / "model", f"a link to {tmp_path / 'nothing'}, which does not exist")):
        assert main([str(tiny_file), "--convert", str(target), "--overwrite"]) == 2
        assert f"--convert {target} goes through " in (line := error_line(capsys)) and says in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gone", "link", "real"]


def test_a_name_too_long_for_its_temporary_name_is_refused_before_loading(tiny_file, tmp_path, capsys):
    """250 bytes is a legal name, but the file is first written as .NAME.XXXXXXXX.tmp: it failed after the load."""
    target = tmp_path / ("m" * 238 + ".safetensors")
    assert main([str(tiny_file), "--convert", str(target)]) == 2
    assert "is a name of 250 bytes; it is written under a longer temporary name first, so it can be at most 241" \
        in error_line(capsys)
    assert main([str(tiny_file), "--convert", str(tmp_path / ("m" * 229 + ".safetensors"))]) == 0  # 241 bytes


def test_a_crash_between_the_renames_is_named_not_deleted(tiny_file, tmp_path, capsys):
    """A crash between replace_folder's two renames leaves the old model only as .NAME.old; the next convert
    deleted it."""
    save_diffusers(tiny_model(), tmp_path / ".model.old")
    assert main([str(tiny_file), "--convert", str(tmp_path / "model"), "--overwrite"]) == 2
    assert f"a crash while replacing {tmp_path / 'model'} left the model it held as {tmp_path / '.model.old'}; " \
        "move that back" in error_line(capsys)
    assert load(tmp_path / ".model.old").version == "SD 1.x"


@pytest.mark.parametrize("entry", ["minidb", "lora_adapter_metadata"])
def test_metadata_nested_too_deeply_is_damage_not_a_traceback(tiny_file, tmp_path, capsys, entry):
    """json raised RecursionError on '[' * 100000 in a file's metadata: a model's, a LoRA's."""
    deep = "[" * 100000 + "]" * 100000
    if entry == "minidb":
        save_file(load_file(tiny_file), tmp_path / "m.safetensors", metadata={"minidb": deep})
        assert main([str(tmp_path / "m.safetensors")]) == 2
        assert "carries minidb metadata that this minidb cannot use (it is not JSON)" in error_line(capsys)
    else:
        save_file({"unet.x.lora_A.weight": torch.ones(2, 4), "unet.x.lora_B.weight": torch.ones(4, 2)},
                  tmp_path / "l.safetensors", metadata={"lora_adapter_metadata": deep})
        assert main([str(tmp_path / "l.safetensors")]) == 2
        assert "has lora_adapter_metadata that is not a JSON object of LoRA settings" in error_line(capsys)



SLOW_WRITER = """import sys, time
from pathlib import Path
from minidb.writes import replace_folder, writing_into
def write(tmp):
    tmp.mkdir()
    (tmp / "a.txt").write_text("first")
    Path(sys.argv[2]).touch()  # writing has begun
    time.sleep(2)
    (tmp / "b.txt").write_text("first")
with writing_into(Path(sys.argv[1]).parent):  # as info --convert writes
    replace_folder(Path(sys.argv[1]), write)
"""


def test_two_converts_to_one_folder_take_turns(tiny_file, tmp_path, capfd):
    """Two converts to one folder: the second deleted the first's .NAME.tmp as a leftover while it was being
    written, and the first failed (or swapped in what was left of it). Now the second waits, then finds the
    folder written and refuses it as it refuses any (the slow writer's holds no model: "not a model")."""
    (tmp_path / "slow.py").write_text(SLOW_WRITER)
    target, begun = tmp_path / "model", tmp_path / "begun"
    root = Path(__file__).parents[1]
    first = subprocess.Popen([sys.executable, tmp_path / "slow.py", target, begun], cwd=root, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(root)}, text=True)
    try:
        while not begun.exists() and first.poll() is None:
            time.sleep(0.01)
        assert main([str(tiny_file), "--convert", str(target)]) == 2
    finally:
        _, errors = first.communicate(timeout=60)
    assert first.returncode == 0, errors
    err = capfd.readouterr().err
    assert "waiting for another process that is writing into" in err
    assert f"--convert {target} holds files that are not a model (a.txt, b.txt)" in err  # checked after the wait
    assert sorted((p.name, p.read_text()) for p in target.iterdir()) == [("a.txt", "first"), ("b.txt", "first")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["begun", "model", "slow.py"]  # no lock file, no leftovers


def test_a_file_system_without_folder_locks_writes_unguarded(tmp_path, monkeypatch, capfd):
    """NFS may refuse flock on a folder (ENOLCK), at the first try or when waiting: the write goes on unguarded
    rather than failing."""
    fcntl = pytest.importorskip("fcntl")
    from minidb.writes import writing_into
    tries = []

    def refuse(fd, operation):
        tries.append(operation)
        raise BlockingIOError() if operation & fcntl.LOCK_NB else OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)
    with writing_into(tmp_path):
        (tmp_path / "written").touch()
    assert (tmp_path / "written").exists() and tries == [fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_EX]

    def no_locks(fd, operation):
        raise OSError(37, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with writing_into(tmp_path):
        (tmp_path / "again").touch()
    assert (tmp_path / "again").exists()
