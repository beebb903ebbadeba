"""Bad files get one clear sentence, never a traceback from deep inside torch, and never run code."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidb import files, writes
from minidb.files import ModelFileError
from minidb.load import load
from minidb.save import save_diffusers, save_single_file
from conftest import tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD 1.x-style model saved as a single file; returns (model, its tensors, metadata)."""
    model = tiny_model()
    path = tmp_path_factory.mktemp("tiny") / "model.safetensors"
    save_single_file(model, path)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return model, load_file(path), metadata


def one_sentence(error):
    message = str(error.value)
    assert "\n" not in message and message.endswith("."), message
    e = error.value
    assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__), "chained traceback noise"
    return message


def test_missing_path(tmp_path):
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "nope.safetensors")
    assert "No model at" in one_sentence(e)


def test_folder_that_is_not_a_diffusers_model(tmp_path):
    (tmp_path / "photos").mkdir()
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "photos")
    assert "is not a diffusers model folder" in one_sentence(e)


@pytest.mark.parametrize("made", ["model", "lora", "word", "nothing"])
def test_a_run_folder_given_as_a_model_names_what_to_load(tiny, tmp_path, made):
    """`sample.py --model runs/latest` is a natural slip: the sentence names the file the run made and
    how to use it, and the model it names loads."""
    run = tmp_path / "dreambooth-1"
    run.mkdir()
    (run / "settings.json").write_text(json.dumps({"model": "weights/base.safetensors"}))
    (run / "checkpoints").mkdir()
    if made == "model":
        save_single_file(tiny[0], run / "model.safetensors")
    elif made in ("lora", "word"):
        (run / ("lora.safetensors" if made == "lora" else "sks.safetensors")).write_bytes(b"")
    with pytest.raises(ModelFileError) as e:
        load(run)
    message = one_sentence(e)
    assert message.startswith(f"{run} is a train.py run folder, not a model: ")
    if made == "model":
        assert f"its personalized model is {run / 'model.safetensors'}" in message
        assert load(run / "model.safetensors").version == "SD 1.x"  # what it names loads
    elif made == "lora":
        assert f"base model (weights/base.safetensors) with --lora {run / 'lora.safetensors'}" in message
    elif made == "word":
        assert f"base model (weights/base.safetensors) with --embedding {run / 'sks.safetensors'}" in message
    else:
        assert "exported nothing yet" in message


def test_a_checkpoint_given_as_a_model_names_what_to_load(tiny, tmp_path):
    """A checkpoint's unet.safetensors or state.pt was "not a Stable Diffusion checkpoint ...; minidb supports SD
    1.x, 2.x and SDXL text-to-image models only, not this kind yet", as if it were another tool's."""
    run = tmp_path / "dreambooth-1"
    ckpt = run / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    (run / "settings.json").write_text(json.dumps({"model": "weights/base.safetensors"}))
    save_single_file(tiny[0], run / "model.safetensors")
    save_file({k: v.contiguous() for k, v in tiny[0].unet.state_dict().items()}, ckpt / "unet.safetensors")
    torch.save({"step": 2, "optimizer": {}}, ckpt / "state.pt")
    for given, part in ((ckpt / "unet.safetensors", "part of "), (ckpt / "state.pt", "part of "), (ckpt, "")):
        with pytest.raises(ModelFileError) as e:
            load(given)
        assert one_sentence(e) == (f"{given} is {part}the checkpoint of step 2 of the train.py run in {run}, which "
                                   "train.py --resume continues, not a model: its personalized model is "
                                   f"{run / 'model.safetensors'}, so load that.")
    with pytest.raises(ModelFileError) as e:  # the folder of them was "not a diffusers model folder"
        load(run / "checkpoints")
    assert one_sentence(e) == (f"{run / 'checkpoints'} holds the checkpoints of the train.py run in {run}, not a "
                               f"model: its personalized model is {run / 'model.safetensors'}, so load that.")


def test_diffusers_folder_without_weights(tiny, tmp_path):
    save_diffusers(tiny[0], tmp_path / "m")
    os.remove(tmp_path / "m" / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m")
    assert "has no weights file" in one_sentence(e)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_broken_safetensors(tiny, tmp_path, damage):
    good = tmp_path / "good.safetensors"
    save_file(tiny[1], good, metadata=tiny[2])
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(5000), "empty": b""}[damage])
    with pytest.raises(ModelFileError) as e:
        load(bad)
    assert "not a readable safetensors file" in one_sentence(e)


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy"])
def test_truncated_ckpt(tiny, tmp_path, zipped):
    torch.save({"state_dict": tiny[1]}, tmp_path / "m.ckpt", _use_new_zipfile_serialization=zipped)
    data = (tmp_path / "m.ckpt").read_bytes()
    (tmp_path / "m.ckpt").write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m.ckpt")
    # our own sentence, not torch's paragraph cut off mid-sentence ("... This is an internal miniz error. If ...")
    assert one_sentence(e) == (f"{tmp_path / 'm.ckpt'} is not a complete PyTorch checkpoint; it may be truncated "
                               "or corrupt, so download or export it again.")


