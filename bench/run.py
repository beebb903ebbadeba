"""minidb against diffusers, side by side: time and memory of every stage, as ratios from one run.

    python bench/run.py                  # CPU, fp32, 2 threads: sizes that fit in about 10 minutes
    python bench/run.py --device cuda    # GPU, bf16, Stable Diffusion's real sizes
    python bench/run.py --rows unet-64   # only some rows
    python bench/run.py --rows sdxl      # the SDXL rows (asked for by name: 10 GB of fp32 UNet on the CPU)
    python bench/cpu_bf16.py             # CPU: these rows in minidb's bf16 default against diffusers' fp32
                                         # and its bf16 (four implementations a row; a file of its own)

Both implementations get identical random SD 1.5-shaped weights (SDXL rows: SDXL-shaped, with the
2.6 B-parameter UNet): minidb's modules are filled, then the same tensors are renamed into diffusers'
modules. Every (row, implementation) pair runs in a fresh process, so each peak memory figure is its own: peak RSS on the CPU, peak allocated on the
GPU. Both processes import the same libraries, so the baseline is the same. Each time is the median
of several runs after one warm-up. On a shared, noisy machine only the ratio minidb / diffusers of
one run means anything.
"""

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checkpoints import LOAD_FILES, prepare_load_files, random_tensor_  # noqa: E402

