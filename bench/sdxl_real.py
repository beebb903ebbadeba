"""SDXL at its real size: minidb's models against diffusers' and transformers', one model in memory at a time.

    python bench/sdxl_real.py                    # UNet, both text encoders, VAE (about 11 GB of RAM at the peak)
    python bench/sdxl_real.py --parts text vae   # only some parts

The tiny parity tests (tests/test_sdxl.py) walk every code path at a few MB; this adds the published
sizes, where a wrong depth or width per level would show: the UNet is 2.6 B parameters, 10.3 GB in
fp32, so minidb's and diffusers' copies are never held together. For each part:

1. the reference module is built at SDXL base 1.0's config (stabilityai/stable-diffusion-xl-base-1.0:
   tests/test_sdxl.py's SDXL_UNET, the VAE and text-encoder configs below) with seeded random
   weights (tests/conftest.py's randomize_), run on a small input, written to a temporary
   .safetensors file in its own names one tensor at a time, and freed;
2. minidb's module is built on the meta device and filled strictly from that file, renamed by
   minidb/convert.py's rules as minidb/load.py reads a diffusers folder, and run on the same input;
3. the outputs are compared in fp32 at the tiny parity tests' tolerance (conftest's assert_close:
   1e-5 + 1e-5 of the output's largest magnitude).

The UNet's input: a 16x16 latent (128 px; 4x4 at the lowest level), batch 1, with the added
conditioning y (bigG's pooled vector and the six size numbers). The text encoders read two prompts
with SDXL's two tokenizers: the penultimate layer of both, and bigG's pooled vector. The VAE encodes
a 64 px image and decodes an 8x8 latent.
"""

import argparse
import dataclasses
import functools
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402

from bench.checkpoints import write_streamed  # noqa: E402
from conftest import assert_close, diffusers, randomize_, transformers  # noqa: E402
from minidb import text_encoder as te, unet as un, vae as va  # noqa: E402
from minidb.convert import (native_to_diffusers_names, text_config_from_transformers,  # noqa: E402
                            text_config_to_transformers, unet_blocks, unet_config_from_diffusers,
                            vae_attention_shape, vae_blocks, vae_config_from_diffusers)
from minidb.files import read_tensors  # noqa: E402
from minidb.tokenizer import Tokenizer  # noqa: E402
from minidb.unet import size_features  # noqa: E402
from test_sdxl import SDXL_UNET  # noqa: E402

# stabilityai/stable-diffusion-xl-base-1.0, vae/config.json (the architecture is SD's VAE; the scale and
# force_upcast are SDXL's).
SDXL_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3,
            "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3,
            "sample_size": 1024, "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4}
# The text encoders' config.json files carry transformers' old token ids (bos 0, eos 2), with which
# transformers finds the end-of-text token by argmax, as CLIP's original code does: for a prompt without
# a new word, the token minidb takes as the first end-of-text token (minidb/text_encoder.py).
LEGACY_IDS = {"bos_token_id": 0, "eos_token_id": 2}
PROMPTS = ["a photo of sks dog", "A DSLR photo of an astronaut riding a horse on Mars, highly detailed"]


def materialize(build, seed):
    """The reference module without its own initialization: built on the meta device, then memory and
    seeded random weights. CLIP's position_ids buffer gets its real values back."""
    with torch.device("meta"):
        module = build()
    module.to_empty(device="cpu")
    for name, buffer in module.named_buffers():
        assert name.endswith("position_ids"), name
        buffer.copy_(torch.arange(buffer.shape[-1]).expand(buffer.shape))
    return randomize_(module, seed)


def round_trip(ref, folder):
    """Write the reference's state to a file (in its own names), free the reference, read the file back."""
    state = ref.state_dict()
    return write_streamed(Path(folder) / "weights.safetensors",
                          {k: (tuple(t.shape), t.dtype) for k, t in state.items()}, lambda k: state[k])


def fill(cls, cfg, tensors):
    """minidb's module on the meta device, filled strictly with `tensors` (native names)."""
    with torch.device("meta"):
        module = cls(cfg)
    module.load_state_dict(tensors, strict=True, assign=True)
    return module.eval()


def to_native(cls, cfg, blocks, tensors):
    """diffusers' names -> minidb's, by the rename rules minidb/load.py uses for diffusers folders."""
    with torch.device("meta"):
        keys = cls(cfg).state_dict().keys()
    names = native_to_diffusers_names(keys, blocks)
    missing = [d for d in names.values() if d not in tensors]
    assert not missing and len(names) == len(tensors), f"names do not match: {missing[:3]}"
    return {k: tensors[d] for k, d in names.items()}


def unet(folder):
    cfg = unet_config_from_diffusers(SDXL_UNET)
    assert cfg == un.SDXL
    g = torch.Generator().manual_seed(0)
    x, context, pooled = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 2048, generator=g), torch.randn(1, 1280, generator=g)
    time_ids, t = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]]), torch.tensor([500])
    ref = materialize(lambda: diffusers.UNet2DConditionModel(**{k: v for k, v in SDXL_UNET.items() if k[0] != "_"}), 0)
    with torch.no_grad():
        expected = {"noise prediction": ref(x, t, context, added_cond_kwargs={"text_embeds": pooled,
                                                                              "time_ids": time_ids}).sample}
    path = round_trip(ref, folder)
    del ref
    gc.collect()
    ours = fill(un.UNet, cfg, to_native(un.UNet, cfg, unet_blocks(cfg), read_tensors(path)[0]))
    with torch.no_grad():
        got = {"noise prediction": ours(x, t, context, torch.cat([pooled, size_features(time_ids)], dim=1))}
    return expected, got, sum(p.numel() for p in ours.parameters())


