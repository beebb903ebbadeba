"""The rows of bench/run.py: what each measures, at which size, and the worker that measures one row
with one implementation (minidb or diffusers) in a process of its own. Both implementations get the
same weights (bench/models.py), the same inputs and the same optimizer."""

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.checkpoints import LOAD_FILES  # noqa: E402
from bench.models import build, parts_of, rss_gb  # noqa: E402

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


def task(row, impl, device, size, tmp, cfg=None):
    """Build what the row needs; return a function that runs the measured work once. impl "diffusers-bf16":
    diffusers with PEFT's adapters left in bf16, as its scripts train them under bf16 (lora_params).
    cfg: a UNet config of minidb's in place of the SDXL LoRA rows' preset (a narrow one, to try a script
    on the CPU)."""
    import torch
    from minidb.loop import hold_frozen
    impl, peft_fp32 = impl.removesuffix("-bf16"), not impl.endswith("-bf16")
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
            params, lr = lora_params(unet.requires_grad_(False), impl, LORA_KOHYA, "SD 1.x", peft_fp32), 1e-4
        ctx = torch.randn(2, 77, 768, generator=g).to(device)
        return train_step(lambda x, t: out(unet(x, t, ctx)), params, lr, device, size, g)
    if row.startswith("sdxl-lora-step"):
        # As diffusers' train_dreambooth_lora_sdxl.py: the frozen UNet in the mixed-precision dtype
        # (bf16 on the GPU), autocast; the adapters in fp32 on both sides (lora_params).
        unet = build("unet", impl, device, dtype, "SDXL", cfg).train().requires_grad_(False)
        if impl == "minidb":  # as train.py holds it: on CUDA, its norms' weights in fp32 (rounded to bf16)
            hold_frozen(unet, dtype, device)
        params = lora_params(unet, impl, LORA_SDXL, "SDXL", peft_fp32)
        if row.endswith("-gc"):
            if impl == "minidb":
                unet.gradient_checkpointing = True
            else:
                unet.enable_gradient_checkpointing()
        # The text side as both scripts hand it over: from text encoders held in that dtype too.
        ctx, pooled, time_ids = sdxl_conditioning(g, device, dtype)
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


def lora_params(unet, impl, targets, version, peft_fp32=True, loras=None):
    """Rank-16 adapters (alpha 16) on `targets` of a frozen UNet; returns the trained parameters.
    minidb's LoRA targets kohya's default set; adapters outside `targets` are dropped before attaching.
    minidb's adapters are fp32. PEFT makes them in the base's dtype; diffusers' LoRA scripts cast them to
    fp32 (cast_training_params) only under --mixed_precision fp16, so under bf16 they train in bf16.
    peft_fp32 (the default) casts them up, for equal settings; False leaves them as PEFT made them.
    `loras`, a list: minidb's LoRA is appended to it."""
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
        if loras is not None:
            loras.append(lora)
        return list(lora.attach().parameters())
    from peft import LoraConfig
    unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=targets))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params if peft_fp32 else []:  # fp32 adapters on a bf16 base, as minidb's
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
    from minidb.graphs import UnetGraph
    from minidb.load import StableDiffusion
    from minidb.pipeline import decode, sample_latents
    from minidb.save import scheduler_config
    from minidb.tokenizer import Tokenizer
    parts = {p: build(p, impl, device, dtype) for p in ("unet", "vae", "text")}
    prompt = "a photo of sks dog on the beach"
    if impl == "minidb":
        model = StableDiffusion(Tokenizer.for_version("SD 1.x"), parts["text"], parts["vae"], parts["unet"],
                                "SD 1.x", "epsilon")
        graph = UnetGraph(model.unet)  # kept from picture to picture, as sample.py keeps it
        return lambda steps=50: decode(model, sample_latents(model, prompt, steps=steps, guidance=7.5, seed=0, height=size,
                                                             width=size, progress=False, graph=graph))
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
    diffusers by force_upcast). On the GPU minidb replays its UNet steps as a CUDA graph, as sample.py does
    (minidb/graphs.py). The function returns the seconds of its two phases: prompt encoding + denoising,
    and decoding to a PIL image."""
    import diffusers
    import torch
    import transformers
    from minidb.graphs import UnetGraph
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
        graph = UnetGraph(model.unet)  # kept from picture to picture, as sample.py keeps it

        def run(steps=SDXL_STEPS):
            t0 = time.perf_counter()
            latents = sample_latents(model, prompt, steps=steps, guidance=5.0, seed=0, height=size, width=size,
                                     sampler="euler", progress=False, graph=graph)
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
    if family == "SDXL":
        return lambda: touch(parts_of(diffusers.StableDiffusionXLPipeline.from_single_file(
            path, config=str(Path(tmp) / "config-xl"), torch_dtype=torch.float16).to(device)))
    return lambda: touch(parts_of(diffusers.StableDiffusionPipeline.from_single_file(
        path, config=str(Path(tmp) / "config"), torch_dtype=torch.float16, safety_checker=None).to(device)))


TRAINING = ("train-step", "lora-step", "sdxl-lora-step", "sdxl-lora-step-gc")


def worker(row, impl, device, threads, tmp, runs=None):
    os.environ["HF_HUB_OFFLINE"] = "1"  # no row reaches the Hub; huggingface_hub reads this once, on import
    import torch
    import diffusers  # noqa: F401  both implementations pay for the same imports
    torch.set_num_threads(threads)
    torch.set_grad_enabled(row in TRAINING)
    _, cpu_size, gpu_size, cpu_runs, gpu_runs = ROWS[row]
    size, default_runs = (gpu_size, gpu_runs) if device == "cuda" else (cpu_size, cpu_runs)
    runs = runs or default_runs
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
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            # Reserved counts what allocated leaves out: a CUDA graph's private pool (sampling keeps one
            # recorded since the warm-up), whose memory no live tensor holds between replays.
            "peak_gpu_reserved_gb": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else None}