class Payload:
    """Unpickling this would create a file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_ckpt_with_pickled_code_is_refused_and_never_run(tiny, tmp_path):
    marker = str(tmp_path / "pwned")
    torch.save({"state_dict": tiny[1], "x": Payload(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "evil.ckpt")
    message = one_sentence(e)
    assert "holds pickled Python objects besides tensors" in message and "mkdir" in message
    assert not os.path.exists(marker)
    # the same through pickle protocol 0 in a legacy (non-zip) file, and a plain pickle of protocol 4, of which
    # torch warned "please file an issue" beside the one sentence
    for name, protocol in (("old.ckpt", 2), ("plain.ckpt", 4)):
        with open(tmp_path / name, "wb") as f:
            pickle.dump({"state_dict": Payload(marker)}, f, protocol=protocol)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ModelFileError):
                load(tmp_path / name)
    assert not os.path.exists(marker)


def test_ckpt_that_is_not_a_dict(tmp_path):
    torch.save([torch.zeros(3)], tmp_path / "list.ckpt")
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "list.ckpt")
    assert "holds a list, not a dictionary of tensors" in one_sentence(e)


def with_unet_input(tensors, channels):
    out = dict(tensors)
    w = out["model.diffusion_model.input_blocks.0.0.weight"]
    out["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(w.shape[0], channels, *w.shape[2:])
    return out


@pytest.mark.parametrize("kind,make", [
    ("a partial SDXL checkpoint (it lacks the CLIP-L text encoder",  # more SDXL kinds: test_sdxl_files.py
     lambda t: {**t, "conditioner.embedders.1.model.ln_final.weight": torch.ones(4)}),
    ("an inpainting model", lambda t: with_unet_input(t, 9)),
    ("an InstructPix2Pix model", lambda t: with_unet_input(t, 8)),
    ("a standalone VAE", lambda t: {k.removeprefix("first_stage_model."): v for k, v in t.items() if k.startswith("first_stage_model.")}),
    ("a standalone VAE", lambda t: {k: v for k, v in t.items() if k.startswith("first_stage_model.")}),
    ("not a Stable Diffusion checkpoint", lambda t: {"weight": torch.ones(3)}),
    ("a UNet without a text encoder", lambda t: {k: v for k, v in t.items() if not k.startswith("cond_stage_model.")}),
])
def test_unsupported_kinds_are_named(tiny, tmp_path, kind, make):
    save_file(make(tiny[1]), tmp_path / "m.safetensors")
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m.safetensors")
    message = one_sentence(e)
    assert kind in message and "not this kind yet" in message


@pytest.mark.parametrize("metadata", [False, True], ids=["shapes", "minidb-metadata"])
def test_a_model_missing_its_unets_first_tensor_is_damaged_not_a_vae(tiny, tmp_path, metadata):
    """The kind of a file is read from the UNet's first conv; without it, the rest of the UNet still
    says this is a full model, now incomplete, and not a standalone VAE."""
    key = "model.diffusion_model.input_blocks.0.0.weight"
    path = tmp_path / "m.safetensors"
    save_file({k: v for k, v in tiny[1].items() if k != key}, path, metadata=tiny[2] if metadata else None)
    with pytest.raises(ModelFileError) as e:
        load(path)
    message = one_sentence(e)
    assert "VAE" not in message and "input_blocks.0.0.weight" in message
    if not metadata:  # a minidb file's configs come from its metadata, and the strict fill names the gap
        assert message == (f"{path} lacks the UNet tensor {key}, though it holds other UNet tensors, so it is "
                           "incomplete or damaged; download or export it again.")


@pytest.mark.parametrize("dtype,which", [(torch.int8, "model.diffusion_model."), (torch.int32, "model.diffusion_model.out.0.bias")])
def test_a_model_of_whole_numbers_is_damaged(tiny, tmp_path, dtype, which):
    """A UNet in int8 ended in a StopIteration traceback (no floating-point tensor to take the dtype from);
    one int32 bias loaded as whole numbers and drew another picture, without a word."""
    path = tmp_path / "m.safetensors"
    save_file({k: (v * 100).round().to(dtype) if k.startswith(which) else v for k, v in tiny[1].items()}, path, tiny[2])
    with pytest.raises(ModelFileError) as e:
        load(path)
    message = one_sentence(e)
    assert f"holds {str(dtype).removeprefix('torch.')} numbers, not floating-point ones" in message
    assert "UNet in" in message and "does not match its architecture" in message and "export it again" in message


@pytest.mark.parametrize("kind,tensors,use", [
    ("a LoRA", {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 4)}, "--lora"),
    ("a textual-inversion embedding", {"emb_params": torch.ones(2, 32)}, "--embedding"),
    ("a textual-inversion embedding", {"clip_l": torch.ones(1, 768), "clip_g": torch.ones(1, 1280)}, "--embedding"),
])
def test_an_add_on_given_as_a_model_says_how_to_use_it(tmp_path, kind, tensors, use):
    """A LoRA or an embedding is not refused as an unknown kind: minidb reads them, with a base model."""
    save_file(tensors, tmp_path / "addon.safetensors")
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "addon.safetensors")
    message = one_sentence(e)
    assert message.startswith(f"{tmp_path / 'addon.safetensors'} is {kind}, not a full model; draw with a base model "
                              f"and this file: sample.py {use} {tmp_path / 'addon.safetensors'}")
    assert "not this kind yet" not in message


def test_unexpected_tensors_are_named(tiny, tmp_path):
    tensors = {**tiny[1], "mystery.weight": torch.ones(2), "model.diffusion_model.extra.bias": torch.ones(2)}
    save_file(tensors, tmp_path / "m.safetensors", metadata=tiny[2])
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m.safetensors")
    assert "mystery.weight" in one_sentence(e)
    del tensors["mystery.weight"]
    save_file(tensors, tmp_path / "m.safetensors", metadata=tiny[2])
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m.safetensors")
    assert "1 unexpected tensors (extra.bias)" in one_sentence(e)


def test_missing_and_misshaped_tensors_are_named(tiny, tmp_path):
    tensors = dict(tiny[1])
    del tensors["model.diffusion_model.out.2.bias"]
    tensors["model.diffusion_model.time_embed.0.weight"] = torch.zeros(3, 3)
    save_file(tensors, tmp_path / "m.safetensors", metadata=tiny[2])
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m.safetensors")
    message = one_sentence(e)
    assert "1 missing tensors (out.2.bias)" in message
    assert "time_embed.0.weight is (3, 3), expected (128, 32)" in message


def test_failed_write_leaves_the_old_file_and_no_debris(tiny, tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_single_file(tiny[0], path)
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a save

    monkeypatch.setattr(writes, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_single_file(tiny[0], path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["model.safetensors"]


def test_diffusers_config_of_another_kind(tiny, tmp_path):
    save_diffusers(tiny[0], tmp_path / "m")
    path = tmp_path / "m" / "unet" / "config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "addition_embed_type": "text_time"}))  # SDXL's UNet has this
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m")
    assert "another kind of model" in one_sentence(e)
    del config["block_out_channels"]
    path.write_text(json.dumps(config))
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m")
    assert "lacks the entry 'block_out_channels'" in one_sentence(e)


# ---- config.json with valid JSON of the wrong shape (issue 11) ----

@pytest.fixture
def folder(tiny, tmp_path):
    save_diffusers(tiny[0], tmp_path / "m")
    return tmp_path / "m"


def edit_json(path, change):
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize("part,entries,words", [
    ("unet", {"block_out_channels": "abc"}, '"block_out_channels" is "abc" where a list of positive whole numbers'),
    ("unet", {"layers_per_block": None}, '"layers_per_block" is null where a positive whole number'),
    ("unet", {"cross_attention_dim": [32]}, '"cross_attention_dim" is [32] where a positive whole number'),
    ("unet", {"use_linear_projection": "yes"}, '"use_linear_projection" is "yes" where true or false'),
    ("unet", {"attention_head_dim": [2, "x"]}, '"attention_head_dim" is [2, "x"] where a positive whole number or'),
    ("unet", {"down_block_types": None}, '"down_block_types" is null where a list of names'),
    ("unet", {"block_out_channels": [32, 48]}, "are not all multiples of the first"),
    ("unet", {"block_out_channels": [48, 96, 96]}, "has an architecture minidb cannot build"),  # GroupNorm(32, 48)
    ("vae", {"block_out_channels": [32, "64"]}, '"block_out_channels" is [32, "64"]'),
    ("vae", {"scaling_factor": "0.18215"}, '"scaling_factor" is "0.18215" where a number'),
    ("text_encoder", {"hidden_size": 32.5}, '"hidden_size" is 32.5 where a positive whole number'),
    ("text_encoder", {"num_hidden_layers": True}, '"num_hidden_layers" is true where a positive whole number'),
    ("text_encoder", {"hidden_act": "banana"}, '"hidden_act" is "banana", but SD\'s text encoders use'),
    # it loaded, and the first prompt ended in an einops traceback
    ("text_encoder", {"num_attention_heads": 3}, "has an architecture minidb cannot build (width 32 does not split into 3"),
])
def test_diffusers_config_with_wrong_types(folder, part, entries, words):
    edit_json(folder / part / "config.json", lambda c: {**c, **entries})
    with pytest.raises(ModelFileError) as e:
        load(folder)
    message = one_sentence(e)
    # the file is named; a config that no model can be built from names the part in the folder
    where = (f"The {'UNet' if part == 'unet' else 'text encoder'} in {folder}" if "cannot build" in words
             else str(folder / part / "config.json"))
    assert words in message and where in message, message


@pytest.mark.parametrize("part", ["unet", "vae", "text_encoder"])
def test_diffusers_config_that_is_a_list(folder, part):
    edit_json(folder / part / "config.json", lambda c: [c])
    with pytest.raises(ModelFileError) as e:
        load(folder)
    assert f"{folder / part / 'config.json'} holds a JSON list where an object of settings belongs" in one_sentence(e)


@pytest.mark.parametrize("change,words", [
    (lambda c: {**c, "prediction_type": "banana"}, 'prediction_type is "banana", but minidb knows only epsilon and'),
    (lambda c: {**c, "prediction_type": "sample"}, 'prediction_type is "sample"'),  # diffusers' x0: not supported
    (lambda c: {**c, "prediction_type": None}, "prediction_type is null"),
    (lambda c: [c], "holds a JSON list where an object of settings belongs"),
])
def test_scheduler_config_with_unknown_prediction_type(folder, change, words):
    path = folder / "scheduler" / "scheduler_config.json"
    edit_json(path, change)
    with pytest.raises(ModelFileError) as e:
        load(folder)
    message = one_sentence(e)
    assert words in message and str(path) in message, message
    assert load(folder, prediction_type="epsilon").prediction_type == "epsilon"  # the user's word is enough


# ---- minidb's own metadata in a safetensors header, damaged or from elsewhere (issue 11) ----
# minidb refuses such a file rather than reading the architecture from the tensors: they do not
# record a minidb model's head count, training size or upcast switch (see minidb/detect.py).

def edited(m, part, **fields):
    return json.dumps({**m, part: {**m[part], **fields}})


@pytest.mark.parametrize("edit,words", [
    (lambda m: "{not json", "it is not JSON"),
    (lambda m: json.dumps([m]), "the metadata is a JSON list, not an object"),
    (lambda m: json.dumps({**m, "banana": 1}), "the metadata has unknown fields banana"),
    (lambda m: json.dumps({k: v for k, v in m.items() if k != "vae"}), "the metadata has no fields vae"),
    (lambda m: json.dumps({**m, "prediction_type": "banana"}), 'prediction_type "banana" is not one of'),
    (lambda m: json.dumps({**m, "version": "SD 3"}), 'version "SD 3" is not one of'),
    (lambda m: json.dumps({**m, "version": "SD 2.x"}), "it says SD 2.x, but the text encoder is SD 1.x's"),
    (lambda m: json.dumps({**m, "unet": [1]}), '"unet" is a JSON list, not an object'),
    (lambda m: edited(m, "unet", extra=1), '"unet" has unknown fields extra'),
    (lambda m: edited(m, "unet", num_heads="2"), 'unet.num_heads is "2", not a whole number'),
    (lambda m: edited(m, "unet", channel_mult=None), "unet.channel_mult is null, not a list of whole numbers"),
    (lambda m: edited(m, "unet", linear_proj=0), "unet.linear_proj is 0, not true or false"),
    (lambda m: edited(m, "vae", ch=-32), "vae.ch is -32, not a whole number"),
    # a size, channel, layer or head count of 0 (sample_size 0 failed only at the first convolution)
    (lambda m: edited(m, "unet", sample_size=0), "unet.sample_size is 0, but a size, channel, layer or head count"),
    (lambda m: edited(m, "unet", channel_mult=[1, 0]), "unet.channel_mult is [1, 0], but"),
    (lambda m: edited(m, "vae", z_channels=0), "vae.z_channels is 0, but"),
    (lambda m: edited(m, "text_encoder", heads=0), "text_encoder.heads is 0, but"),
    (lambda m: edited(m, "text_encoder", activation="banana"), 'text_encoder.activation is "banana", not one of'),
])
def test_unusable_minidb_metadata(tiny, tmp_path, edit, words):
    metadata = {**tiny[2], "minidb": edit(json.loads(tiny[2]["minidb"]))}
    save_file(tiny[1], tmp_path / "m.safetensors", metadata=metadata)
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m.safetensors")
    message = one_sentence(e)
    assert "carries minidb metadata that this minidb cannot use" in message and words in message, message


def test_metadata_that_builds_no_model(tiny, tmp_path):
    # Well-typed, but neither a head count nor a head width: no attention can be built.
    metadata = {**tiny[2], "minidb": edited(json.loads(tiny[2]["minidb"]), "unet", num_heads=0, head_dim=0)}
    save_file(tiny[1], tmp_path / "m.safetensors", metadata=metadata)
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "m.safetensors")
    assert "UNet in" in one_sentence(e) and "has an architecture minidb cannot build" in one_sentence(e)


def test_a_file_that_is_no_checkpoint_at_all(tmp_path):
    (tmp_path / "notes.ckpt").write_text("my prompts for tomorrow")
    with pytest.raises(ModelFileError) as e:
        load(tmp_path / "notes.ckpt")
    message = one_sentence(e)
    assert "is not a PyTorch checkpoint or safetensors file" in message and "pickled" not in message


@pytest.mark.parametrize("content", [b"hello\n", b"a", b"\x80\x02X\x02\x00\x00\x00\xff\xfe."],
                         ids=["key_error", "index_error", "unicode_error"])
def test_bytes_that_are_no_pickle_fail_in_other_ways(tmp_path, content):
    """Besides UnpicklingError, torch's weights-only unpickler fails on stray bytes with KeyError (b"hello":
    'h' looks up memo slot 101), IndexError (b"a" pops an empty stack) or UnicodeDecodeError; these used to
    escape as tracebacks."""
    (tmp_path / "x.pt").write_bytes(content)
    with pytest.raises(ModelFileError) as e:
        files.read_tensors(tmp_path / "x.pt")
    assert "is not a PyTorch checkpoint or safetensors file" in one_sentence(e)


def test_a_safetensors_file_under_another_name_is_named_so(tiny, tmp_path):
    """ComfyUI's .sft, or a download saved without its suffix, was called "not a PyTorch checkpoint or
    safetensors file", which it is."""
    save_single_file(tiny[0], tmp_path / "model.safetensors")
    for name in ("model.sft", "model"):
        shutil.copy(tmp_path / "model.safetensors", tmp_path / name)
        with pytest.raises(ModelFileError) as e:
            files.read_tensors(tmp_path / name)
        assert one_sentence(e) == (f"{tmp_path / name} is a safetensors file under another name; rename it to end in "
                                   ".safetensors, by which minidb tells the format.")


