"""LoRA: minidb's adapters and files against diffusers + PEFT, which read kohya's files and write their own.

- A kohya file that minidb writes, loaded by diffusers' `load_lora_weights`, gives diffusers the outputs
  minidb has after `merge_lora`, at scale 1 and 0.5, for the UNet and the text encoder; diffusers leaves
  no key out. The names are checked against diffusers' and transformers' modules (and, at real sizes,
  against kohya's counts and the rules AUTOMATIC1111 and ComfyUI apply: test_lora_elsewhere.py).
- A LoRA that PEFT creates in diffusers' models and diffusers saves (alpha != rank, alpha_pattern, 3x3
  convs) gives minidb diffusers' outputs; so do the same tensors in kohya's LoCon names, in older
  diffusers layouts and in ComfyUI's original-path names.
- Bad files are one sentence each: test_lora_bad_files.py; LoRA in training: test_lora_training.py.
"""

import logging
import re
import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import assert_close, diffusers
from minidb.files import ModelFileError
from minidb.load import load
from minidb.lora import LoRA, naming, save_kohya
from minidb.pnginfo import sha256
from minidb.lora_files import merge_lora, read_lora
from minidb.pipeline import decode, sample_latents
from test_bad_input import one_sentence
from test_load_save import reference_pipeline

peft = pytest.importorskip("peft")
KOHYA_PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# How diffusers, transformers and PEFT tell of LoRA weights they did not load (the last: PEFT's RuntimeWarning
# that its config names "additional target modules", i.e. layers whose weights found no place).
LEFT_OUT = re.compile(r"unexpected|lora_[AB]\S*\s*\| MISSING|not (been )?(loaded|renamed|converted)|additional target modules",
                      re.I)


@pytest.fixture(scope="module", params=["SD 1.x", "SD 2.x"])
def folder(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param.replace(" ", "").replace(".", ""))
    reference_pipeline(request.param, tmp).save_pretrained(tmp / "model")
    return tmp / "model"


def pipeline(folder):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_lora(model, rank=4, alpha=2.0, text_encoder=True, seed=0):
    """A LoRA whose up weights are random, as if trained: its update is as large as the layer's own."""
    lora = LoRA(model, rank=rank, alpha=alpha, text_encoder=text_encoder)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora.children():
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g) / rank ** 0.5)
    return lora


def inputs(model):
    g = torch.Generator().manual_seed(1)
    ids = model.tokenizer(["a photo of sks dog", "a cat"])
    return ids, torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 700])


@torch.no_grad()
def ours(model, ids, x, t):  # -> (text encoder output, UNet output on the same context)
    context = model.text_encoder(ids)
    return context, model.unet(x, t, context)


@torch.no_grad()
def theirs(pipe, ids, x, t):
    context = pipe.text_encoder(ids).last_hidden_state
    return context, pipe.unet(x, t, context).sample


def assert_same(a, b, base):
    for ours_, theirs_, base_ in zip(a, b, base):
        assert_close(ours_, theirs_, rtol=1e-5, atol=1e-5)
        assert (ours_ - base_).abs().max() > 0.05 * base_.abs().max(), "the LoRA barely changed the output"


@contextmanager
def complaints():
    """What diffusers, transformers and PEFT say while loading: the lines that tell of a LoRA weight left out."""
    messages, handler = [], logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    for logger in loggers:
        logger.addHandler(handler)
    found = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    for message in messages + [str(w.message) for w in caught]:
        found += [line for line in message.splitlines() if LEFT_OUT.search(line)]


def test_zero_up_is_the_base_model_exactly(folder):
    model = load(folder)
    ids, x, t = inputs(model)
    base = ours(model, ids, x, t)
    lora = LoRA(model, rank=4, text_encoder=True).attach()
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora.parameters())
    for a, b in zip(ours(model, ids, x, t), base):
        assert torch.equal(a, b)
    lora.detach()
    assert not any(m._forward_hooks for m in [*model.unet.modules(), *model.text_encoder.modules()])