SDXL_STEPS = 20  # sampling steps of the sdxl-sample row
# row: (what it measures, CPU size, GPU size, runs on CPU, runs on GPU). Sizes are latent sides for
# the UNet, pixel sides for the VAE, sampling and training.
ROWS = {
    "unet-32": ("UNet forward, batch 2 (guidance), latent 32x32", 32, 32, 3, 10),
    "unet-64": ("UNet forward, batch 2 (guidance), latent 64x64", 64, 64, 2, 10),
    "train-step": ("DreamBooth step: UNet fwd+bwd+AdamW, 1 instance + 1 class", 256, 512, 3, 10),
    "lora-step": ("DreamBooth LoRA step, rank 16 (diffusers: PEFT, same layers), 1 instance + 1 class", 256, 512, 3, 10),
    "vae-encode-256": ("VAE encode, 1 image", 256, 256, 3, 10),
    "vae-decode-256": ("VAE decode, 1 image", 256, 256, 3, 10),
    "vae-encode-512": ("VAE encode, 1 image", 512, 512, 2, 10),
    "vae-decode-512": ("VAE decode, 1 image", 512, 512, 2, 10),
    "sample": ("50 DDIM steps with guidance + decode, 1 image (s/image)", 64, 512, 1, 3),
    "load": ("load an SD 1.5 single file, fp16 safetensors, all weights touched", 0, 0, 3, 3),
    # SDXL: on the CPU at small sizes (a run of both takes minutes), on the GPU at 1024 px.
    "sdxl-unet": ("SDXL UNet forward with y, batch 2 (guidance)", 16, 128, 3, 10),
    "sdxl-lora-step": ("SDXL DreamBooth LoRA step, rank 16 on to_q/k/v/out (diffusers' SDXL script; PEFT), base "
                       "bf16 on GPU, 1 instance + 1 class", 128, 1024, 2, 5),
    "sdxl-lora-step-gc": ("SDXL DreamBooth LoRA step as above, with gradient checkpointing (both)", 128, 1024, 2, 5),
    "sdxl-sample": (f"SDXL, {SDXL_STEPS} Euler steps, guidance 5.0, fp16 on GPU + fp32 decode, 1 image (s/image)", 128, 1024, 1, 2),
    "sdxl-load": ("load an SDXL single file, fp16 safetensors, all weights touched", 0, 0, 1, 1),
}
SDXL_ROWS = [row for row in ROWS if row.startswith("sdxl")]
# The layers diffusers' train_dreambooth_lora_sdxl.py adapts (its LoraConfig target_modules). SD's
# lora-step row adapts kohya's default set, which minidb's LoRA targets, on both sides.
LORA_SDXL = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_KOHYA = LORA_SDXL + ["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


# ---- the worker: one row, one implementation, in its own process ----

def random_(module, seed):
    """Deterministic weights at a sane scale (±1/√fan_in), norm weights near 1, drawn on the module's
    device (a 2.6 B-parameter UNet takes 10 s on two CPU cores, milliseconds on a GPU)."""
    import torch
    g = torch.Generator(next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            random_tensor_(name, p, g)
    return module


# part: (config, seed) for each family
PARTS = {"SD 1.x": {"unet": ("SD1", 0), "vae": ("SD", 1), "text": ("SD1", 2)},
         "SDXL": {"unet": ("SDXL", 0), "vae": ("SDXL", 1), "text": ("SDXL_L", 2), "text_2": ("SDXL_G", 3)}}


def build(part, impl, device, dtype, family="SD 1.x"):
    """One part with seeded weights, as minidb's or diffusers' / transformers' module (same tensors)."""
    import diffusers
    import torch
    import transformers
    from minidb import text_encoder as te, unet as un, vae as va
    from minidb.convert import (native_to_diffusers_names, text_config_to_transformers, unet_blocks,
                                unet_config_to_diffusers, vae_attention_shape, vae_blocks, vae_config_to_diffusers)
    preset, seed = PARTS[family][part]
    module, cls = {"unet": (un, un.UNet), "vae": (va, va.AutoencoderKL), "text": (te, te.TextEncoder),
                   "text_2": (te, te.TextEncoder)}[part]
    cfg = getattr(module, preset)
    with torch.device("meta"):
        ours = cls(cfg)
    ours = random_(ours.to_empty(device=device), seed).to(dtype).eval()
    if impl == "minidb":
        return ours
    state = ours.state_dict()
    with torch.device("meta"):
        if part == "unet":
            kw = unet_config_to_diffusers(cfg)
            kw.pop("_class_name")
            ref, names = diffusers.UNet2DConditionModel(**kw), native_to_diffusers_names(state, unet_blocks(cfg))
        elif part == "vae":
            kw = vae_config_to_diffusers(cfg, 1024 if family == "SDXL" else 512)
            kw.pop("_class_name")
            ref, names = diffusers.AutoencoderKL(**kw), native_to_diffusers_names(state, vae_blocks(cfg))
            state = {k: vae_attention_shape(k, v, to_diffusers=True) for k, v in state.items()}
        else:  # SDXL's bigG: CLIPTextModelWithProjection, whose state keeps the text_model. prefix
            kw = {k: v for k, v in text_config_to_transformers(cfg).items() if k not in ("architectures", "model_type")}
            text_cls = transformers.CLIPTextModelWithProjection if cfg.projection else transformers.CLIPTextModel
            ref = text_cls(transformers.CLIPTextConfig(**kw))
            keys = ref.state_dict().keys()
            names = {k: k if k in keys else "text_model." + k for k in state}
    ref.load_state_dict({names[k]: v for k, v in state.items()}, strict=False, assign=True)
    for name, buffer in list(ref.named_buffers()):  # CLIP's position_ids: rebuild off the meta device
        if buffer.is_meta:
            ref.get_submodule(name.rsplit(".", 1)[0]).register_buffer(
                name.rsplit(".", 1)[1], torch.arange(buffer.shape[-1], device=device).expand(buffer.shape), persistent=False)
    assert not any(p.is_meta for p in ref.parameters())
    return ref.eval()


def task(row, impl, device, size, tmp):
    """Build what the row needs; return a function that runs the measured work once."""
    import torch
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    out = (lambda r: r.sample) if impl == "diffusers" else (lambda r: r)
    if row.startswith("unet"):
        unet = build("unet", impl, device, dtype)
        x, t = torch.randn(2, 4, size, size, generator=g).to(device, dtype), torch.tensor([500, 500], device=device)
        ctx = torch.randn(2, 77, 768, generator=g).to(device, dtype)
        return torch.no_grad()(lambda: out(unet(x, t, ctx)))
    if row == "sdxl-unet":
        unet = sdxl_call(build("unet", impl, device, dtype, "SDXL"), impl)
        x, t = torch.randn(2, 4, size, size, generator=g).to(device, dtype), torch.tensor([500, 500], device=device)
        ctx, pooled, time_ids = sdxl_conditioning(g, device, dtype)
        return torch.no_grad()(lambda: unet(x, t, ctx, pooled, time_ids))
    if row in ("train-step", "lora-step"):
        unet = build("unet", impl, device, torch.float32).train()  # fp32 master weights, autocast on GPU
        if row == "train-step":
            params, lr = list(unet.parameters()), 5e-6
        else:  # the base frozen, rank-16 adapters on kohya's default layers; diffusers' through PEFT
            params, lr = lora_params(unet.requires_grad_(False), impl, LORA_KOHYA, "SD 1.x"), 1e-4
        ctx = torch.randn(2, 77, 768, generator=g).to(device)
        return train_step(lambda x, t: out(unet(x, t, ctx)), params, lr, device, size, g)
    if row.startswith("sdxl-lora-step"):
        # As diffusers' train_dreambooth_lora_sdxl.py: the frozen UNet in the mixed-precision dtype
        # (bf16 on the GPU), the adapters in fp32 (its cast_training_params), autocast.
        unet = build("unet", impl, device, dtype, "SDXL").train().requires_grad_(False)
        params = lora_params(unet, impl, LORA_SDXL, "SDXL")
        if row.endswith("-gc"):
            if impl == "minidb":
                unet.gradient_checkpointing = True
            else:
                unet.enable_gradient_checkpointing()
        ctx, pooled, time_ids = sdxl_conditioning(g, device, torch.float32)
        unet = sdxl_call(unet, impl)
        return train_step(lambda x, t: unet(x, t, ctx, pooled, time_ids), params, 1e-4, device, size, g)
    if row.startswith("vae"):
        vae = build("vae", impl, device, dtype)
        if "encode" in row:
            image = torch.rand(1, 3, size, size, generator=g).to(device, dtype) * 2 - 1
            mean = (lambda r: r.latent_dist.mean) if impl == "diffusers" else (lambda r: r.mean)
            return torch.no_grad()(lambda: mean(vae.encode(image)))
        z = torch.randn(1, 4, size // 8, size // 8, generator=g).to(device, dtype)
        return torch.no_grad()(lambda: out(vae.decode(z)))
    if row == "sample":
        return sampler(impl, device, dtype, size, tmp)
    if row == "sdxl-sample":
        return sdxl_sampler(impl, device, size, tmp)
    if row in ("load", "sdxl-load"):
        return loader(impl, device, tmp, "SDXL" if row == "sdxl-load" else "SD 1.x")
    raise ValueError(row)


def sdxl_conditioning(g, device, dtype):
    """Text context (B, 77, 2048), bigG's pooled vector (B, 1280) and the six size numbers of a
    1024 px picture (B, 6), for the unconditional and the conditional half."""
    import torch
    ctx, pooled = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 1280, generator=g)
    time_ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2)
    return ctx.to(device, dtype), pooled.to(device, dtype), time_ids.to(device)


def sdxl_call(unet, impl):
    """The UNet as f(x, t, context, pooled, time_ids): minidb takes y = pooled + size features, diffusers
    builds the same inside (added_cond_kwargs). Either way the size features are computed each call."""
    import torch
    from minidb.unet import size_features
    if impl == "diffusers":
        return lambda x, t, ctx, pooled, time_ids: unet(
            x, t, ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    return lambda x, t, ctx, pooled, time_ids: unet(x, t, ctx, torch.cat([pooled, size_features(time_ids)], dim=1))


def lora_params(unet, impl, targets, version):
    """Rank-16 adapters (alpha 16) on `targets` of a frozen UNet; returns the trained parameters.
    minidb's LoRA targets kohya's default set; adapters outside `targets` are dropped before attaching."""
    import types
    import torch
    if impl == "minidb":
        from minidb.lora import LoRA
        model = types.SimpleNamespace(unet=unet, text_encoder=torch.nn.Module(), version=version,
                                      prediction_type="epsilon")  # adapters on the UNet only
        lora = LoRA(model, rank=16)
        ends = tuple("_" + t.replace(".", "_") for t in targets)  # kohya names: ..._attn1_to_out_0
        for name in [name for name, _ in lora.named_children() if not name.endswith(ends)]:
            delattr(lora, name)
            del lora.bases[name]
        return list(lora.attach().parameters())
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:  # fp32 adapters on a bf16 base, as minidb's (diffusers' cast_training_params)
        p.data = p.data.float()
    return params


def train_step(predict, params, lr, device, size, g):
    """One DreamBooth step on 1 instance + 1 class latent at `size` px: predict(x, t) under autocast on
    the GPU, the prior-preservation loss, backward, AdamW. The first call checks that every trained
    parameter got a gradient (a LoRA that checkpointing cut off would train nothing)."""
    import torch
    import torch.nn.functional as F
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lat = size // 8
    x, target = torch.randn(2, 4, lat, lat, generator=g).to(device), torch.randn(2, 4, lat, lat, generator=g).to(device)
    t = torch.tensor([100, 700], device=device)
    amp = torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda")
    checked = []

    def step():
        with amp:
            pred = predict(x, t).float()
        instance, prior = pred.chunk(2)
        loss = F.mse_loss(instance, target[:1]) + 1.0 * F.mse_loss(prior, target[1:])
        loss.backward()
        if not checked:
            assert all(p.grad is not None for p in params), "some trained parameters got no gradient"
            checked.append(True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    step.trained = sum(p.numel() for p in params)
    return step


def sampler(impl, device, dtype, size, tmp):
    import diffusers
    import torch
    import transformers
    from minidb.load import StableDiffusion
    from minidb.pipeline import decode, sample_latents
    from minidb.save import scheduler_config
    from minidb.tokenizer import Tokenizer
    parts = {p: build(p, impl, device, dtype) for p in ("unet", "vae", "text")}
    prompt = "a photo of sks dog on the beach"
    if impl == "minidb":
        model = StableDiffusion(Tokenizer.for_version("SD 1.x"), parts["text"], parts["vae"], parts["unet"],
                                "SD 1.x", "epsilon")
        return lambda steps=50: decode(model, sample_latents(model, prompt, steps=steps, guidance=7.5, seed=0, height=size,
                                                    width=size, progress=False))
    Tokenizer.for_version("SD 1.x").save(Path(tmp) / "tok")
    pipe = diffusers.StableDiffusionPipeline(
        vae=parts["vae"], text_encoder=parts["text"], tokenizer=transformers.CLIPTokenizer.from_pretrained(Path(tmp) / "tok"),
        unet=parts["unet"], scheduler=diffusers.DDIMScheduler.from_config(scheduler_config("epsilon")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return lambda steps=50: pipe(prompt, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                        generator=torch.Generator("cpu").manual_seed(0)).images


def sdxl_sampler(impl, device, size, tmp):
    """Text to image with SDXL's pipeline in both: fp16 on the GPU (both tools' default there: sample.py's
    --dtype, diffusers' torch_dtype examples), the VAE decoding in fp32 (minidb as sample.py does it,
    diffusers by force_upcast). The function returns the seconds of its two phases: prompt encoding +
    denoising, and decoding to a PIL image."""
    import diffusers
    import torch
    import transformers
    from minidb.load import StableDiffusion
    from minidb.pipeline import decode, sample_latents
    from minidb.save import scheduler_config
    from minidb.tokenizer import Tokenizer
    dtype = torch.float16 if device == "cuda" else torch.float32
    parts = {p: build(p, impl, device, dtype, "SDXL") for p in ("unet", "vae", "text", "text_2")}
    prompt = "a photo of sks dog on the beach"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if impl == "minidb":
        model = StableDiffusion(Tokenizer.for_version("SD 1.x"), parts["text"], parts["vae"].float(), parts["unet"],
                                "SDXL", "epsilon", Tokenizer.for_version("SD 2.x"), parts["text_2"])

        def run(steps=SDXL_STEPS):
            t0 = time.perf_counter()
            latents = sample_latents(model, prompt, steps=steps, guidance=5.0, seed=0, height=size, width=size,
                                     sampler="euler", progress=False)
            sync()
            t1 = time.perf_counter()
            decode(model, latents)
            sync()
            return {"denoise": t1 - t0, "decode": time.perf_counter() - t1}
        return run
    tokenizers = []
    for version in ("SD 1.x", "SD 2.x"):  # the second pads with "!" (id 0), as SDXL's tokenizer_2
        Tokenizer.for_version(version).save(Path(tmp) / version)
        tokenizers.append(transformers.CLIPTokenizer.from_pretrained(Path(tmp) / version))
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=parts["vae"], text_encoder=parts["text"], text_encoder_2=parts["text_2"], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=parts["unet"], add_watermarker=False,
        scheduler=diffusers.EulerDiscreteScheduler.from_config(scheduler_config("epsilon", "SDXL")))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.config.force_upcast

    def run(steps=SDXL_STEPS):
        marks = []

        def last_step(pipe, i, t, kwargs):  # the end of denoising: the decode follows
            if i == steps - 1:
                sync()
                marks.append(time.perf_counter())
            return {}
        t0 = time.perf_counter()
        pipe(prompt, num_inference_steps=steps, guidance_scale=5.0, height=size, width=size,
             generator=torch.Generator("cpu").manual_seed(0), callback_on_step_end=last_step)
        sync()
        return {"denoise": marks[0] - t0, "decode": time.perf_counter() - marks[0]}
    return run


def loader(impl, device, tmp, family):
    import diffusers
    import torch
    from minidb.load import load
    path = Path(tmp) / LOAD_FILES[family]

    def touch(modules):  # loading may be lazy (memory-mapped): count only a model whose weights are in RAM
        return sum(float(p.detach().float().sum()) for m in modules for p in m.parameters())

    if impl == "minidb":
        return lambda: touch(parts_of(load(path, device=device)))
    os.environ["HF_HUB_OFFLINE"] = "1"
    if family == "SDXL":
        return lambda: touch(parts_of(diffusers.StableDiffusionXLPipeline.from_single_file(
            path, config=str(Path(tmp) / "config-xl"), torch_dtype=torch.float16).to(device)))
    return lambda: touch(parts_of(diffusers.StableDiffusionPipeline.from_single_file(
        path, config=str(Path(tmp) / "config"), torch_dtype=torch.float16, safety_checker=None).to(device)))


def parts_of(model):
    return [m for m in (model.unet, model.vae, model.text_encoder, getattr(model, "text_encoder_2", None)) if m is not None]


def rss_gb(field):
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that
    over from the parent across fork + exec, so a child would report its parent's peak."""
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 2**20


TRAINING = ("train-step", "lora-step", "sdxl-lora-step", "sdxl-lora-step-gc")


def worker(row, impl, device, threads, tmp):
    import torch
    import diffusers  # noqa: F401  both implementations pay for the same imports
    torch.set_num_threads(threads)
    torch.set_grad_enabled(row in TRAINING)
    _, cpu_size, gpu_size, cpu_runs, gpu_runs = ROWS[row]
    size, runs = (gpu_size, gpu_runs) if device == "cuda" else (cpu_size, cpu_runs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    baseline = rss_gb("VmRSS")
    fn = task(row, impl, device, size, tmp)
    if row in ("load", "sdxl-load"):
        runs = 1  # one load per process: a second would reuse memory
    elif row == "sdxl-sample" or row == "sample" and device == "cpu":
        fn(steps=2)  # a full run takes a minute on the CPU, seconds of scarce GPU time: warm up with a short one
    else:
        fn()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, phases = [], []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        result = fn()
        sync()
        times.append(time.perf_counter() - t0)
        if isinstance(result, dict):  # sdxl-sample: seconds of denoising and of decoding
            phases.append(result)
    return {"seconds": times, "phases": phases, "trained": getattr(fn, "trained", None),
            "checksum": result if isinstance(result, float) else None,  # load: the sum of every weight
            "peak_rss_gb": rss_gb("VmHWM"), "baseline_rss_gb": baseline,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


# ---- the driver ----

def machine(device):
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def run_row(row, device, threads, tmp):
    """Both implementations, each in its own process -> the row's figures."""
    figures = {}
    for impl in ("minidb", "diffusers"):
        r = subprocess.run([sys.executable, __file__, "--device", device, "--threads", str(threads),
                            "--worker", row, impl, tmp], capture_output=True, text=True)
        if r.returncode:
            sys.exit(f"error: {row} / {impl} failed:\n{r.stderr[-3000:]}")
        figures[impl] = json.loads(r.stdout.strip().splitlines()[-1])
    m, d = figures["minidb"], figures["diffusers"]
    if m["trained"] != d["trained"]:
        sys.exit(f"error: {row}: minidb trains {m['trained']} parameters, diffusers {d['trained']}; not the same layers.")
    if m["checksum"] is not None and not math.isclose(m["checksum"], d["checksum"], rel_tol=1e-6):
        sys.exit(f"error: {row}: the weights minidb and diffusers loaded differ (sums {m['checksum']}, {d['checksum']}).")
    med = {k: statistics.median(v["seconds"]) for k, v in figures.items()}
    mem = "peak_gpu_gb" if device == "cuda" else "peak_rss_gb"
    r = {"row": row, "what": ROWS[row][0], "size": ROWS[row][2 if device == "cuda" else 1],
         "baseline_rss_gb": {"minidb": m["baseline_rss_gb"], "diffusers": d["baseline_rss_gb"]},
         "peak_rss_gb": {"minidb": m["peak_rss_gb"], "diffusers": d["peak_rss_gb"]},
         "minidb_s": med["minidb"], "diffusers_s": med["diffusers"],
         "time_ratio": med["minidb"] / med["diffusers"], "minidb_mem_gb": m[mem],
         "diffusers_mem_gb": d[mem], "mem_ratio": m[mem] / d[mem], "runs": len(m["seconds"]),
         "all_seconds": {"minidb": m["seconds"], "diffusers": d["seconds"]}}
    if m["trained"]:
        r["trained_params"] = m["trained"]
    if m["phases"]:  # sampling: steps per second of the denoising loop alone, and the decode's seconds
        for impl, f in figures.items():
            denoise = statistics.median(p["denoise"] for p in f["phases"])
            r[f"{impl}_it_per_s"] = SDXL_STEPS / denoise
            r[f"{impl}_decode_s"] = statistics.median(p["decode"] for p in f["phases"])
    print(f"{row:17s} minidb {r['minidb_s']:8.3f}s {r['minidb_mem_gb']:6.2f}GB | diffusers {r['diffusers_s']:8.3f}s "
          f"{r['diffusers_mem_gb']:6.2f}GB | time x{r['time_ratio']:.2f} mem x{r['mem_ratio']:.2f}", flush=True)
    if m["phases"]:
        print(f"{'':17s} denoising {r['minidb_it_per_s']:.2f} it/s vs {r['diffusers_it_per_s']:.2f} it/s, "
              f"decode {r['minidb_decode_s']:.3f}s vs {r['diffusers_decode_s']:.3f}s", flush=True)
    return r


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rows", nargs="*", default=[r for r in ROWS if r not in SDXL_ROWS], choices=list(ROWS) + ["sdxl"],
                   help="rows to run (default: all but the SDXL ones; 'sdxl' means every SDXL row)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results.json"), help="where to write the figures")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # ROW IMPL TMP: internal
    p.add_argument("--prepare", nargs=2, help=argparse.SUPPRESS)  # FAMILY TMP: internal
    args = p.parse_args()
    if args.prepare:
        print(prepare_load_files(args.prepare[1], args.prepare[0]))
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.device, args.threads, args.worker[2])))
        return
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for, but PyTorch sees no CUDA GPU.")
    rows = [r for row in args.rows for r in (SDXL_ROWS if row == "sdxl" else [row])]
    results, file_gb = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            family = {"load": "SD 1.x", "sdxl-load": "SDXL"}.get(row)
            if family:  # the file, written in a child process, so this driver stays small
                r = subprocess.run([sys.executable, __file__, "--prepare", family, tmp], capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"error: preparing the {family} checkpoint failed:\n{r.stderr[-3000:]}")
                file_gb[row] = int(r.stdout.split()[-1]) / 2**30
            results.append(run_row(row, args.device, args.threads, tmp))
            if family:
                (Path(tmp) / LOAD_FILES[family]).unlink()  # SDXL's is 6.9 GB
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": machine(args.device), "device": args.device,
            "torch": torch.__version__, "threads": args.threads, "load_file_gb": file_gb}
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": results}, indent=2) + "\n")
    mem = "peak GPU alloc" if args.device == "cuda" else "peak RSS"
    print(f"\n{meta['machine']}, torch {meta['torch']}, {meta['date']}\n")
    print(f"| row | size | minidb s | diffusers s | time ratio | minidb {mem} GB | diffusers {mem} GB | mem ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['what']} | {r['size'] or '-'} | {r['minidb_s']:.3f} | {r['diffusers_s']:.3f} | {r['time_ratio']:.2f} | "
              f"{r['minidb_mem_gb']:.2f} | {r['diffusers_mem_gb']:.2f} | {r['mem_ratio']:.2f} |")
    for r in results:
        if r["row"] in file_gb:  # the target for loading: peak RSS at most 1.3x the file
            size = file_gb[r["row"]]
            for impl in ("minidb", "diffusers"):
                extra = r["peak_rss_gb"][impl] - r["baseline_rss_gb"][impl]
                print(f"{r['row']}: {impl} peak RSS above its import baseline {extra:.2f} GB = {extra / size:.2f}x the "
                      f"{size:.2f} GB file")


if __name__ == "__main__":
    main()