def test_cli_exits_2_on_bytes_that_are_no_pickle(tmp_path):
    (tmp_path / "x.pt").write_text("hello\n")
    done = subprocess.run([sys.executable, "-m", "minidb.info", str(tmp_path / "x.pt")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "is not a PyTorch checkpoint or safetensors file" in done.stderr


def test_upper_case_safetensors_suffix_is_read_as_safetensors(tiny, tmp_path):
    save_single_file(tiny[0], tmp_path / "M.SAFETENSORS")
    assert files.read_metadata(tmp_path / "M.SAFETENSORS")["minidb"] == tiny[2]["minidb"]
    assert load(tmp_path / "M.SAFETENSORS").unet.cfg == tiny[0].unet.cfg


def test_metadata_written_before_sdxl_fields_existed_still_loads(tiny, tmp_path):
    # weights/toy.safetensors is such a file: its UNet config has no transformer_depth, ... at all
    saved = json.loads(tiny[2]["minidb"])
    old = {k: v for k, v in saved["unet"].items() if k not in ("transformer_depth", "transformer_depth_middle",
                                                                  "adm_in_channels")}
    assert len(old) == len(saved["unet"]) - 3
    save_file(tiny[1], tmp_path / "m.safetensors", metadata={**tiny[2], "minidb": json.dumps({**saved, "unet": old})})
    assert load(tmp_path / "m.safetensors").unet.cfg == tiny[0].unet.cfg
