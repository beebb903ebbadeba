"""minidb against diffusers, side by side: time and memory of every stage, as ratios from one run.

    python bench/run.py                  # CPU, fp32, 2 threads: sizes that fit in about 10 minutes
    python bench/run.py --device cuda    # GPU, bf16, Stable Diffusion's real sizes
    python bench/run.py --rows unet-64   # only some rows

Both implementations get identical random SD 1.5-shaped weights (minidb's modules are filled, then
the same tensors are renamed into diffusers' modules). Every (row, implementation) pair runs in a
fresh process, so each peak memory figure is its own: peak RSS on the CPU, peak allocated on the
GPU. Both processes import the same libraries, so the baseline is the same. Each time is the median
of several runs after one warm-up. On a shared, noisy machine only the ratio minidb / diffusers of
one run means anything.
"""

import argparse
import json
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
}


# ---- the worker: one row, one implementation, in its own process ----

def random_(module, seed):
    """Deterministic weights at a sane scale (±1/√fan_in), norm weights near 1."""
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.uniform_(-(p[0].numel() ** -0.5) if p.ndim > 1 else -0.1, p[0].numel() ** -0.5 if p.ndim > 1 else 0.1,
                       generator=g)
            if "norm" in name and name.endswith("weight"):
                p.add_(1.0)
    return module


def build(part, impl, device, dtype):
    """One SD 1.5 part with seeded weights, as minidb's or diffusers' module (same tensors)."""
    import diffusers
    import torch
    import transformers
    from minidb import text_encoder as te, unet as un, vae as va
    from minidb.convert import (native_to_diffusers_names, text_config_to_transformers, unet_blocks,
                                unet_config_to_diffusers, vae_attention_shape, vae_blocks, vae_config_to_diffusers)
    cls, cfg, seed = {"unet": (un.UNet, un.SD1, 0), "vae": (va.AutoencoderKL, va.SD, 1),
                      "text": (te.TextEncoder, te.SD1, 2)}[part]
    with torch.device("meta"):
        ours = cls(cfg)
    ours = random_(ours.to_empty(device="cpu"), seed).to(device, dtype).eval()
    if impl == "minidb":
        return ours
    state = ours.state_dict()
    with torch.device("meta"):
        if part == "unet":
            kw = unet_config_to_diffusers(cfg)
            kw.pop("_class_name")
            ref, names = diffusers.UNet2DConditionModel(**kw), native_to_diffusers_names(state, unet_blocks(cfg))
        elif part == "vae":
            kw = vae_config_to_diffusers(cfg, 512)
            kw.pop("_class_name")
            ref, names = diffusers.AutoencoderKL(**kw), native_to_diffusers_names(state, vae_blocks(cfg))
            state = {k: vae_attention_shape(k, v, to_diffusers=True) for k, v in state.items()}
        else:
            kw = {k: v for k, v in text_config_to_transformers(cfg).items() if k not in ("architectures", "model_type")}
            ref, names = transformers.CLIPTextModel(transformers.CLIPTextConfig(**kw)), {k: k for k in state}
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
    import torch.nn.functional as F
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    out = (lambda r: r.sample) if impl == "diffusers" else (lambda r: r)
    if row.startswith("unet"):
        unet = build("unet", impl, device, dtype)
        x, t = torch.randn(2, 4, size, size, generator=g).to(device, dtype), torch.tensor([500, 500], device=device)
        ctx = torch.randn(2, 77, 768, generator=g).to(device, dtype)
        return torch.no_grad()(lambda: out(unet(x, t, ctx)))
    if row in ("train-step", "lora-step"):
        unet = build("unet", impl, device, torch.float32).train()  # fp32 master weights, autocast on GPU
        if row == "train-step":
            params, lr = list(unet.parameters()), 5e-6
        else:  # the base frozen, rank-16 adapters on kohya's default layers; diffusers' through PEFT
            unet.requires_grad_(False)
            if impl == "minidb":
                import types
                from minidb.lora import LoRA
                model = types.SimpleNamespace(unet=unet, text_encoder=torch.nn.Module(), version="SD 1.x",
                                              prediction_type="epsilon")  # adapters on the UNet only
                params = list(LoRA(model, rank=16).attach().parameters())
            else:
                from peft import LoraConfig
                unet.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian", target_modules=[
                    "to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]))
                params = [p for p in unet.parameters() if p.requires_grad]
            lr = 1e-4
        opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        lat = size // 8
        x, target = torch.randn(2, 4, lat, lat, generator=g).to(device), torch.randn(2, 4, lat, lat, generator=g).to(device)
        t, ctx = torch.tensor([100, 700], device=device), torch.randn(2, 77, 768, generator=g).to(device)
        amp = torch.autocast(device, dtype=dtype, enabled=device == "cuda")

        def step():
            with amp:
                pred = out(unet(x, t, ctx)).float()
            instance, prior = pred.chunk(2)
            loss = F.mse_loss(instance, target[:1]) + 1.0 * F.mse_loss(prior, target[1:])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step
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
    if row == "load":
        return loader(impl, device, tmp)
    raise ValueError(row)


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


