"""DreamBooth: teach a Stable Diffusion model one subject from a few photos.

    python train.py --images ./dog --class dog

The subject is named by a rare token [V] (printed at start); afterwards "a photo of a [V] dog on
the beach" draws *this* dog. To keep "a dog" meaning any dog, every step also trains on images the
frozen model drew for "a photo of a dog" (the class-specific prior-preservation loss).

--method chooses what trains: the whole UNet (full, the paper), low-rank adapters on it (lora, the
default for SDXL), or only a new word's embedding (textual-inversion); the loop is the same for all
three, and for SD 1.x, 2.x and SDXL. SDXL reads the prompt with two text encoders side by side and also
conditions on each photo's size and crop (its micro-conditioning: minidb/pipeline.py).

Several subjects train together with --concepts FILE, and several GPUs with PyTorch's launcher:

    torchrun --nproc_per_node 4 train.py --images ./dog --class dog

The run writes into its folder (a new runs/dreambooth-N each time, linked as runs/latest once it begins,
unless --out names one): checkpoints/ (resumable with --resume), validation/ grids, log.jsonl, loss.png,
and at the end what the method made, for sample.py, diffusers, AUTOMATIC1111 and ComfyUI: the
personalized model as a diffusers folder (model/) and one original-layout file (model.safetensors),
or lora.safetensors (kohya's format), or WORD.safetensors (an embedding).
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C in the seconds torch takes to import: a sentence, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted.", file=sys.stderr), os._exit(130)))

import json
import time
from contextlib import ExitStack, nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from minidb import distributed, memory, resume, runs, state
from minidb.cli import DTYPES, FinishTheStep, cpu_bf16, fail, run, warn_if_bf16_is_emulated
from minidb.data import DataError, fingerprint, load_images
from minidb.export import disk_needed, export
from minidb.dreambooth import NewWord, class_prior, dreambooth_loss, min_snr_weights, pick_identifier, pick_new_word
from minidb.fetch import default_model
from minidb.files import ModelFileError
from minidb.writes import DiskFull, atomic_write, disk_full_is_an_error, first_non_finite, room_problem
from minidb.load import load
from minidb.concepts import name_subjects, read_subjects
from minidb.graphs import TrainingGraph, can_graph_training
from minidb.lora import UNET, LoRA
from minidb.loop import (Examples, PromptText, assemble, drift_score, hold_frozen, lr_factor, optimizer_for,
                         validation_grid)
from minidb.detect import is_sdxl
from minidb.options import METHOD_LR, check, parse_args, with_method_defaults
from minidb.pipeline import DEFAULTS, added_conditioning
from minidb.schedulers import NoiseSchedule


def main(argv=None):
    args = parse_args(argv, __doc__)
    args.model = args.model or str(default_model())  # SD 1.5 once fetched, else the toy model
    problem = with_method_defaults(args, is_sdxl(args.model)) or check(args)
    if problem:
        fail(problem)
    # Under torchrun: this process's rank and card (cuda becomes cuda:LOCAL_RANK); args.device stays the flag,
    # which the run's settings record and a resume compares in every process.
    rank, world, device = distributed.start(args.device)
    numbered = args.out is None and not args.resume  # a new runs/dreambooth-N, which runs/latest will point at
    with ExitStack() as held:
        out = problem = None
        if rank == 0:  # one process owns the run folder; the others learn where it is, or why it cannot be
            try:
                out, made = runs.run_folder(args.out, args.resume)
                held.enter_context(runs.locked(out, lambda: runs.check_folder(out, args.resume, args.overwrite),
                                               made))
            except runs.RunError as e:
                problem = str(e)
        out, problem = distributed.share((out, problem))
        if problem:
            fail(problem)
        try:
            train(args, Path(out), torch.device(device), numbered)
        except (runs.RunError, DiskFull) as e:
            fail(e)
    distributed.finish()


def train(args, out, device, numbered=False):
    args.out = str(out)
    warn_if_bf16_is_emulated(device, args.mixed_precision, "--mixed-precision")
    precision = args.mixed_precision or (("bf16" if cpu_bf16() else "no") if device.type == "cpu" else
                                         "bf16" if torch.cuda.is_bf16_supported() else "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision != "no" else nullcontext())
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)  # every training draw comes from here, on the CPU

    # ---- setup: model, subjects, data ----
    try:
        model = load(args.model, device=device, prediction_type=args.prediction_type)
        resolution = args.resolution or model.resolution
        subjects = read_subjects(args)  # one from --images/--class, or several from --concepts
        for subject in subjects:
            subject.photos = load_images(subject.images, resolution, flip=args.flip, whole=args.random_crop)
        class_photos = (load_images(args.class_dir, resolution, captions=False,  # class prompts only: no captions
                                    what="class photos (--class-dir)")
                        if args.class_dir and args.prior_weight else None)
    except (ModelFileError, DataError) as e:
        fail(e)
    parts = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
    text_parts = ["text_encoder"] + (["text_encoder_2"] if model.text_encoder_2 is not None else [])  # SDXL: two
    parts.update({name: getattr(model, name) for name in text_parts})
    # A base with NaN weights would diverge only at the first step, after --overwrite had deleted the old run.
    broken = next((f"{name}.{key}" for name, module in parts.items() if (key := first_non_finite(module.state_dict()))),
                  None)
    if broken:
        fail(f"The model {args.model} holds NaN or infinite weights (first in {broken}), so training on it can only "
             "give NaN; it is damaged, so download or export it again.")
    problem = memory.training_problem(model, parts, text_parts, args, resolution, device)
    if problem:
        fail(problem)
    base_dtypes = {name: next(m.parameters()).dtype for name, m in parts.items()}  # the export keeps them
    # fp32 master weights. With mixed precision and a base that is not exported (LoRA, a new word), the
    # frozen base is kept in the compute dtype, as diffusers' scripts keep it (weight_dtype): half the
    # memory (SDXL's UNet: 5 GB, not 10), and autocast rounds it to that dtype for every matmul anyway
    # (on CUDA the norms' weights are held in fp32, with the same values: minidb/loop.py hold_frozen).
    # (Full fine-tuning exports its frozen parts, bit for bit as they came, so they stay as loaded.)
    # The VAE stays fp32: SDXL's overflows in fp16, and it only encodes the photos once.
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)  # autocast's; None: fp32
    frozen_dtype = compute_dtype if args.method != "full" else None
    for name, module in parts.items():
        if frozen_dtype and name != "vae":
            hold_frozen(module, frozen_dtype, device)
        else:
            module.to(torch.float32)
    if args.new_token and args.identifier in model.tokenizer.vocab:  # SDXL's two tokenizers share the vocabulary
        fail(f"--identifier {args.identifier} is already a token, and a new word needs a spelling of its own "
             "(diffusers refuses it too); choose another, or leave --identifier out.")
    pick = pick_new_word if args.new_token else pick_identifier
    # each subject its own [V], prompts and captions
    taken = set(runs.recorded_identifiers([args.model]))  # a model train.py made: its subjects' words
    if args.resume:  # the run's own picks stand (a run begun before picks passed over them may hold one)
        taken -= {s["identifier"] for s in runs.named_subjects(runs.saved_settings(out))}
    problem = name_subjects(subjects, model.tokenizer, pick, args.seed, prior=args.prior_weight > 0, taken=taken)
    if problem:
        fail(problem)
    rank, world = distributed.rank_and_world()
    writes = rank == 0  # only the first process writes (and speaks); the others wait at barriers
    identifier, instance_prompt, class_prompt = subjects[0].identifier, subjects[0].instance_prompt, subjects[0].class_prompt
    if writes:
        for subject in subjects:
            print(subject.describe(resolution))
        processes = f", {world} processes (torchrun)" if world > 1 else ""
        print(f"run folder: {out}\n{model.version} ({model.prediction_type}), {device}{processes}, mixed precision "
              f"{precision}")
        prior = "off" if not args.prior_weight else f"weight {args.prior_weight:g} on " + (
            f"the photos in {args.class_dir}" if args.class_dir else
            f"{args.class_images} images per class prompt, drawn once and cached in {args.class_cache}")
        scaled = " (times the images per step: --scale-lr)" if args.scale_lr else ""
        print(f"{args.method}: {args.steps} steps at lr {args.lr:g}{scaled}; class prior {prior}")
    if args.overwrite:  # only now that the model, photos and subjects are good (in every process): a bad one keeps
        distributed.barrier()  # the old run
        if writes:
            runs.clear(out)
    given = vars(args).pop("given", set())  # the flags a --resume command names (resume.keep_the_runs_own)
    settings = {**vars(args), "identifier": identifier, "instance_prompt": instance_prompt,
                "class_prompt": class_prompt, "resolution": resolution, "mixed_precision": precision,
                "base_version": model.version, "prediction_type": model.prediction_type,
                "processes": world}  # torchrun's: a resume may change it, not the global batch (resume.py)
    if args.concepts:
        settings["subjects"] = [{"images": s.images, "class": s.class_name, "identifier": s.identifier,
                                 "instance_prompt": s.instance_prompt, "class_prompt": s.class_prompt} for s in subjects]
    settings["photos"] = [fingerprint(s.photos) for s in subjects]  # a resume checks they are the same
    settings["class_photos"] = class_photos and fingerprint(class_photos)
    settings = resume.absolute_paths(settings)  # a resume from another folder finds them
    if args.resume:
        resume.check_resume_settings(out, settings, given)
    if args.scale_lr:  # diffusers' --scale_lr: the rate grows with the images per step (the settings keep --lr)
        args.lr *= args.batch_size * args.grad_accum * world

    for module in parts.values():
        module.requires_grad_(False)  # frozen unless chosen below

    @torch.no_grad()
    def encode(pixels):  # the VAE is frozen: encode each photo once, keep its Gaussian (mean, std)
        posts = [model.vae.encode(p[None].to(device)) for p in pixels]
        return torch.cat([q.mean for q in posts]).cpu(), torch.cat([q.std for q in posts]).cpu()

    # Every prompt the run trains with, encoded once unless text trains: each photo's, each class prompt.
    prompts = list(dict.fromkeys([s.prompt_of(i) for s in subjects for i in range(len(s.photos.pixels))] +
                                 [s.class_prompt for s in subjects]))
    for subject in subjects:
        subject.mean, subject.std = encode(subject.photos.pixels)
        # SDXL's micro-conditioning: each example's size as taken and its crop (minidb/data.py)
        subject.sizes = list(zip(subject.photos.original_sizes, subject.photos.crops))
        subject.prompt_ids = [prompts.index(subject.prompt_of(i)) for i in range(len(subject.photos.pixels))]
    scale = model.vae.cfg.scale_factor  # latents x this have about unit variance
    latent_side = resolution // 2 ** (len(model.vae.cfg.ch_mult) - 1)
    drawing = DEFAULTS[model.version]  # SD: DDIM at guidance 7.5; SDXL: Euler at 5.0

    def draw_prior(prompt, count, seed, label="class prior"):
        """`count` latents of `prompt` drawn by the frozen model (cached, shared between runs); `label` names
        them on the progress bar."""
        latent_bytes = 4 * model.unet.cfg.in_channels * latent_side ** 2
        with autocast, disk_full_is_an_error(args.class_cache, count * latent_bytes,
                                             "the class-prior cache", "run again (what is drawn is kept)"):
            return class_prior(model, args.model, prompt, count, resolution, drawing["sampler"], args.sample_steps,
                               drawing["guidance"], seed, args.class_cache, label=label).cpu().float()

    priors = {}  # class prompt -> (means, stds, sizes): one class prior per class prompt, shared by its subjects
    if args.prior_weight > 0:
        for prompt in dict.fromkeys(s.class_prompt for s in subjects):
            if class_photos is not None:
                means, stds = encode(class_photos.pixels)
                sizes = list(zip(class_photos.original_sizes, class_photos.crops))
            else:
                # sample_latents gives latents times the VAE's scale; kept unscaled, as the photos' VAE means are,
                # since loop.assemble scales every example once
                means = draw_prior(prompt, args.class_images, args.seed) / scale
                stds = torch.zeros_like(means)  # drawn latents are exact
                sizes = [((resolution, resolution), (0, 0))] * len(means)  # drawn whole, at this size
            priors[prompt] = (means, stds, sizes)
    # The drift watch: class images the run never trains on (another seed), with fixed noise and timesteps.
    # (Textual inversion leaves the model and every old word as they were: nothing can drift.)
    drift_sets = {prompt: draw_prior(prompt, args.drift_images, args.seed + DRIFT_SEED, "drift watch")
                  for prompt in dict.fromkeys(s.class_prompt for s in subjects)} \
        if args.drift_images and args.method != "textual-inversion" else {}
    # ---- what trains, and how: the method chooses; the loop below is the same for all ----
    trained = {}  # name -> module: what the optimizer updates and a checkpoint holds
    if args.method == "full":  # the paper: every weight of the UNet (and of the text encoders if asked)
        trained["unet"] = model.unet.requires_grad_(True).train()
        if args.train_text_encoder:
            trained.update({name: parts[name].requires_grad_(True).train() for name in text_parts})
    elif args.method == "lora":  # the base stays frozen; adapters W + (alpha/rank) B A learn
        trained["lora"] = LoRA(model, args.lora_rank, args.lora_alpha, text_encoder=args.train_text_encoder)
        trained["lora"].attach()
    if args.new_token:  # textual inversion, or pivotal tuning with full / lora: a new word learns its vectors
        trained["new_word"] = NewWord.starting_as(model, identifier, subjects[0].class_name, args.num_vectors)
        trained["new_word"].attach(model.text_encoder, model.text_encoder_2)  # SDXL: vectors for each encoder
    text_trains = args.train_text_encoder or args.new_token
    model.unet.gradient_checkpointing = args.gradient_checkpointing
    for name in text_parts:
        parts[name].encoder.gradient_checkpointing = args.gradient_checkpointing and text_trains
    text_for = PromptText(model, prompts, args.long_prompts, text_trains, autocast, device)  # indices -> text
    # On a GPU, a UNet whose own weights stay frozen (lora, a new word) runs each step's forward and backward
    # as recorded CUDA graphs (minidb/graphs.py), in one process without gradient checkpointing
    # (can_graph_training): eagerly, an SDXL step waits on its 8,100 kernels' launches.
    denoiser = model.unet
    if can_graph_training(device, args.method, args.gradient_checkpointing, world):
        lora = trained.get("lora")
        denoiser = TrainingGraph(model.unet, [p for k, p in lora.named_parameters() if k.startswith(UNET) and
                                              p.requires_grad] if lora else [],
                                 compute_dtype, forget=lora.drop_casts if lora else None)
    release_step = getattr(denoiser, "release", lambda: None)  # its memory, before drawing; recorded again after

    optimizer = optimizer_for(trained, text_parts, args, device, word_default=METHOD_LR["textual-inversion"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args.lr_schedule, args.warmup_steps, args.steps,
                                                                       lr=args.lr))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")  # fp16 gradients underflow unscaled
    schedule = NoiseSchedule(model.prediction_type)
    # What a full disk would have to make room for (minidb/export.py): checked now, and named if it fills.
    export_dtypes = {name: DTYPES[args.save_dtype] if args.save_dtype else base_dtypes[name] for name in parts}
    needed_bytes = disk_needed(trained, parts, export_dtypes, full=args.method == "full")
    disk_full = lambda: disk_full_is_an_error(out, needed_bytes, "the run (its checkpoint and model)",
                                              "continue with --resume (the last checkpoint is kept)")
    problem = distributed.share(writes and room_problem(out, needed_bytes, "the run (its checkpoint and model)",
                                                        "free some space, or choose another --out"))  # every rank stops
    if problem:
        fail(problem)

    # Which photo and prior image each example shows, and its noise (minidb/loop.py): subjects take turns.
    latent_shape = (model.unet.cfg.in_channels, latent_side, latent_side)
    examples = Examples([len(s.photos.pixels) for s in subjects],
                        [(s.class_prompt, len(priors[s.class_prompt][0]) if priors else 0) for s in subjects], generator,
                        [[tuple(w.shape[1 + d] - resolution for d in (0, 1)) for w in s.photos.whole] if args.random_crop
                         else None for s in subjects])
    drift_base, start = None, 0
    if args.resume:
        path = state.resume_point(out / "checkpoints", args.resume)
        source = path.parent.parent  # a checkpoint of another folder: it must be of this run too (a copy)
        if source.resolve() != out.resolve() and (source / "settings.json").is_file():
            resume.check_resume_settings(source, settings, given)
        resumed = state.load_state(path, trained)
        if resumed["step"] > args.steps:  # it would export that step's model, and record --steps as its length
            raise runs.RunError(f"--steps {args.steps} is fewer than the {resumed['step']} steps the run in {out} has "
                                f"already taken; pass --steps {resumed['step']} or more, or resume an earlier "
                                "checkpoint (--resume STEP).")
        if writes:  # only now that it reads back whole: a damaged one leaves the folder as it was
            state.set_aside_later(out / "checkpoints", path, resumed["step"])
        optimizer.load_state_dict(resumed["optimizer"])
        scheduler.load_state_dict(resumed["scheduler"])
        # The next step's rate from this run's schedule, not the optimizer's saved one: a larger --steps stretches
        # a decaying schedule (the saved rate is the old schedule's; at its end, for cosine, 0)
        for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * factor(scheduler.last_epoch)
        scaler.load_state_dict(resumed["scaler"])
        generator.set_state(resumed["generator"])
        examples.load(resumed["orders"])
        start, drift_base = resumed["step"], resumed.get("drift_base")
        if writes:
            print(f"resuming from {path} at step {start}")
    if start >= args.steps and writes:
        print(f"the run in {out} already reached step {start}; pass a larger --steps to continue it")

    def stop_if_not_finite(step, loss=None):
        """A NaN or infinite loss or weight poisons everything after it: stop before it is saved."""
        if loss is not None and torch.isfinite(loss):
            return
        if loss is None and all(torch.isfinite(p).all() for m in trained.values() for p in m.parameters()):
            return
        bar.close()
        kept = runs.latest_state(out / "checkpoints")
        kept = f"the last good checkpoint {kept} is kept" if kept else "no checkpoint was written"
        causes = (f"a learning rate too high (--lr {args.lr:g})" + ", too large a --prior-weight" * (args.prior_weight > 0)
                  + ", fp16 overflow (try --mixed-precision bf16)" * (precision == "fp16"))
        fail(f"The {'loss' if loss is not None else 'trained weights'} became NaN or infinite at step {step}, so "
             f"training stopped; that usually means {causes} or a base model with broken weights; {kept} and no model "
             "was exported, so start over with --overwrite once the cause is fixed.", code=1)

    def checkpoint(step):
        stop_if_not_finite(step)
        if not writes:
            return None
        extra = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                 "generator": generator.get_state(), "orders": examples.state(), "drift_base": drift_base}
        with disk_full():
            return state.save_state(out / "checkpoints", step, trained, extra, keep=args.checkpoints_keep)

    def validate(step, progress=False):
        """A fixed-seed grid, one row per subject: the subject, the subject in a new context, and the plain
        class prompt, whose drift away from the base model's class is what the prior loss should prevent;
        then a row of the --validation-prompt ones ([V]: the first subject's identifier). Each prompt gets
        --validation-images seeds."""
        if not writes:
            return
        release_step()
        rows = [[s.instance_prompt, s.new_scene, s.class_prompt] for s in subjects] + \
            ([[p.replace("[V]", identifier) for p in args.validation_prompt]] if args.validation_prompt else [])
        with autocast:
            picture = validation_grid(model, rows, args.validation_images, args.sample_steps, args.seed, resolution,
                                      args.long_prompts, progress)
        path = out / "validation" / f"step-{step:06d}.png"
        with disk_full():
            atomic_write(path, lambda tmp: picture.save(tmp, format="PNG"))
            atomic_write(path.with_suffix(".txt"), lambda tmp: Path(tmp).write_text(
                "".join(" | ".join(row) + "\n" for row in rows)))

    def drift():
        """The drift score now (minidb/loop.py): the held-out class images' prior loss."""
        if drift_sets and writes:
            release_step()
            with autocast:
                return drift_score(model, schedule, drift_sets, text_for, prompts, args.seed + DRIFT_SEED, resolution)

    # ---- the training loop ----
    log_path = out / "log.jsonl"
    with disk_full():
        if writes and log_path.exists():  # keep the log in step with the checkpoint we resume from
            runs.trim_log(log_path, start)
        if writes:
            atomic_write(out / "settings.json", lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2)))
            if numbered:  # the run has begun (a bad input found before this leaves no runs/dreambooth-N behind)
                runs.point_latest(out.parent, out)

    def crop_encode(subject, i, top, left):  # --random-crop: this example's square of the photo, encoded now
        return encode(subject.photos.whole[i][None, :, top:top + resolution, left:left + resolution])

    def forward(x_t, t, which, sizes):
        """The denoiser's prediction for a micro-batch: its prompts' text, SDXL's added conditioning, the UNet."""
        context, pooled = text_for(which)
        y = None if pooled is None else torch.cat([  # SDXL: pooled text + the example's size, crop, target size
            added_conditioning(pooled[k: k + 1], size, crop, (resolution, resolution)) for k, (size, crop) in enumerate(sizes)])
        return denoiser(x_t, t, context, y)

    # Under torchrun, DistributedDataParallel averages the gradients of what trains over the processes.
    denoise = distributed.wrap(distributed.Step(trained, forward), device)
    stop = FinishTheStep(announce=writes)  # Ctrl-C or SIGTERM: this step ends, a checkpoint is saved (minidb/cli.py)
    try:
        if drift_base is None and start == 0:
            drift_base = drift()  # the frozen base model's figure: nothing has trained yet
        per_micro = args.batch_size * world  # examples in one micro-batch, over all processes
        bar = tqdm(total=args.steps, initial=start, desc="training", disable=not writes)
        for step in range(start, args.steps):
            t0 = time.time()
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (the schedule changes it)
            losses = torch.zeros(3)  # loss, instance loss, prior loss, averaged over the micro-batches
            for micro in range(args.grad_accum):
                # every process draws the whole micro-batch's examples and keeps its own share (minidb/loop.py)
                batch = examples.draw((step * args.grad_accum + micro) * per_micro, per_micro, latent_shape,
                                      args.offset_noise)[rank * args.batch_size:(rank + 1) * args.batch_size]
                x0, noise, t, which, sizes = assemble(batch, subjects, priors, prompts, scale, device,
                                                      crop_encode if args.random_crop else None)
                x_t = schedule.add_noise(x0, noise, t)
                target = schedule.target(x0, noise, t)  # ε, or v for v-prediction models
                last = micro == args.grad_accum - 1  # DDP averages the gradients across processes once, at the end
                with autocast, (nullcontext() if last or world == 1 else denoise.no_sync()):
                    pred = denoise(x_t, t, which, sizes)
                    weights = min_snr_weights(schedule, t, args.snr_gamma) if args.snr_gamma else None
                    # instance loss + λ · prior loss (minidb/dreambooth.py, the paper's eq. 2)
                    loss, instance_loss, prior_loss = dreambooth_loss(pred, target, len(batch), args.prior_weight,
                                                                      weights)
                    scaler.scale(loss / args.grad_accum).backward()  # the gradients of the micro-batches add up
                losses += torch.stack([loss, instance_loss, prior_loss]).detach().float().cpu() / args.grad_accum
            losses = distributed.total(losses) / world  # the whole global batch's, as one process would log it
            stop_if_not_finite(step + 1, losses[0])

            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 1.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()

            row = {"step": step + 1, "loss": losses[0].item(), "instance_loss": losses[1].item(),
                   "prior_loss": losses[2].item() if priors else None, "lr": lr, "step_time": time.time() - t0}
            looks = args.validate_every and (step + 1) % args.validate_every == 0 or step + 1 == args.steps
            if looks and drift_sets and writes:
                row["drift"], row["drift_base"] = drift(), drift_base
            if writes:
                with disk_full(), open(log_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{row['loss']:.4f}", **({"drift": f"{row['drift']:.4f}"} if "drift" in row else {}))
            bar.update(1)
            if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.steps:
                checkpoint(step + 1)
            if looks and step + 1 < args.steps:
                validate(step + 1)
            if distributed.total(torch.tensor([float(bool(stop))]))[0] > 0:  # every process stops at the same step
                bar.close()
                path = checkpoint(step + 1)
                distributed.barrier()
                if writes:
                    print(f"interrupted: saved {path}; continue with the same command plus --resume", file=sys.stderr)
                sys.exit(128 + (stop.signum or signal.SIGINT))  # the shell's code: 130, or 143 for SIGTERM
    finally:
        # The caller gets its handlers back, also when training raises (a NaN loss, a full disk), but not on the
        # way out after Ctrl-C or SIGTERM: there FinishTheStep keeps a second one (SLURM and torchrun each pass
        # SIGTERM on) from cutting the exit short.
        if not stop:
            stop.restore()
    bar.close()

    # ---- save the result: the files each method gives ----
    last = max(args.steps, start)
    if writes:  # on SD this takes a while (a checkpoint with Adam's moments, a grid of drawings): say so
        made = {"full": "model", "lora": "LoRA", "textual-inversion": "embedding"}[args.method]
        print(f"saving the checkpoint of step {last}, drawing the last validation grid, exporting the {made}...")
    checkpoint(last)  # so --resume with a larger --steps can continue; it also refuses NaN weights
    validate(last, progress=True)
    if not writes:
        distributed.barrier()  # the first process exports; the others wait for it, then are done
        return
    for name in ("unet", *text_parts):
        parts[name].eval()
    with disk_full():  # the files the method made, and the run's README (minidb/export.py)
        written, sample = export(args, settings, out, model, parts, trained, subjects, last, export_dtypes)
    print(f"wrote {', '.join(map(str, written))}\ndraw with: {sample}")
    distributed.barrier()


DRIFT_SEED = 10**6  # the drift watch draws its class images with --seed + this: never the trained ones

if __name__ == "__main__":
    run(main, interrupted="interrupted: a run that has a checkpoint continues from its last one with --resume; one "
                          "stopped before its first checkpoint (a new run, or one --overwrite began again) leaves "
                          "nothing to continue.")
