"""The toy world's base model: Stable Diffusion in miniature, trained from scratch on 2 CPU cores
(`python -m minidb.toy.lab train-base`).

The same tokenizer, text encoder, VAE, UNet and noise schedule as SD, at small configs, trained in
two stages (as SD was):
1. the VAE learns to compress 64x64 pictures into 16x16x4 latents (reconstruction + a tiny KL term);
   its latents are then rescaled so that, times SD's 0.18215, they have unit variance, so every
   other part of minidb treats the toy model exactly like SD;
2. the text encoder and UNet learn to denoise those latents given captions. Captions drop their
   colour and their place at random (so "a photo of a cup" means any cup) and are empty 10% of the
   time (so classifier-free guidance works).
"""

import dataclasses
import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from minidb import text_encoder as te, unet as un, vae as va
from minidb.cli import fail
from minidb.files import ModelFileError, json_loads, read_tensors
from minidb.writes import first_non_finite, write_json, write_safetensors
from minidb.load import StableDiffusion, load
from minidb.runs import CHECKPOINT, latest_state, saved_settings
from minidb.state import load_state, save_state
from minidb.save import save_single_file
from minidb.schedulers import NUM_TRAIN_TIMESTEPS, NoiseSchedule
from minidb.tokenizer import Tokenizer
from minidb.toy.world import Scene, caption, random_scene, render, varied_scene

SIZE = 64  # image side; the VAE downsamples 4x, so the UNet sees 16x16 latents
TOY_VAE = va.VAEConfig(ch=64, ch_mult=(1, 2, 2), num_res_blocks=1)
TOY_UNET = un.UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2),
                         num_heads=4, context_dim=64, sample_size=SIZE // 4)
TOY_TEXT = te.TextEncoderConfig(width=64, layers=3, heads=4, mlp_width=256)  # OpenAI-CLIP style: "SD 1.x" family


def to_tensor(images):
    """PIL images -> (N, 3, H, W) in [-1, 1]."""
    import numpy as np
    return torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


def world_batch(rng, n, varied=0.0):
    """n fresh world pictures; a share `varied` of them with two-colour paint jobs (the VAE's extras)."""
    scenes = [varied_scene(rng) if varied and rng.random() < varied else random_scene(rng) for _ in range(n)]
    return to_tensor([render(s, SIZE) for s in scenes]), scenes


def varied_caption(scene, rng):
    """The caption with its colour and/or place dropped at random, or empty (for guidance)."""
    if rng.random() < 0.1:
        return ""
    text = caption(scene)
    if rng.random() < 0.3:  # no colour: "a photo of a cup on the beach"
        text = text.replace(f" {scene.colour} ", " ").replace("a photo of an ", "a photo of a ")
    if rng.random() < 0.3:  # no place: "a photo of a red cup"
        text = text.split(f" {scene.cls} ")[0] + f" {scene.cls}"
    return text


# ---- the base model's two stages, resumable: each checkpoints into the work folder ----

def resume(folder, modules, opt, rng):
    """Restore the newest checkpoint in `folder`, if any; return (its step, its extra state)."""
    state = latest_state(folder)
    if state is None:
        return 0, {}
    extra = load_state(state, modules, required=("step", "optimizer", "generator", "python_rng"))
    opt.load_state_dict(extra["optimizer"])
    torch.set_rng_state(extra["generator"])
    rng.setstate(extra["python_rng"])
    print(f"resuming {folder.name} at step {extra['step']}")
    return extra["step"], extra


def checkpoint(folder, step, modules, opt, rng, **more):
    save_state(folder, step, modules, {"optimizer": opt.state_dict(), "generator": torch.get_rng_state(),
                                       "python_rng": rng.getstate(), **more})


def train_vae(steps, batch, seed, lr=1e-3, varied=0.0, kl_weight=1e-4, ch=TOY_VAE.ch, folder=None, save_every=100):
    torch.manual_seed(seed)
    rng = random.Random(seed)
    vae = va.AutoencoderKL(dataclasses.replace(TOY_VAE, ch=ch))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = resume(folder, {"vae": vae}, opt, rng)[0] if folder else 0
    for step in (bar := tqdm(range(start, steps), initial=start, total=steps, desc="1/2 VAE")):
        images, _ = world_batch(rng, batch, varied)
        post = vae.encode(images)
        recon = vae.decode(post.sample())
        # reconstruction + a small KL to N(0, I), as SD's VAE (weight 1e-6 there; larger here since
        # there is no adversarial term to keep the latents tidy)
        kl = 0.5 * (post.mean.square() + post.std.square() - 1 - post.logvar).mean()
        loss = F.l1_loss(recon, images) + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for g in opt.param_groups:  # cosine decay
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        opt.step()
        bar.set_postfix(l1=f"{F.l1_loss(recon, images).item():.4f}")
        if folder and ((step + 1) % save_every == 0 or step + 1 == steps):
            checkpoint(folder, step + 1, {"vae": vae}, opt, rng)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def rescale_latents(vae, seed, n=512):
    """Rescale the latent space so that latents * 0.18215 have unit std, by folding a factor into
    quant_conv (mean and log-variance) and post_quant_conv: the same autoencoder, new units."""
    images, _ = world_batch(random.Random(seed), n)
    std = (vae.encode(images).mean * vae.cfg.scale_factor).std().item()
    c = 1 / std  # latents become c times larger
    z = TOY_VAE.z_channels
    vae.quant_conv.weight[:z] *= c
    vae.quant_conv.bias[:z] *= c
    vae.quant_conv.bias[z:] += 2 * math.log(c)  # std scales by c: log-variance shifts by 2 ln c
    vae.post_quant_conv.weight /= c
    return std


