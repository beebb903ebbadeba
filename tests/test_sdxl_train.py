"""DreamBooth on SDXL, end to end on a tiny SDXL-shaped model that diffusers builds (CPU, offline).

- With no --method an SDXL base trains a LoRA (rank 16, lr 1e-4) with prior preservation; here with
  --train-text-encoder and --new-token (pivotal tuning), so one run writes every file SDXL has: kohya
  keys for the UNet and both text encoders, and an embedding with clip_l and clip_g vectors.
- Both files mean in diffusers' StableDiffusionXLPipeline what they mean in sample.py: the same image,
  no LoRA key left out, and every adapter in the file one diffusers layer; the LoRA also without its
  text-encoder adapters, as a default run writes it.
- A full run's README gives diffusers lines for SDXL's pipeline, which load its two files alike.
- The UNet's added conditioning carries each photo's own size and crop; drawn prior images their own.
- A run stopped and resumed equals the run made in one go; --method full trains and warns of its memory.
- An SDXL LoRA or embedding on an SD 1.x model, and the reverse, are one sentence.
"""

import json
import re
import types

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import sample
import train
from conftest import assert_close, diffusers, tiny_model
from minidb import text_encoder as te, unet as un
from minidb.dreambooth import NewWord
from minidb.files import ModelFileError
from minidb.load import load
from minidb.lora import LoRA, save_kohya
from minidb.lora_files import merge_lora
from minidb.detect import is_sdxl
from minidb.options import parse_args, with_method_defaults
from minidb.pipeline import encode_prompt
from minidb.save import save_single_file
from test_bad_input import one_sentence
from test_lora import complaints
from test_sdxl import SDXL_UNET, TINY_G, TINY_L
from test_run_readme import as_the_readme_says, assert_same_weights, readme_calls
from test_sdxl_files import tiny_sdxl
from test_train import draw_subject

RES = 32  # training size; the tiny model's own is 128


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SDXL base as diffusers saves it, and three photos of a subject: wide, tall and square."""
    tmp = tmp_path_factory.mktemp("sdxl-train")
    tiny_sdxl(tmp, "base")
    (tmp / "photos").mkdir()
    draw_subject(tmp / "photos" / "0.png", (200, 40, 30), 0)  # 64 x 48
    draw_subject(tmp / "photos" / "1.png", (200, 70, 30), 6, size=72)
    Image.open(tmp / "photos" / "1.png").transpose(Image.Transpose.ROTATE_90).save(tmp / "photos" / "1.png")  # 72 x 88
    draw_subject(tmp / "photos" / "2.png", (200, 100, 30), 12)
    Image.open(tmp / "photos" / "2.png").resize((40, 40)).save(tmp / "photos" / "2.png")
    return tmp


def run(world, out, *extra, steps=2):
    train.main([str(a) for a in ["--images", world / "photos", "--class", "ball", "--model", world / "base",
                                 "--out", out, "--steps", steps, "--resolution", RES, "--sample-steps", 2,
                                 "--class-cache", world / "cache", "--class-images", 2,
                                 *([] if "--mixed-precision" in extra else ["--mixed-precision", "no"]), *extra]])
    return out


# With SDXL's default method: a LoRA, on the text encoders too, and a new word; at a rate that makes two steps
# change the picture plainly, so that drawing the same picture in diffusers proves something.
PIVOTAL = ("--train-text-encoder", "--new-token", "--lr", 1e-2, "--text-encoder-lr", 0.1)


@pytest.fixture(scope="module")
def pivotal(world):
    """One default run on the SDXL base, the added conditioning of every training step recorded on its way
    into the UNet: -> (run folder, [y of each step])."""
    seen, forward = [], un.UNet.forward

    def spy(self, x, t, context, y=None):
        if torch.is_grad_enabled():  # a training step, not a drawing
            seen.append(y.detach().clone())
        return forward(self, x, t, context, y)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(un.UNet, "forward", spy)
        out = run(world, world / "pivotal", *PIVOTAL)
    return out, seen


def draw(argv, out):
    """sample.py's picture, as uint8 pixels."""
    assert sample.main([str(a) for a in [*argv, "--steps", 4, "--seed", 42, "--height", RES, "--sampler", "euler",
                                         "--guidance", 5, "--out", out, "--dtype", "fp32"]]) == 0
    (png,) = out.glob("*.png")
    return np.asarray(Image.open(png).convert("RGB")).astype(np.float64)


