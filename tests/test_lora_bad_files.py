"""LoRA files that cannot be used, each refused in one sentence by what reads it (sample.py --lora, info
--merge-lora): another family's LoRA, names or shapes that fit no layer, other adapter kinds, damaged files,
weights that are not floating-point numbers, and alphas and numbers that are not finite. The model is
left as it was."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from minidb.files import ModelFileError
from minidb.load import load
from minidb.lora import save_kohya
from minidb.lora_files import merge_lora, read_lora
from minidb.save import save_single_file
from test_bad_input import one_sentence
from test_load_save import reference_pipeline
from test_lora import random_lora


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """A tiny SD 1.x model and, beside it, LoRA files and others to give it."""
    tmp = tmp_path_factory.mktemp("bad")
    for family in ("SD 1.x", "SD 2.x"):
        reference_pipeline(family, tmp).save_pretrained(tmp / family)
    model = load(tmp / "SD 1.x")
    save_kohya(random_lora(model), tmp / "sd1.safetensors")
    save_kohya(random_lora(load(tmp / "SD 2.x")), tmp / "sd2.safetensors")
    save_file(load_file(tmp / "sd2.safetensors"), tmp / "sd2-bare.safetensors")  # no metadata: shapes tell
    data = (tmp / "sd1.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_single_file(model, tmp / "full.safetensors")
    return model, tmp


UP = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"
DOWN = UP.replace(".lora_up.", ".lora_down.")
NORM = "lora_unet_mid_block_attentions_0_norm.lora_down.weight"  # a GroupNorm, which no LoRA adapts
BAD_FILES = {  # case: (a change to sd1.safetensors, or another file; what the sentence says)
    "SD 2.x LoRA": ("sd2.safetensors", "is a LoRA for SD 2.x, but the model is SD 1.x; apply it to an SD 2.x model."),
    "SD 2.x LoRA without metadata": ("sd2-bare.safetensors", "is a LoRA for SD 2.x, but the model is SD 1.x"),
    "SDXL LoRA": (lambda t: t.update({"lora_te2_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}),
                  "is a LoRA for SDXL, but the model is SD 1.x; apply it to an SDXL model."),
    "unknown key": (lambda t: t.update({NORM: torch.ones(4, 64)}),
                    f"has 1 tensor matching no layer of this SD 1.x model ({NORM}); it was made for another model"),
    "wrong shape": (lambda t: t.update({UP: t[UP][:, :3].clone()}),
                    "which do not fit the layer down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k of shape (32, 32)."),
    "up missing": (lambda t: t.pop(UP), f"has {DOWN} without its up weight, so the file is incomplete."),
    "LoHa": (lambda t: t.update({"lora_unet_conv_in.hada_w1_a": torch.ones(4, 4)}), "is a LoHa adapter"),
    "not a LoRA": (lambda t: [t.clear(), t.update({"weight": torch.ones(1, 32), "bias": torch.ones(1)})],
                   "holds no LoRA tensors"),
    # an embedding given as a LoRA (sample.py --lora, info --merge-lora) is named, and where it goes said
    "an embedding": (lambda t: [t.clear(), t.update({"emb_params": torch.ones(1, 32)})],
                     "is a textual-inversion embedding, not a LoRA: it adds a word rather than changing weights, so "
                     "draw with it by sample.py --embedding"),
    "truncated": ("truncated.safetensors", "is not a readable safetensors file"),
    "full checkpoint": ("full.safetensors", "is a full model checkpoint, not a LoRA"),
    # weights that are no floating-point numbers: int8 cast to float was all zeros, bool 0 and 1, all used silently
    "int8 weights": (lambda t: t.update({UP: t[UP].mul(100).to(torch.int8)}), f"has {UP} holding int8 values where "
                     "a LoRA holds floating-point numbers, so the file is damaged or of another kind; download or "
                     "export it again."),
    "bool weights": (lambda t: t.update({DOWN: t[DOWN] > 0}), f"has {DOWN} holding bool values where a LoRA holds"),
    "complex alpha": (lambda t: t.update({UP.replace(".lora_up.weight", ".alpha"): torch.tensor(2 + 0j)}),
                      "alpha holding complex64 values where a LoRA holds floating-point numbers"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_one_sentence(sd1, case):
    model, tmp = sd1
    change, words = BAD_FILES[case]
    path = tmp / change if isinstance(change, str) else tmp / "edited.safetensors"
    if not isinstance(change, str):
        tensors = load_file(tmp / "sd1.safetensors")
        change(tensors)
        save_file(tensors, path)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with pytest.raises(ModelFileError) as e:
        merge_lora(model, path)
    assert words in one_sentence(e)
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())  # nothing half-merged


def test_sd1_lora_on_sd2_model(sd1):
    _, tmp = sd1
    save_file(load_file(tmp / "sd1.safetensors"), tmp / "sd1-bare.safetensors")  # the shapes tell, without metadata
    for name in ("sd1.safetensors", "sd1-bare.safetensors"):
        with pytest.raises(ModelFileError) as e:
            read_lora(tmp / name, load(tmp / "SD 2.x"))
        assert "is a LoRA for SD 1.x, but the model is SD 2.x; apply it to an SD 1.x model." in one_sentence(e)


def test_fp8_weights_merge_as_their_numbers_do_in_fp32(sd1, tmp_path):
    """fp8 LoRA files are common, and torch has no isfinite for float8_e4m3fn: reading one was a traceback."""
    model, tmp = sd1
    tensors = load_file(tmp / "sd1.safetensors")
    for dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        save_file({k: t.to(dtype) for k, t in tensors.items()}, tmp_path / "fp8.safetensors")
        save_file({k: t.to(dtype).float() for k, t in tensors.items()}, tmp_path / "fp32.safetensors")
        fp8, fp32 = read_lora(tmp_path / "fp8.safetensors", model), read_lora(tmp_path / "fp32.safetensors", model)
        assert len(fp8) == len(fp32) and all(torch.equal(a, b) for (_, a), (_, b) in zip(fp8, fp32))
        assert any(b.abs().sum() > 0 for _, b in fp8)


def test_a_lora_merges_into_an_fp8_model(sd1):
    """The merged weights are checked to be finite in the model's dtype, which torch could not do in fp8."""
    _, tmp = sd1
    model = load(tmp / "SD 1.x", dtype=torch.float8_e4m3fn)
    before = {k: v.float() for k, v in model.unet.state_dict().items()}
    assert merge_lora(model, tmp / "sd1.safetensors")["unet"] > 0
    assert any(not torch.equal(v.float(), before[k]) for k, v in model.unet.state_dict().items())