def test_adapters_are_kohyas_default_layers_under_kohyas_names(folder, tmp_path):
    model, pipe = load(folder), pipeline(folder)
    lora = LoRA(model, rank=4, text_encoder=True)
    save_kohya(lora, tmp_path / "lora.safetensors")
    assert set(load_file(tmp_path / "lora.safetensors")) == set(lora.state_dict())
    table = naming(model)
    names = {name for name, _ in lora.named_children()}
    assert set(lora.state_dict()) == {f"{n}.{part}" for n in names for part in KOHYA_PARTS}
    # Each name is "lora_unet_" + the diffusers module path with "_" for ".", and that module exists in
    # diffusers' UNet; "lora_te_" + the transformers 4 path (text_model.*), which transformers 5 flattens.
    unet_modules, text_modules = dict(pipe.unet.named_modules()), dict(pipe.text_encoder.named_modules())
    for name in names:
        part, native, path = table[name]
        if part == "unet":
            assert name == "lora_unet_" + path.replace(".", "_") and path in unet_modules
        else:
            assert name == "lora_te_" + path.replace(".", "_") and path.removeprefix("text_model.") in text_modules
    # kohya's rule applied to diffusers' own models picks the same layers.
    in_transformers = {f"{p}.{n}" for p, m in pipe.unet.named_modules() if type(m).__name__ == "Transformer2DModel"
                       for n, c in m.named_modules() if isinstance(c, torch.nn.Linear)
                       or isinstance(c, torch.nn.Conv2d) and c.kernel_size == (1, 1)}
    in_clip = {f"text_model.{p}.{n}" for p, m in pipe.text_encoder.named_modules()
               if type(m).__name__ in ("CLIPAttention", "CLIPMLP")
               for n, c in m.named_children() if isinstance(c, torch.nn.Linear)}
    assert {table[n][2] for n in names} == in_transformers | in_clip
    assert len(in_transformers) == 12 * 7 and len(in_clip) == 6 * 2  # 7 transformer blocks, 2 CLIP layers


@pytest.mark.parametrize("alpha", [0.1, 1e-9])
def test_alpha_is_saved_as_the_number_training_scaled_by(folder, tmp_path, alpha):
    """Saved in fp16 with the weights, alpha 0.1 read back as 0.09998, and 1e-9 as 0, which kohya, A1111 and
    ComfyUI take for no alpha at all: scale 1 instead of 1e-9 / rank."""
    lora = random_lora(load(folder), alpha=alpha)
    save_kohya(lora, tmp_path / "lora.safetensors")  # fp16, the default
    tensors = load_file(tmp_path / "lora.safetensors")
    alphas = {k: t for k, t in tensors.items() if k.endswith(".alpha")}
    assert alphas and all(t.dtype == torch.float32 and t.item() == torch.tensor(alpha).item() for t in alphas.values())
    assert all(t.dtype == torch.float16 for k, t in tensors.items() if k not in alphas)
    assert all(a.scale == alpha / 4 for a in lora.children())  # what training scaled by