def loader(impl, device, tmp):
    import diffusers
    import torch
    from minidb.load import load
    path = Path(tmp) / "sd15-fp16.safetensors"

    def touch(modules):  # loading may be lazy (memory-mapped): count only a model whose weights are in RAM
        return sum(float(p.float().sum()) for m in modules for p in m.parameters())

    if impl == "minidb":
        return lambda: touch(parts_of(load(path, device=device)))
    os.environ["HF_HUB_OFFLINE"] = "1"
    return lambda: touch(parts_of(diffusers.StableDiffusionPipeline.from_single_file(
        path, config=str(Path(tmp) / "config"), torch_dtype=torch.float16, safety_checker=None).to(device)))


def parts_of(model):
    return [model.unet, model.vae, model.text_encoder]


def rss_gb(field):
    """VmRSS (now) or VmHWM (peak) of this process. Not getrusage's ru_maxrss: Linux carries that
    over from the parent across fork + exec, so a child would report its parent's peak."""
    line = next(line for line in open("/proc/self/status") if line.startswith(field + ":"))
    return int(line.split()[1]) / 2**20


def worker(row, impl, device, threads, tmp):
    import torch
    import diffusers  # noqa: F401  both implementations pay for the same imports
    torch.set_num_threads(threads)
    torch.set_grad_enabled(row in ("train-step", "lora-step"))
    _, cpu_size, gpu_size, cpu_runs, gpu_runs = ROWS[row]
    size, runs = (gpu_size, gpu_runs) if device == "cuda" else (cpu_size, cpu_runs)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    baseline = rss_gb("VmRSS")
    if row == "load":
        runs, fn = 1, task(row, impl, device, size, tmp)  # one load per process: a second would reuse memory
    elif row == "sample" and device == "cpu":
        fn = task(row, impl, device, size, tmp)
        fn(steps=2)  # 50 steps take a minute here: warm up with a short run
    else:
        fn = task(row, impl, device, size, tmp)
        fn()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"seconds": times, "peak_rss_gb": rss_gb("VmHWM"), "baseline_rss_gb": baseline,
            "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None}


# ---- the driver ----