def reference_image(pipe, prompt):
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=4, guidance_scale=5.0, height=RES, width=RES, output_type="np",
                 generator=torch.Generator("cpu").manual_seed(42)).images[0]
    return (image * 255).round()


def assert_same_picture(ours, theirs, plain):
    diff = np.abs(ours - theirs)
    assert diff.mean() < 0.1 and diff.max() <= 2  # in 8-bit levels
    assert np.abs(ours - plain).max() > 3 * max(diff.max(), 1)  # and what the run made did change the picture


def test_sdxl_trains_a_lora_by_default(world, pivotal):
    defaults = lambda model: parse_args(["--images", "x", "--class", "dog", "--model", str(model)], train.__doc__)  # noqa: E731
    args = defaults(world / "base")
    assert is_sdxl(args.model) and with_method_defaults(args, is_sdxl(args.model)) is None
    assert (args.method, args.lr, args.lora_rank, args.lora_alpha, args.prior_weight) == ("lora", 1e-4, 16, 16.0, 1.0)
    args = defaults(world / "photos")  # not SDXL: SD's defaults stay
    assert not is_sdxl(args.model) and with_method_defaults(args, is_sdxl(args.model)) is None
    assert (args.method, args.lr, args.prior_weight) == ("full", 5e-6, 1.0)
    out, _ = pivotal  # a run on the SDXL base without --method
    settings = json.load(open(out / "settings.json"))
    assert (settings["method"], settings["lora_rank"], settings["resolution"], settings["base_version"]) == (
        "lora", 16, RES, "SDXL")
    assert all(r["prior_loss"] is not None for r in map(json.loads, open(out / "log.jsonl")))
    assert Image.open(out / "validation" / "step-000002.png").size == (3 * RES, RES)
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0" and f.metadata()["ss_network_dim"] == "16"


@pytest.mark.parametrize("text_encoders", [True, False])
def test_the_lora_draws_in_diffusers_what_it_draws_in_sample_py(world, pivotal, tmp_path, text_encoders):
    """With the text encoders' adapters (--train-text-encoder), and without: the UNet's alone, as a default SDXL
    run writes it (here the same run's file without its lora_te1_ / lora_te2_ keys)."""
    out, _ = pivotal
    lora = out / "lora.safetensors"
    tensors = load_file(lora)
    layers = {k.split(".")[0] for k in tensors}
    assert {n.split("_")[1] for n in layers} == {"unet", "te1", "te2"}  # lora_unet_, lora_te1_, lora_te2_
    assert "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k" in layers  # kohya's SDXL names: the original's
    if not text_encoders:
        with safe_open(str(lora), "pt") as f:
            metadata = f.metadata()
        lora, layers = tmp_path / "unet_only.safetensors", {n for n in layers if n.startswith("lora_unet_")}
        save_file({k: v for k, v in tensors.items() if k.startswith("lora_unet_")}, lora, metadata=metadata)

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(world / "base")
    plain = reference_image(pipe, "a photo of a ball on the beach")
    with complaints() as left_out:
        pipe.load_lora_weights(lora)
    # a file without text-encoder keys: diffusers says it found none for them ("... if you think it's unexpected")
    assert not [line for line in left_out if not line.startswith("No LoRA keys associated to CLIPTextModel")], left_out
    adapted = {part: sum(hasattr(m, "lora_A") for m in getattr(pipe, part).modules())
               for part in ("unet", "text_encoder", "text_encoder_2")}
    assert adapted == {part: sum(n.startswith(p) for n in layers) for part, p in
                       (("unet", "lora_unet_"), ("text_encoder", "lora_te1_"), ("text_encoder_2", "lora_te2_"))}
    ours = draw(["--model", world / "base", "--prompt", "a photo of a ball on the beach", "--lora", lora], tmp_path)
    assert_same_picture(ours, reference_image(pipe, "a photo of a ball on the beach"), plain)