@torch.no_grad()
def encode_world(vae, seed, n, cache=None):
    """n fixed world scenes and the frozen VAE's latent mean and std of each, kept in `cache` (a
    safetensors file) so that a resumed run does not encode them again."""
    if cache and cache.is_file():
        tensors, meta = read_tensors(cache)
        try:
            scenes = [Scene(**{**s, "paint": tuple(s["paint"])}) for s in json_loads(meta["scenes"])]
            return scenes, tensors["means"], tensors["stds"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{cache} is not the encoded world train-base wrote (it is damaged); delete it to "
                                 "encode the world again.") from None
    rng, scenes, means, stds = random.Random(seed), [], [], []
    for start in tqdm(range(0, n, 250), desc="encoding the world"):
        images, s = world_batch(rng, min(250, n - start))
        post = vae.encode(images)
        scenes += s
        means.append(post.mean)
        stds.append(post.std)
    # contiguous: the encoder may hand back channels-last tensors, and randn_like follows the layout,
    # so a resumed run (which reads the cache) would draw other noise
    means, stds = torch.cat(means).contiguous(), torch.cat(stds).contiguous()
    if cache:
        write_safetensors(cache, {"means": means, "stds": stds},
                          metadata={"scenes": json.dumps([dataclasses.asdict(s) for s in scenes])})
    return scenes, means, stds