def prepare_load_files(tmp):
    """An SD 1.5-shaped fp16 single file without minidb's metadata (as downloaded files are), and
    the local config folder diffusers' from_single_file needs offline."""
    import torch
    from minidb.convert import text_config_to_transformers, unet_config_to_diffusers, vae_config_to_diffusers
    from minidb.files import write_json, write_safetensors
    from minidb.load import CLIP, UNET, VAE
    from minidb.save import scheduler_config
    from minidb.tokenizer import Tokenizer
    from minidb import text_encoder as te, unet as un, vae as va
    tensors = {}
    for prefix, part in ((UNET, "unet"), (VAE, "vae"), (CLIP + "text_model.", "text")):
        module = build(part, "minidb", "cpu", torch.float16)
        tensors.update({prefix + k: v for k, v in module.state_dict().items()})
    write_safetensors(Path(tmp) / "sd15-fp16.safetensors", tensors)
    cfg = Path(tmp) / "config"
    write_json(cfg / "unet" / "config.json", unet_config_to_diffusers(un.SD1))
    write_json(cfg / "vae" / "config.json", vae_config_to_diffusers(va.SD, 512))
    write_json(cfg / "text_encoder" / "config.json", text_config_to_transformers(te.SD1))
    write_json(cfg / "scheduler" / "scheduler_config.json", scheduler_config("epsilon"))
    Tokenizer.for_version("SD 1.x").save(cfg / "tokenizer")
    write_json(cfg / "model_index.json", {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
               "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDIMScheduler"],
               "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False})
    return (Path(tmp) / "sd15-fp16.safetensors").stat().st_size


def machine(device):
    import torch
    if device == "cuda":
        return torch.cuda.get_device_name()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    return f"{cpu}, {os.cpu_count()} cores"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--json", default=str(ROOT / "bench" / "results.json"), help="where to write the figures")
    p.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)  # ROW IMPL TMP: internal
    p.add_argument("--prepare", help=argparse.SUPPRESS)  # TMP: internal
    args = p.parse_args()
    if args.prepare:
        print(prepare_load_files(args.prepare))
        return
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.device, args.threads, args.worker[2])))
        return
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for, but PyTorch sees no CUDA GPU.")
    with tempfile.TemporaryDirectory() as tmp:
        file_gb = None
        if "load" in args.rows:  # in a child process, so this driver stays small
            r = subprocess.run([sys.executable, __file__, "--prepare", tmp], capture_output=True, text=True)
            if r.returncode:
                sys.exit(f"error: preparing the checkpoint failed:\n{r.stderr[-3000:]}")
            file_gb = int(r.stdout.split()[-1]) / 2**30
        results = []
        for row in args.rows:
            figures = {}
            for impl in ("minidb", "diffusers"):
                r = subprocess.run([sys.executable, __file__, "--device", args.device, "--threads", str(args.threads),
                                    "--worker", row, impl, tmp], capture_output=True, text=True)
                if r.returncode:
                    sys.exit(f"error: {row} / {impl} failed:\n{r.stderr[-3000:]}")
                figures[impl] = json.loads(r.stdout.strip().splitlines()[-1])
            m, d = figures["minidb"], figures["diffusers"]
            med = {k: statistics.median(v["seconds"]) for k, v in figures.items()}
            mem = "peak_gpu_gb" if args.device == "cuda" else "peak_rss_gb"
            results.append({"row": row, "what": ROWS[row][0], "size": ROWS[row][2 if args.device == "cuda" else 1],
                            "baseline_rss_gb": {"minidb": m["baseline_rss_gb"], "diffusers": d["baseline_rss_gb"]},
                            "minidb_s": med["minidb"], "diffusers_s": med["diffusers"],
                            "time_ratio": med["minidb"] / med["diffusers"], "minidb_mem_gb": m[mem],
                            "diffusers_mem_gb": d[mem], "mem_ratio": m[mem] / d[mem], "runs": len(m["seconds"]),
                            "all_seconds": {"minidb": m["seconds"], "diffusers": d["seconds"]}})
            r = results[-1]
            print(f"{row:15s} minidb {r['minidb_s']:8.3f}s {r['minidb_mem_gb']:6.2f}GB | diffusers {r['diffusers_s']:8.3f}s "
                  f"{r['diffusers_mem_gb']:6.2f}GB | time x{r['time_ratio']:.2f} mem x{r['mem_ratio']:.2f}", flush=True)
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
    if file_gb:
        load = next(r for r in results if r["row"] == "load")
        for impl in ("minidb", "diffusers"):
            extra = load[f"{impl}_mem_gb"] - load["baseline_rss_gb"][impl]
            print(f"load: {impl} peak RSS above its import baseline {extra:.2f} GB = {extra / file_gb:.2f}x the "
                  f"{file_gb:.2f} GB file")


if __name__ == "__main__":
    main()