def test_the_embedding_draws_in_diffusers_what_it_draws_in_sample_py(world, pivotal, tmp_path):
    out, _ = pivotal
    word = json.load(open(out / "settings.json"))["identifier"]
    vectors = load_file(out / f"{word}.safetensors")  # AUTOMATIC1111's SDXL layout
    assert {k: v.shape for k, v in vectors.items()} == {"clip_l": (1, TINY_L.width), "clip_g": (1, TINY_G.width)}
    prompt = " ".join([word] * 10)  # the word ten times: the tiny random model's picture hardly depends on one word
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(world / "base")
    plain = reference_image(pipe, prompt)  # the word spelled in plain BPE pieces
    pipe.load_textual_inversion(vectors["clip_l"], token=word, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(vectors["clip_g"], token=word, text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)
    model = load(world / "base")
    NewWord.from_file(model, out / f"{word}.safetensors").attach(model.text_encoder, model.text_encoder_2)
    context, pooled = encode_prompt(model, [prompt])  # both encoders side by side, and bigG's pooled vector
    pipe.text_encoder_2.text_model.eos_token_id = 2  # as SDXL's own config says: the pooled vector at the new word
    _, _, legacy_pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    pipe.text_encoder_2.text_model.eos_token_id = 49407  # what the run's README says to set (minidb/export.py)
    ref_context, _, ref_pooled, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False)
    assert_close(context, ref_context)
    assert_close(pooled, ref_pooled)  # bigG's pooled vector, at the end-of-text token
    assert (legacy_pooled - ref_pooled).abs().max() > 0.1 * ref_pooled.abs().max()  # which the line does change
    assert "pipe.text_encoder_2.text_model.eos_token_id = 49407" in (out / "README.md").read_text()
    base_context, _ = encode_prompt(load(world / "base"), [prompt])
    assert (context - base_context).abs().max() > 0.1 * base_context.abs().max()  # the word is not the BPE pieces
    ours = draw(["--model", world / "base", "--prompt", prompt, "--embedding", out / f"{word}.safetensors"], tmp_path)
    assert_same_picture(ours, reference_image(pipe, prompt), plain)


def test_each_photo_conditions_the_unet_with_its_own_size_and_crop(world, pivotal):
    _, seen = pivotal
    pooled = TINY_G.projection

    def features(h, w, top, left):  # what the UNet must be given, from the photo's size alone
        return un.size_features(torch.tensor([[h, w, top, left, RES, RES]], dtype=torch.float32))[0]

    photos = {}
    for path in sorted((world / "photos").iterdir()):
        w, h = Image.open(path).size
        short = min(w, h)  # short side -> RES (the long side truncated, as torchvision does), centre crop
        photos[path.name] = features(h, w, round((int(RES * h / short) - RES) / 2), round((int(RES * w / short) - RES) / 2))
    assert len(seen) == 2 and all(y.shape == (2, pooled + 6 * un.SIZE_FEATURES) for y in seen)
    instance = [next((name for name, f in photos.items() if torch.equal(y[0, pooled:], f)), None) for y in seen]
    assert None not in instance and len(set(instance)) == 2, instance  # two different photos, each its own sizes
    assert set(instance) - {"2.png"}  # at least one of them cropped (2.png is square)
    assert len({tuple(f.tolist()) for f in photos.values()}) == 3  # and the three photos' features do differ
    for y in seen:  # the class prior, drawn whole at the training size
        assert torch.equal(y[1, pooled:], features(RES, RES, 0, 0))