def text(folder, which):
    preset, tokenizer, cls = {"CLIP-L": (te.SDXL_L, "SD 1.x", transformers.CLIPTextModel),
                              "OpenCLIP-bigG": (te.SDXL_G, "SD 2.x", transformers.CLIPTextModelWithProjection)}[which]
    config = {**text_config_to_transformers(preset), **LEGACY_IDS}
    # the preset is what minidb reads from such a config (which layer SDXL reads is the pipeline's choice)
    assert text_config_from_transformers(config) == dataclasses.replace(preset, skip_last=0, final_norm=True)
    ref = materialize(lambda: cls(transformers.CLIPTextConfig(**{k: v for k, v in config.items()
                                                                 if k not in ("architectures", "model_type")})),
                      {"CLIP-L": 2, "OpenCLIP-bigG": 3}[which])
    ids = Tokenizer.for_version(tokenizer)(PROMPTS)  # SDXL's second tokenizer pads with "!" (id 0), as SD 2's
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    expected = {"penultimate layer": out.hidden_states[-2]}
    assert not torch.allclose(out.hidden_states[-2], out.hidden_states[-1], atol=1e-2)  # the layer matters
    if preset.projection:
        expected["pooled"] = out.text_embeds
    path = round_trip(ref, folder)
    del ref, out
    gc.collect()
    # transformers 4 wrote text_model.-prefixed names (5 too, with a projection): minidb/load.py's rule
    tensors = {k.removeprefix("text_model."): t for k, t in read_tensors(path)[0].items() if not k.endswith("position_ids")}
    ours = fill(te.TextEncoder, preset, tensors)
    with torch.no_grad():
        got = ours(ids, pooled=bool(preset.projection))
    got = dict(zip(expected, got)) if preset.projection else {"penultimate layer": got}
    return expected, got, sum(p.numel() for p in ours.parameters())


def vae(folder):
    cfg = vae_config_from_diffusers(SDXL_VAE)
    assert cfg == va.SDXL
    g = torch.Generator().manual_seed(0)
    image, z = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1, torch.randn(1, 4, 8, 8, generator=g)
    ref = materialize(lambda: diffusers.AutoencoderKL(**{k: v for k, v in SDXL_VAE.items() if k[0] != "_"}), 1)
    with torch.no_grad():
        post = ref.encode(image).latent_dist
        expected = {"encode mean": post.mean, "encode logvar": post.logvar, "decode": ref.decode(z).sample}
    path = round_trip(ref, folder)
    del ref
    gc.collect()
    tensors = to_native(va.AutoencoderKL, cfg, vae_blocks(cfg), read_tensors(path)[0])
    ours = fill(va.AutoencoderKL, cfg, {k: vae_attention_shape(k, t, to_diffusers=False) for k, t in tensors.items()})
    with torch.no_grad():
        post = ours.encode(image)
        got = {"encode mean": post.mean, "encode logvar": post.logvar, "decode": ours.decode(z)}
    return expected, got, sum(p.numel() for p in ours.parameters())


# --parts name: [(model, the function that builds, runs and compares it)]
PARTS = {"unet": [("UNet", unet)],
         "text": [(which, functools.partial(text, which=which)) for which in ("CLIP-L", "OpenCLIP-bigG")],
         "vae": [("VAE", vae)]}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="*", default=list(PARTS), choices=list(PARTS))
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows, failed = [], []
    for name, job in [job for part in args.parts for job in PARTS[part]]:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as folder:  # the weights file, 10.3 GB for the UNet, goes with it
            expected, got, n = job(folder)
        seconds = time.perf_counter() - t0
        for output, ref in expected.items():
            assert got[output].shape == ref.shape, f"{name} {output}: {tuple(got[output].shape)} != {tuple(ref.shape)}"
            err, scale = (got[output] - ref).abs().max().item(), ref.abs().max().item()
            try:
                assert_close(got[output], ref)
                ok = "ok"
            except AssertionError as e:
                ok = f"FAILED: {e}"
                failed.append(f"{name} {output}")
            rows.append({"part": name, "params": n, "output": output, "shape": list(ref.shape), "max_abs_err": err,
                         "scale": scale, "rel_err": err / scale, "seconds": seconds, "result": ok})
            print(f"{name:14s} {n / 1e6:8.1f} M  {output:17s} {str(tuple(ref.shape)):18s} max |err| {err:.3g} "
                  f"(scale {scale:.3g}, rel {err / scale:.2g})  {seconds:6.1f} s  {ok}", flush=True)
        gc.collect()
    if args.json:
        Path(args.json).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
                                               "diffusers": diffusers.__version__, "rows": rows}, indent=2) + "\n")
    if failed:
        sys.exit(f"error: minidb differs from the reference at SDXL's real size: {', '.join(failed)}")


if __name__ == "__main__":
    main()