def test_kohya_file_gives_diffusers_outputs(folder, tmp_path):
    model = load(folder)
    save_kohya(random_lora(model), tmp_path / "lora.safetensors", metadata={"ss_output_name": "sks", "ss_steps": 400})
    with safe_open(str(tmp_path / "lora.safetensors"), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_network_alpha"] == "2.0" and metadata["ss_steps"] == "400"
    assert (metadata["ss_base_model_version"], metadata["ss_v2"]) in [("sd_v1", "False"), ("sd_v2_v", "True")]
    # A1111 finds a picture's LoRA by this on paste; it is the addnet hash that sample.py records (pnginfo)
    assert metadata["sshs_model_hash"] == sha256(tmp_path / "lora.safetensors", skip_header=True)

    pipe = pipeline(folder)
    with complaints() as left_out:
        pipe.load_lora_weights(tmp_path / "lora.safetensors", adapter_name="sks")
    assert not left_out
    ids, x, t = inputs(model)
    base = ours(model, ids, x, t)
    for scale in (1.0, 0.5):
        pipe.set_adapters("sks", adapter_weights=scale)
        model = load(folder)
        assert merge_lora(model, tmp_path / "lora.safetensors", scale) == {"unet": 84, "text_encoder": 12}
        assert_same(ours(model, ids, x, t), theirs(pipe, ids, x, t), base)

    # The check above can fail: a key for a block that does not exist is one diffusers leaves out.
    tensors = load_file(tmp_path / "lora.safetensors")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    tensors.update({f"{name.replace('_0_', '_7_', 1)}.{p}": tensors[f"{name}.{p}"].clone() for p in KOHYA_PARTS})
    save_file(tensors, tmp_path / "extra.safetensors")
    with complaints() as left_out:
        pipe.load_lora_weights(tmp_path / "extra.safetensors", adapter_name="extra")
    assert left_out and "down_blocks.7" in left_out[0]
    with pytest.raises(ModelFileError) as e:
        merge_lora(model, tmp_path / "extra.safetensors")
    assert "lora_unet_down_blocks_7_attentions_0_proj_in.alpha" in one_sentence(e)


def test_kohya_file_gives_diffusers_image(tmp_path):
    reference_pipeline("SD 1.x", tmp_path).save_pretrained(tmp_path / "model")
    model = load(tmp_path / "model")
    save_kohya(random_lora(model, seed=3), tmp_path / "lora.safetensors")
    pipe = pipeline(tmp_path / "model")
    pipe.load_lora_weights(tmp_path / "lora.safetensors")
    merge_lora(model, tmp_path / "lora.safetensors", scale=0.5)
    settings = dict(prompt="a photo of sks dog", steps=4, guidance=6.0, seed=42, height=32, width=32)
    images = np.stack([np.asarray(im) for im in decode(model, sample_latents(model, progress=False, **settings))])
    ref = pipe(settings["prompt"], num_inference_steps=4, guidance_scale=6.0, height=32, width=32, output_type="np",
               generator=torch.Generator("cpu").manual_seed(42), cross_attention_kwargs={"scale": 0.5}).images
    plain = pipe(settings["prompt"], num_inference_steps=4, guidance_scale=6.0, height=32, width=32, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(42), cross_attention_kwargs={"scale": 0.0}).images
    diff = np.abs(images.astype(np.float64) - (ref * 255).round())
    assert diff.mean() < 0.1 and diff.max() <= 2  # in 8-bit levels
    assert np.abs(images - plain * 255).mean() > 2  # and the LoRA did change the picture


def peft_lora_file(pipe, path):
    """PEFT's adapters in diffusers' UNet (every layer kind, 3x3 convs too) and the text encoder, with
    random lora_B, alpha != rank, a rank_pattern and an alpha_pattern; saved as diffusers' DreamBooth LoRA
    script saves them."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    torch.manual_seed(0)
    unet = peft.LoraConfig(r=4, lora_alpha=6, init_lora_weights=False, rank_pattern={"attn2.to_k": 2},
                           alpha_pattern={"ff.net.2": 3}, target_modules=[
                               "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                               "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv", "conv_in", "conv_out",
                               "linear_1", "linear_2"])
    text = peft.LoraConfig(r=3, lora_alpha=5, init_lora_weights=False,
                           target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"])
    pipe.unet.add_adapter(unet)
    # transformers 5's text_encoder.add_adapter wants peft >= 0.22; PEFT's own injection is the same adapters
    peft.inject_adapter_in_model(text, pipe.text_encoder)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        path, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(pipe.text_encoder)),
        unet_lora_adapter_metadata=unet.to_dict(), text_encoder_lora_adapter_metadata=text.to_dict())
    return path / "pytorch_lora_weights.safetensors"


def kohya_layout(pipe, tensors):
    """The same adapters in kohya's names, alpha as a tensor (read from PEFT's layers: scaling * r)."""
    out = {}
    for part, prefix in (("unet", "lora_unet_"), ("text_encoder", "lora_te_text_model_")):
        for key, t in tensors.items():
            m = re.fullmatch(rf"{part}\.(.+)\.(lora_A|lora\.down|lora_linear_layer\.down)\.weight", key)
            if m:
                name, layer = prefix + m[1].replace(".", "_"), getattr(pipe, part).get_submodule(m[1])
                out[f"{name}.lora_down.weight"] = t
                out[f"{name}.lora_up.weight"] = tensors[key.replace("lora_A", "lora_B").replace(".down.", ".up.")]
                out[f"{name}.alpha"] = torch.tensor(layer.scaling["default"] * layer.r["default"])
    assert len(out) == len(tensors) * 3 // 2
    return out


def test_diffusers_peft_file_gives_diffusers_outputs(folder, tmp_path):
    pipe = pipeline(folder)
    model = load(folder)
    ids, x, t = inputs(model)
    base = ours(model, ids, x, t)
    path = peft_lora_file(pipe, tmp_path)
    tensors = load_file(path)
    assert any(".lora.down." in k for k in tensors) and any(".lora_A." in k for k in tensors)  # both, as diffusers writes
    assert any(v.ndim == 4 and v.shape[-1] == 3 for v in tensors.values())  # 3x3 convs (LoCon)
    expected = theirs(pipe, ids, x, t)
    assert merge_lora(model, path) == {"unet": len(tensors) // 2 - 12, "text_encoder": 12}
    assert_same(ours(model, ids, x, t), expected, base)

    kohya = tmp_path / "locon.safetensors"
    save_file(kohya_layout(pipe, tensors), kohya)
    model = load(folder)
    merge_lora(model, kohya)
    assert_same(ours(model, ids, x, t), expected, base)

    # Without the metadata both take alpha = rank. (Pure PEFT names here: diffusers 0.42 converts the file's
    # names only when its first key lacks lora_A, so it leaves out the .lora.down layers of the file above,
    # warning only that its config has "additional target modules".)
    pure = {re.sub(r"\.(lora|lora_linear_layer)\.(down|up)\.", lambda m: ".lora_A." if m[2] == "down" else ".lora_B.", k): v
            for k, v in tensors.items()}
    save_file(pure, tmp_path / "bare.safetensors")
    model, pipe = load(folder), pipeline(folder)
    with complaints() as left_out:
        pipe.load_lora_weights(tmp_path / "bare.safetensors")
    assert not left_out
    merge_lora(model, tmp_path / "bare.safetensors")
    assert_same(ours(model, ids, x, t), theirs(pipe, ids, x, t), base)


def test_a_unet_only_file_gives_diffusers_outputs(folder, tmp_path):
    """train.py's default LoRA adapts the UNet alone (no --train-text-encoder); diffusers loads it too, and its text
    encoder stays as it was."""
    model = load(folder)
    save_kohya(random_lora(model, text_encoder=False), tmp_path / "lora.safetensors")
    pipe = pipeline(folder)
    with complaints() as left_out:
        pipe.load_lora_weights(tmp_path / "lora.safetensors")
    # diffusers says it found no keys for the text encoder, in a line that reads "unexpected" too: that one is true
    assert [line for line in left_out if "No LoRA keys associated to CLIPTextModel" not in line] == []
    ids, x, t = inputs(model)
    base = ours(model, ids, x, t)
    assert merge_lora(model, tmp_path / "lora.safetensors")["unet"] == 84
    (context, out), (their_context, their_out) = ours(model, ids, x, t), theirs(pipe, ids, x, t)
    assert torch.equal(context, base[0])
    assert_close(their_context, base[0], rtol=1e-5, atol=1e-5)
    assert_same([out], [their_out], [base[1]])


def test_older_layouts_and_comfyui_names_give_diffusers_outputs(tmp_path):
    """A kohya file's tensors renamed to each layout: minidb reads every layer's update as from the kohya file,
    and diffusers' own loaders, given the renamed file, compute what minidb computes after merging it."""
    reference_pipeline("SD 1.x", tmp_path).save_pretrained(tmp_path / "model")
    model = load(tmp_path / "model")
    ids, x, t = inputs(model)
    base = ours(model, ids, x, t)
    table = naming(model)
    save_kohya(random_lora(model, alpha=4.0), tmp_path / "kohya.safetensors", dtype=torch.float32)  # alpha = rank
    kohya = load_file(tmp_path / "kohya.safetensors")
    expected = {id(layer): delta for layer, delta in read_lora(tmp_path / "kohya.safetensors", model)}

    def layout(rename, load_in_diffusers=lambda pipe, path: pipe.load_lora_weights(path),
               suffixes=(".down.weight", ".up.weight"), file="layout.safetensors"):
        """Write the kohya file's tensors under rename(part, native, path) + suffix; read_lora must agree, and
        load_in_diffusers(pipe, path) must give diffusers minidb's outputs."""
        out = {}
        for key, tensor in kohya.items():
            name, part = key.split(".", 1)
            new = rename(*table[name])
            if new and part in KOHYA_PARTS[: len(suffixes)]:
                out[new + suffixes[KOHYA_PARTS.index(part)]] = tensor
        (save_file if file.endswith(".safetensors") else torch.save)(out, tmp_path / file)
        deltas = read_lora(tmp_path / file, model)
        assert len(deltas) == len(out) // len(suffixes) > 0
        for layer, delta in deltas:
            assert torch.equal(delta, expected[id(layer)])

        merged, pipe = load(tmp_path / "model"), pipeline(tmp_path / "model")
        merge_lora(merged, tmp_path / file)
        with complaints() as left_out:
            load_in_diffusers(pipe, tmp_path / file)
        assert not left_out
        got, want, before = ours(merged, ids, x, t), theirs(pipe, ids, x, t), base
        if not any(k.startswith("text_encoder.") for k in out):  # a UNet-only file: the text encoder is as it was
            got, want, before = got[1:], want[1:], before[1:]
        assert_same(got, want, before)

    # diffusers 0.21-0.24: LoRACompatibleLinear's .lora, and the text encoder's lora_linear_layer
    layout(lambda part, native, path: f"unet.{path}.lora" if part == "unet" else f"text_encoder.{path}.lora_linear_layer")
    # diffusers 0.14-0.20: attention processors' to_q_lora ... to_out_lora, without the unet. prefix
    old = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out.0": "to_out",
           "q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}

    def processor(part, native, path):
        m = re.fullmatch(r"(.+)\.(to_q|to_k|to_v|to_out\.0|q_proj|k_proj|v_proj|out_proj)", path)
        if m and part == "unet":
            return f"{m[1]}.processor.{old[m[2]]}_lora"
        return m and f"text_encoder.{m[1]}.{old[m[2]]}_lora"

    def processors_in_diffusers(pipe, path):  # diffusers 0.42 reads UNet keys without the prefix given prefix=None
        tensors = torch.load(path, weights_only=True)
        unet = {k: v for k, v in tensors.items() if not k.startswith("text_encoder.")}
        pipe.unet.load_lora_adapter(unet, prefix=None)
        pipe.load_lora_into_text_encoder(tensors, None, pipe.text_encoder)
    layout(processor, processors_in_diffusers, file="pytorch_lora_weights.bin")  # a pickle, read with weights_only
    # ComfyUI: kohya's prefix on the original layout's path, with alpha. diffusers maps the original block names
    # when given the UNet's config, as its SDXL pipeline does.
    layout(lambda part, native, path: "lora_unet_" + native.replace(".", "_") if part == "unet" else None,
           lambda pipe, path: pipe.load_lora_into_unet(*pipe.lora_state_dict(path, unet_config=pipe.unet.config),
                                                       pipe.unet),
           suffixes=tuple("." + p for p in KOHYA_PARTS))