def test_resumed_run_equals_the_run_made_in_one_go(world, pivotal):
    straight, _ = pivotal
    split = run(world, world / "split", *PIVOTAL, steps=1)
    run(world, split, *PIVOTAL, "--resume")
    word = json.load(open(straight / "settings.json"))["identifier"]
    for name in ("lora.safetensors", f"{word}.safetensors"):
        a, b = load_file(straight / name), load_file(split / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    losses = lambda out: [json.loads(line)["loss"] for line in open(out / "log.jsonl")]  # noqa: E731
    assert losses(straight) == losses(split)


@pytest.mark.filterwarnings("ignore:--mixed-precision bf16 on this CPU")  # bf16 on purpose, emulated or not
@pytest.mark.filterwarnings("ignore:`torch_dtype` is deprecated")  # 0.42 prefers dtype=, which older ones ignore
def test_full_training_on_sdxl_warns_of_its_memory_and_exports_both_layouts(world, tmp_path):
    with pytest.warns(UserWarning, match="--method full on SDXL trains .* add --use-8bit-adam and "
                                         "--gradient-checkpointing, or train a LoRA"):
        out = run(world, tmp_path / "full", "--method", "full", "--prior-weight", 0, "--mixed-precision", "bf16",
                  steps=1)
    single, folder, base = load(out / "model.safetensors"), load(out / "model"), load(world / "base")
    assert single.version == folder.version == "SDXL" and is_sdxl(out / "model.safetensors")
    a, b, c = single.unet.state_dict(), folder.unet.state_dict(), base.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], c[k]) for k in a)
    for part in ("text_encoder", "text_encoder_2", "vae"):  # frozen parts come out as they went in
        a, c = getattr(single, part).state_dict(), getattr(base, part).state_dict()
        assert all(torch.equal(a[k], c[k]) for k in a), part
    calls = readme_calls((out / "README.md").read_text())  # the README's diffusers lines, for SDXL's pipeline
    assert calls["from_pretrained"] == (f'StableDiffusionXLPipeline.from_pretrained("{out / "model"}", '
                                        f'torch_dtype=torch.float32)')  # the base's dtype, as the export's
    assert_same_weights(*(as_the_readme_says(code) for code in calls.values()))


def test_adapters_for_one_family_are_refused_by_the_other(world, pivotal, tmp_path, capsys):
    out, _ = pivotal
    word = json.load(open(out / "settings.json"))["identifier"]
    sd1 = tiny_model()
    save_single_file(sd1, tmp_path / "sd1.safetensors")
    for flag, path, words in (("--lora", out / "lora.safetensors", "is a LoRA for SDXL, but the model is SD 1.x; "
                                                                    "apply it to an SDXL model."),
                              ("--embedding", out / f"{word}.safetensors", "made for SDXL")):
        with pytest.raises(SystemExit) as e:
            sample.main([str(a) for a in ["--model", tmp_path / "sd1.safetensors", "--prompt", "a ball", flag, path,
                                          "--out", tmp_path / "images"]])
        err = capsys.readouterr().err
        assert e.value.code == 2 and words in err and err.count("\n") == 1 and "Traceback" not in err
    xl = load(world / "base")
    save_kohya(LoRA(sd1, rank=2, text_encoder=True), tmp_path / "sd1-lora.safetensors")
    with pytest.raises(ModelFileError) as e:
        merge_lora(xl, tmp_path / "sd1-lora.safetensors")
    assert "is a LoRA for SD 1.x, but the model is SDXL; apply it to an SD 1.x model." in one_sentence(e)
    NewWord(sd1, "abz", torch.zeros(1, sd1.text_encoder.cfg.width)).save(tmp_path / "abz.safetensors")
    with pytest.raises(ModelFileError) as e:
        NewWord.from_file(xl, tmp_path / "abz.safetensors")
    assert f"this SDXL model's words are {TINY_L.width} and {TINY_G.width} wide" in one_sentence(e)


def test_names_at_sdxl_size_are_the_layers_kohya_and_diffusers_adapt():
    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)
    with torch.device("meta"):
        model = types.SimpleNamespace(unet=un.UNet(un.SDXL), text_encoder=te.TextEncoder(te.SDXL_L),
                                      text_encoder_2=te.TextEncoder(te.SDXL_G), version="SDXL", prediction_type="epsilon")
        lora = LoRA(model, rank=4, text_encoder=True)
        ref = diffusers.UNet2DConditionModel(**{k: v for k, v in SDXL_UNET.items() if not k.startswith("_")})
    names = [n for n, _ in lora.named_children()]
    # kohya's sd-scripts on SDXL: "create LoRA for Text Encoder 1: 72 modules", "... 2: 192", "U-Net: 722"
    assert [sum(n.startswith(p) for n in names) for p in ("lora_te1_", "lora_te2_", "lora_unet_")] == [72, 192, 722]
    # diffusers' own conversion of kohya's SDXL names lands each UNet adapter on a layer of its SDXL UNet
    state = _maybe_map_sgm_blocks_to_diffusers({k: torch.zeros(v.shape) for k, v in lora.state_dict().items()}, ref.config)
    converted, _ = _convert_non_diffusers_lora_to_diffusers(state)

    def layer(key):  # unet.<path>.lora.down.weight, or <attention>.processor.to_q_lora.down.weight -> <path>
        path = re.sub(r"\.(lora\.)?(down|up)\.weight$", "", key.removeprefix("unet."))
        m = re.fullmatch(r"(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora", path)
        return path if not m else f"{m[1]}.{m[2]}" + (".0" if m[2] == "to_out" else "")

    places = {layer(k) for k in converted if k.startswith("unet.")}
    modules = dict(ref.named_modules())
    assert len(places) == 722 and all(isinstance(modules.get(p), (torch.nn.Linear, torch.nn.Conv2d)) for p in places)