def test_a_whole_number_alpha_is_a_number_like_any_other(sd1, tmp_path):
    """kohya stores alpha = rank as an int64 tensor: only weights must be floating point."""
    model, tmp = sd1
    tensors = load_file(tmp / "sd1.safetensors")
    alphas = {k: torch.tensor(2) for k in tensors if k.endswith(".alpha")}
    save_file({**tensors, **alphas}, tmp_path / "int.safetensors")
    save_file({**tensors, **{k: t.float() for k, t in alphas.items()}}, tmp_path / "float.safetensors")
    ints, floats = read_lora(tmp_path / "int.safetensors", model), read_lora(tmp_path / "float.safetensors", model)
    assert len(ints) == len(floats) > 0 and all(torch.equal(a, b) for (_, a), (_, b) in zip(ints, floats))


ALPHA = UP.replace(".lora_up.weight", ".alpha")
PEFT = "lora_adapter_metadata"  # diffusers' PEFT settings; the files below have no alpha tensors, so these count
NOT_FINITE = {  # case: (a change to sd1.safetensors' tensors, its metadata or None, what the sentence says)
    "alpha_pattern a list": (None, '{"unet.alpha_pattern": [1, 2]}',
                             "has lora_adapter_metadata whose unet.alpha_pattern is not a JSON object of layer"),
    "alpha_pattern no regex": (None, '{"unet.alpha_pattern": {"(": 4}}',
                               "whose unet.alpha_pattern holds '(', which is not a regular expression"),
    "lora_alpha NaN": (None, '{"unet.lora_alpha": NaN}', "whose unet.lora_alpha is NaN, not a finite number"),
    "alpha_pattern inf": (None, '{"unet.alpha_pattern": {"to_k": -Infinity}}',
                          "whose unet.alpha_pattern gives 'to_k' the alpha -Infinity, not a finite number"),
    "alpha NaN": (lambda t: t.update({ALPHA: torch.tensor(float("nan"))}), None,
                  f"has {ALPHA} holding NaN or infinite numbers, so the file is damaged"),
    "up inf": (lambda t: t.update({UP: torch.full_like(t[UP], float("inf"))}), None,
               f"has {UP} holding NaN or infinite numbers"),
    "merged weights overflow": (None, '{"unet.lora_alpha": 1e308}', "at scale 1 gives weights that are not finite "
                                "numbers in float32: its alpha or weights are far too large"),
}


@pytest.mark.parametrize("case", list(NOT_FINITE))
def test_bad_alphas_and_numbers_that_are_not_finite_are_one_sentence(sd1, case, tmp_path):
    """A NaN or infinite alpha, scale or weight would merge into NaN weights that draw black pictures."""
    model, tmp = sd1
    change, settings, words = NOT_FINITE[case]
    tensors = load_file(tmp / "sd1.safetensors")
    if settings:
        tensors = {k: t for k, t in tensors.items() if not k.endswith(".alpha")}
    if change:
        change(tensors)
    save_file(tensors, tmp_path / "bad.safetensors", metadata={PEFT: settings} if settings else None)
    before = {k: v.clone() for k, v in model.unet.state_dict().items()}
    with pytest.raises(ModelFileError) as e:
        merge_lora(model, tmp_path / "bad.safetensors")
    assert words in one_sentence(e)
    assert all(torch.equal(v, before[k]) for k, v in model.unet.state_dict().items())