def test_merge_equals_attached_and_leaves_no_hooks(folder, tmp_path):
    model = load(folder)
    ids, x, t = inputs(model)
    base = ours(model, ids, x, t)
    lora = random_lora(model, rank=3, alpha=5.0).attach()
    attached = ours(model, ids, x, t)
    save_kohya(lora.detach(), tmp_path / "lora.safetensors", dtype=torch.float32)
    merge_lora(model, tmp_path / "lora.safetensors")
    assert_same(ours(model, ids, x, t), attached, base)
    assert not any(m._forward_hooks for m in [*model.unet.modules(), *model.text_encoder.modules()])


def test_the_scale_follows_alpha_when_built_and_when_loaded(folder):
    """The adapter keeps alpha / rank as a Python number. It must equal the alpha buffer after a state is
    loaded (--resume), and at alpha = rank the update is up(down(x)) itself."""
    model = load(folder)
    ids, x, t = inputs(model)
    base = ours(model, ids, x, t)
    trained = random_lora(model, rank=3, alpha=5.0).attach()
    attached = ours(model, ids, x, t)
    trained.detach()
    resumed = random_lora(model, rank=3, alpha=3.0, seed=1)  # scale 1 until the state arrives
    resumed.load_state_dict(trained.state_dict(), strict=True)
    resumed.attach()
    assert_same(ours(model, ids, x, t), attached, base)
    resumed.detach()
    g = torch.Generator().manual_seed(2)
    for lora, scale in ((resumed, 5.0 / 3), (random_lora(model, rank=3, alpha=3.0), 1.0)):
        for name, adapter in lora.named_children():
            if isinstance(lora.bases[name], torch.nn.Linear):
                probe = torch.randn(2, adapter.lora_down.weight.shape[1], generator=g)
                update = adapter.lora_up.weight @ adapter.lora_down.weight * scale
                assert_close(adapter(probe), probe @ update.T, rtol=1e-5, atol=1e-6)