def train_unet(vae, steps, batch, seed, lr=5e-4, dataset=20000, ema_decay=0.999, folder=None, save_every=250):
    torch.manual_seed(seed)
    rng = random.Random(seed + 2)  # captions
    tokenizer = Tokenizer.for_version("SD 1.x")
    unet, text = un.UNet(TOY_UNET).train(), te.TextEncoder(TOY_TEXT).train()
    # A fixed set of scenes, encoded once (the VAE is frozen): latent mean and std per picture.
    scenes, means, stds = encode_world(vae, seed + 1, dataset, folder / "latents.safetensors" if folder else None)
    params = list(unet.parameters()) + list(text.parameters())
    ema = [p.detach().clone() for p in params]  # an exponential moving average of the weights samples better
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    start = 0
    if folder:
        start, extra = resume(folder, {"unet": unet, "text": text}, opt, rng)
        ema = extra.get("ema", ema)
    schedule = NoiseSchedule("epsilon")
    for step in (bar := tqdm(range(start, steps), initial=start, total=steps, desc="2/2 UNet + text encoder")):
        idx = torch.randint(0, len(scenes), (batch,))
        x0 = (means[idx] + stds[idx] * torch.randn_like(means[idx])) * va.LATENT_SCALE  # the toy VAE's own
        ids = tokenizer([varied_caption(scenes[i], rng) for i in idx.tolist()])
        noise = torch.randn_like(x0)
        t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (batch,))
        loss = F.mse_loss(unet(schedule.add_noise(x0, noise, t), t, text(ids)), noise)
        if not torch.isfinite(loss):  # the weights have diverged: every later step and the model would be NaN
            bar.close()
            fail(f"The UNet's loss became {loss.item()} at step {step + 1}, so training cannot go on; lower --lr "
                 "and start over with --overwrite.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:  # warmup, then cosine decay to 10%
            g["lr"] = lr * min(1, (step + 1) / 200) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        opt.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            for e, p in zip(ema, params):
                e.lerp_(p, 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if folder and ((step + 1) % save_every == 0 or step + 1 == steps):
            checkpoint(folder, step + 1, {"unet": unet, "text": text}, opt, rng, ema=ema)
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return unet.eval(), text.eval(), tokenizer


RECIPE = ("seed", "vae_steps", "vae_varied", "vae_ch", "vae_from", "steps", "batch", "lr", "pictures")  # what --resume keeps
WORK_FILES = {"settings.json", "vae", "unet", "vae.safetensors"}  # all train-base writes in --work


def saved_recipe(work):
    """The recipe in work/settings.json, or None where there is none that train-base wrote."""
    saved = saved_settings(work)  # {} when missing or unreadable
    return saved if set(saved) == set(RECIPE) else None


def work_problem(work, resume, overwrite):
    """One sentence if --work may not be used as asked, else None. train-base clears its folder to start,
    so it only ever clears one that is empty or is recognisably its own: nothing in it but train-base's
    files (and their temporary files), and either its settings.json is train-base's recipe or it holds
    train-base's checkpoints. A mistyped --work (., runs, a thesis folder) must never cost a user's files."""
    if resume and overwrite:
        return "--resume continues a run and --overwrite deletes it; pass one of them."
    if work.exists() and not work.is_dir():
        return f"--work {work} is a file, not a folder; choose another --work."
    names = sorted(p.name for p in work.iterdir()) if work.exists() else []
    if not names:
        return f"--resume found no train-base run in {work}; start one without --resume." if resume else None
    foreign = [n for n in names if n not in WORK_FILES
               and not any(n.startswith(f".{f}.") and n.endswith(".tmp") for f in WORK_FILES)]  # atomic_write's
    recipe, checkpoints = saved_recipe(work), any(any((work / stage).glob(CHECKPOINT)) for stage in ("vae", "unet"))
    if foreign or (recipe is None and not checkpoints):
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "") if foreign else \
            "its settings.json is missing or is not a train-base recipe"
        return f"--work {work} holds files that are not a train-base run ({shown}); choose a new or empty folder."
    if resume and recipe is None:
        return (f"--resume cannot read {work / 'settings.json'} (it is damaged, or not the recipe train-base wrote), "
                "so it cannot continue the run as it began; start over with --overwrite.")
    if not resume and not overwrite:
        return f"{work} holds an earlier train-base run; continue it with --resume, or start over with --overwrite."
    return None


def load_vae(path, ch):
    """The VAE stage 1 wrote into the work folder."""
    vae = va.AutoencoderKL(dataclasses.replace(TOY_VAE, ch=ch))
    try:
        vae.load_state_dict(read_tensors(path)[0], strict=True)
    except RuntimeError:  # torch's message lists every missing and unexpected name: hundreds of lines
        raise ModelFileError(f"{path} is not the VAE of this run (its tensors do not fit a --vae-ch {ch} VAE); "
                             "delete it to train stage 1 again, or start over with --overwrite.") from None
    return vae.eval().requires_grad_(False)


def train_base(args):
    """Both stages, checkpointed into args.work (vae/, unet/); --resume continues where a run stopped."""
    t0, work = time.time(), Path(args.work)
    recipe = {k: getattr(args, k) for k in RECIPE}
    problem = work_problem(work, args.resume, args.overwrite)
    if problem:
        fail(problem)
    # A VAE to reuse is loaded before the work folder is touched, so that a bad file loses no earlier run.
    given_vae = load(args.vae_from, dtype=torch.float32).vae.requires_grad_(False) if args.vae_from else None
    if args.resume:
        saved = saved_recipe(work)
        changed = [k for k in RECIPE if saved[k] != recipe[k]]
        if changed:
            k = changed[0]
            fail(f"--{k.replace('_', '-')} is {recipe[k]!r} now but the run in {work} started with {saved[k]!r}; "
                 "resume with the same recipe, or start over with --overwrite.")
    else:
        for path in work.iterdir() if work.exists() else ():  # work_problem found it empty, or train-base's own
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / "settings.json", recipe)
    vae_file = work / "vae.safetensors"
    if given_vae is not None:  # stage 1 is deterministic by seed: an earlier run's VAE is the same one
        vae = given_vae
        print(f"VAE taken from {args.vae_from}")
    elif vae_file.is_file():
        vae = load_vae(vae_file, args.vae_ch)
        print(f"stage 1 was finished: VAE taken from {vae_file}")
    else:
        vae = train_vae(args.vae_steps, 16, args.seed, varied=args.vae_varied, ch=args.vae_ch, folder=work / "vae",
                        save_every=args.save_every)
        std = rescale_latents(vae, args.seed)
        write_safetensors(vae_file, vae.state_dict())
        print(f"VAE done in {(time.time() - t0) / 60:.1f} min; latent std was {std:.3f}, now rescaled to 1")
    unet, text, tokenizer = train_unet(vae, args.steps, args.batch, args.seed, lr=args.lr, dataset=args.pictures,
                                       folder=work / "unet", save_every=args.save_every)
    # Checked as written, in fp16: a weight past fp16's 65504 is infinite there, and draws black as NaN does.
    parts = {"unet": unet, "text_encoder": text, "vae": vae}
    broken = next((f"{name}.{key}" for name, part in parts.items() if (key := first_non_finite(
        {k: v.half() for k, v in part.state_dict().items() if v.is_floating_point()}))), None)
    if broken:
        fail(f"The trained model has NaN or infinite weights (first in {broken}), so {args.out} was not written "
             "(an earlier file there is kept); lower --lr and start over with --overwrite.")
    model = StableDiffusion(tokenizer, text, vae, unet, "SD 1.x", "epsilon")
    save_single_file(model, args.out, dtype=torch.float16)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MB) after {(time.time() - t0) / 60:.1f} min "
          f"in this process; {work} can be removed")