def test_info_merges_an_sdxl_lora_into_both_text_encoders(world, pivotal, tmp_path, capsys):
    from minidb.info import main as info
    out, _ = pivotal
    keys = load_file(out / "lora.safetensors").keys()
    layers = {part: len({k.split(".")[0] for k in keys if k.startswith(f"lora_{part}_")}) for part in ("unet", "te1", "te2")}
    assert min(layers.values()) > 0
    assert info([str(world / "base"), "--merge-lora", str(out / "lora.safetensors"), "--convert",
                 str(tmp_path / "merged.safetensors")]) == 0
    assert (f"{layers['unet']} UNet, {layers['te1']} text-encoder and {layers['te2']} second-text-encoder layers"
            in capsys.readouterr().out)
    merged, base = load(tmp_path / "merged.safetensors"), load(world / "base")
    assert not torch.equal(merged.text_encoder_2.encoder.layers[0].self_attn.q_proj.weight,
                           base.text_encoder_2.encoder.layers[0].self_attn.q_proj.weight)


@pytest.mark.filterwarnings("ignore:--mixed-precision bf16 on this CPU")  # bf16 on purpose, emulated or not
def test_mixed_precision_keeps_the_frozen_base_in_its_dtype(world, tmp_path, monkeypatch):
    """With --mixed-precision bf16 a LoRA run holds the frozen UNet and text encoders in bf16 (half the
    memory, as diffusers' scripts), the VAE and the adapters in fp32, and still trains."""
    seen, forward = [], un.UNet.forward

    def spy(self, x, t, context, y=None):
        if torch.is_grad_enabled():
            seen.append(next(self.parameters()).dtype)
        return forward(self, x, t, context, y)

    monkeypatch.setattr(un.UNet, "forward", spy)
    out = run(world, tmp_path / "bf16", "--mixed-precision", "bf16", "--train-text-encoder", steps=2)
    assert seen == [torch.bfloat16] * 2
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 2 and all(np.isfinite(row["loss"]) for row in log)
    lora = load_file(out / "lora.safetensors")
    assert any(k.startswith("lora_te2_") for k in lora) and all(torch.isfinite(v).all() for v in lora.values())
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_up" in k)  # the adapters moved from zero


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_every_adapter_that_can_learn_gets_a_gradient_and_the_unread_layer_stays_frozen(world, precision):
    """Nothing runs SDXL's CLIP-L past its penultimate layer, so the adapters of its last layer (kohya
    has them: its counts and files do) are frozen; every other adapter gets a gradient from one step, as
    DistributedDataParallel requires of what it trains, with and without autocast's batched casts."""
    from minidb.pipeline import added_conditioning, encode_tokens
    model = load(world / "base")
    for part in (model.unet, model.text_encoder, model.text_encoder_2):
        part.requires_grad_(False)
    lora = LoRA(model, rank=2, text_encoder=True).attach()
    last = f"lora_te1_text_model_encoder_layers_{model.text_encoder.cfg.layers - 1}_"
    frozen = {k for k, a in lora.named_children() if not a.lora_down.weight.requires_grad}
    assert frozen == {k for k in lora.bases if k.startswith(last)} and len(frozen) == 6  # q, k, v, out, fc1, fc2
    assert not any(p.requires_grad for k in frozen for p in lora.get_submodule(k).parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        prompt = ["a photo of sks ball"]
        context, pooled = encode_tokens(model, model.tokenizer(prompt), model.tokenizer_2(prompt))
        pred = model.unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), context, added_conditioning(pooled, (64, 64)))
    pred.float().square().mean().backward()
    for name, p in lora.named_parameters():
        assert (p.grad is not None) == p.requires_grad, name


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="CUDA's autocast needs a CUDA GPU"))])
def test_a_frozen_base_holds_its_norms_in_fp32_for_cuda_and_trains_bit_for_bit_as_before(world, monkeypatch, device):
    """CUDA's autocast runs LayerNorm and GroupNorm in fp32, casting a bf16 base's norm weights up at every
    call; hold_frozen holds them in fp32 for CUDA, rounded to bf16, everything else in bf16. One LoRA step
    then gives the loss and gradients of the all-bf16 base bit for bit, with two casts fewer per norm run.
    The CPU's autocast runs norms in bf16, so for the CPU the base stays all bf16, and the CPU case runs the
    norms as CUDA's autocast does (as bench/op_count.py), to check the rest without a GPU."""
    from contextlib import nullcontext

    from bench.op_count import cuda_norms
    from minidb.loop import hold_frozen
    from minidb.pipeline import added_conditioning, encode_tokens
    from test_lora_training import Casts
    if device == "cuda":  # kernels that give the same sums run to run
        monkeypatch.setenv("MINIDB_ATTENTION", "math")
        monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    model = load(world / "base", device=device)
    parts = (model.unet, model.text_encoder, model.text_encoder_2)
    norms = [m for part in parts for m in part.modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))]
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # norms as trained ones, not bf16's ones and zeros, so that the rounding shows
        for p in (p for m in norms for p in m.parameters()):
            p.add_(torch.randn(p.shape, generator=g).to(device) * 0.1)
    loaded = [{k: v.clone() for k, v in part.requires_grad_(False).state_dict().items()} for part in parts]
    for part in parts:
        part.to(torch.bfloat16)
    lora = LoRA(model, rank=2, text_encoder=True)
    with torch.no_grad():
        for adapter in lora.children():  # as if trained, so that every adapter carries a gradient
            adapter.lora_up.weight.copy_(torch.randn(adapter.lora_up.weight.shape, generator=g))
    lora.attach()
    prompt = ["a photo of sks ball"]
    ids = [tokenizer(prompt).to(device) for tokenizer in (model.tokenizer, model.tokenizer_2)]
    x, t = torch.randn(1, 4, 8, 8, generator=g).to(device), torch.tensor([500], device=device)
    calls = []
    for m in norms:
        m.register_forward_hook(lambda *_: calls.append(1))

    def step():
        calls.clear()
        lora.zero_grad(set_to_none=True)
        with Casts() as casts, cuda_norms() if device == "cpu" else nullcontext():
            with torch.autocast(device, dtype=torch.bfloat16):
                context, pooled = encode_tokens(model, *ids)
                pred = model.unet(x, t, context, added_conditioning(pooled, (64, 64)))
            loss = pred.float().square().mean()
            loss.backward()
        return loss.item(), [p.grad for p in lora.parameters() if p.requires_grad], casts.one

    loss, grads, casts = step()
    before = [{k: v.clone() for k, v in part.state_dict().items()} for part in parts]
    for part, state in zip(parts, loaded):  # as train.py holds the base it loaded, in fp32
        assert hold_frozen(part.float(), torch.bfloat16, "cpu") is part  # for the CPU: all bf16, as before
        assert {p.dtype for p in part.parameters()} == {torch.bfloat16}
        part.float().load_state_dict(state)
        hold_frozen(part, torch.bfloat16, "cuda")
    assert any(not torch.equal(p, p.bfloat16().float()) for state in loaded for p in state.values())
    for part, old in zip(parts, before):
        held = {name for name, m in part.named_modules() if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm))}
        for key, value in part.state_dict().items():
            assert value.dtype == (torch.float32 if key.rpartition(".")[0] in held else torch.bfloat16), key
            assert torch.equal(value.float(), old[key].float()), key  # the very numbers
    held_loss, held_grads, held_casts = step()
    assert held_loss == loss and len(calls) > 0
    for a, b in zip(held_grads, grads, strict=True):
        assert a.abs().max() > 0 and torch.equal(a, b)
    assert casts - held_casts == 2 * len(calls)  # a weight and a bias each
