"""The machinery of train.py's loop, so that the loop itself reads as the story: which examples each
step takes, with which random draws, and as which tensors; how the frozen base is held under mixed
precision; the prompts' text; the optimizer and its learning-rate schedule; the validation grid; the
drift score.

Examples. A step trains on --batch-size subject examples and as many class-prior examples, in
--grad-accum micro-batches, across the processes of a torchrun launch. Every process draws the
random numbers of the whole global batch, one example after another from one generator, and keeps
its own share: so the draws of an example do not depend on how the batch is split (one process at
batch 2 and two processes at batch 1 train on the same numbers), and every process's generator stays
in step, so a checkpoint written by the first one resumes them all.

Subjects take turns: global example e shows subject e mod S (--concepts), so none is starved; each
subject walks through its photos, and each class prior through its images, in a fresh random order
per pass (the orders are saved, so a resumed run continues them exactly).
"""

import math

import torch
from PIL import Image
from tqdm import tqdm

from minidb.graphs import UnetGraph
from minidb.pipeline import DEFAULTS, added_conditioning, decode, encode_tokens, grid, sample_latents, token_ids
from minidb.schedulers import NUM_TRAIN_TIMESTEPS

SCHEDULES = ("constant", "cosine", "linear", "polynomial")


def lr_factor(schedule, warmup, total, lr=1.0, lr_end=1e-7, power=1.0):
    """step -> the factor on the learning rate, as diffusers' get_scheduler computes it (its
    train_dreambooth.py --lr_scheduler, --lr_warmup_steps): a linear warmup from 0 over `warmup` steps,
    then constant, a half cosine to 0, a straight line to 0, or a polynomial decay to lr_end."""
    def factor(step):
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "constant":
            return 1.0
        if schedule == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        if schedule == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if step > total:  # polynomial
            return lr_end / lr
        return ((lr - lr_end) * (1 - progress) ** power + lr_end) / lr
    return factor


class Examples:
    """Which photo and which prior image each example of the run shows, and its noise.

    `instances` holds, per subject, how many photos it has; `priors`, per subject, which class prior
    it draws from (subjects of one class share one) and that prior's size (0: no prior loss); `rooms`
    (--random-crop), per subject and photo, how far its square crop can move (down, right), or None."""

    def __init__(self, instances, priors, generator, rooms=None):
        self.instances, self.priors, self.generator = instances, priors, generator
        self.rooms = rooms or [None] * len(instances)
        self.orders = {}  # pool name -> (the current pass's order, how many of the pool were taken)

    def _next(self, pool, n):
        order, taken = self.orders.get(pool, (torch.empty(0, dtype=torch.long), 0))
        if taken % n == 0 or len(order) != n:
            order = torch.randperm(n, generator=self.generator)
        self.orders[pool] = (order, taken + 1)
        return order[taken % n].item()

    def draw(self, first, count, latent_shape, offset_noise=0.0):
        """The examples first .. first+count-1 of the run: per example a dict with the subject, the
        photo, the prior image (or None), and for each of the two its VAE-sample noise, the diffusion
        noise and the timestep, drawn in one fixed order."""
        out = []
        for e in range(first, first + count):
            s = e % len(self.instances)
            example = {"subject": s, "photo": self._next(f"instance-{s}", self.instances[s])}
            prior, n_prior = self.priors[s]
            example["prior"] = self._next(f"prior-{prior}", n_prior) if n_prior else None
            if self.rooms[s]:  # the top-left corner of this example's crop
                example["crop"] = tuple(torch.randint(0, room + 1, (), generator=self.generator).item()
                                        for room in self.rooms[s][example["photo"]])
            for part in ("photo", "prior") if n_prior else ("photo",):
                eps, noise = (torch.randn(latent_shape, generator=self.generator) for _ in range(2))
                if offset_noise:  # shifts whole channels, so the model learns to change overall brightness
                    noise = noise + offset_noise * torch.randn(latent_shape[:1] + (1, 1), generator=self.generator)
                t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (), generator=self.generator)
                example[part + "_draws"] = (eps, noise, t)
            out.append(example)
        return out

    def state(self):
        return {pool: {"order": order, "taken": taken} for pool, (order, taken) in self.orders.items()}

    def load(self, state):
        self.orders = {pool: (s["order"], s["taken"]) for pool, s in state.items()}


def assemble(batch, subjects, priors, prompts, scale, device, crop_encode=None):
    """Drawn examples -> x0, noise, t, prompt indices and SDXL sizes (each example's size as taken and
    its crop), the subject examples first, then their class-prior examples (the order dreambooth_loss
    expects). A subject carries its photos' VAE Gaussians (.mean, .std), .sizes and .prompt_ids;
    `priors` maps a class prompt to (means, stds, sizes) of its images. With --random-crop,
    `crop_encode(subject, photo, top, left)` encodes the example's square of the photo."""
    x0, noise, t, which, sizes = [], [], [], [], []
    for part in ("photo", "prior"):
        for example in (e for e in batch if e.get(part) is not None):
            subject, i = subjects[example["subject"]], example[part]
            if part == "prior":
                means, stds, prior_sizes = priors[subject.class_prompt]
                mean, std, size, prompt = means[i], stds[i], prior_sizes[i], prompts.index(subject.class_prompt)
            elif crop_encode:
                (mean, std), size = crop_encode(subject, i, *example["crop"]), (
                    subject.photos.original_sizes[i], example["crop"])
                mean, std, prompt = mean[0], std[0], subject.prompt_ids[i]
            else:
                mean, std, size, prompt = subject.mean[i], subject.std[i], subject.sizes[i], subject.prompt_ids[i]
            eps, n, step_t = example[part + "_draws"]
            x0.append((mean + std * eps) * scale)  # a VAE sample, scaled
            noise.append(n)
            t.append(step_t)
            which.append(prompt)
            sizes.append(size)
    return torch.stack(x0).to(device), torch.stack(noise).to(device), torch.stack(t).to(device), \
        torch.tensor(which), sizes


def hold_frozen(module, dtype, device):
    """A frozen part under mixed precision, in place: its weights in `dtype`, the compute dtype (half the
    memory of fp32, as diffusers' scripts hold theirs: weight_dtype), since autocast rounds them to it for
    every matmul anyway. Except, on CUDA, the LayerNorms' and GroupNorms' weights and biases: CUDA's
    autocast runs the norms in fp32, casting them up at every call (two kernels a norm, each forward: 512
    of an SDXL LoRA step's 8,599, bench/op_count.py). They are held in fp32, rounded to `dtype` first, so
    every norm computes with the very numbers it did before. (The CPU's autocast runs norms in `dtype`: there they
    stay in it.) Returns the module."""
    module.to(dtype)
    if torch.device(device).type == "cuda":
        for m in module.modules():
            if isinstance(m, (torch.nn.LayerNorm, torch.nn.GroupNorm)):
                m.float()
    return module


def optimizer_for(trained, text_parts, args, device, word_default):
    """AdamW with diffusers' DreamBooth settings over what trains, one learning rate per side: --lr for
    the UNet side (its weights or adapters), --text-encoder-lr (else --lr) for the text side, and for
    a new word --text-encoder-lr, else `word_default` (textual inversion's rate), or under --method
    textual-inversion its --lr. 8-bit with --use-8bit-adam; on CUDA one fused kernel updates all."""
    word_lr = args.lr if args.method == "textual-inversion" else args.text_encoder_lr or word_default
    rates, params = {"unet": args.lr, "text": args.text_encoder_lr or args.lr, "word": word_lr}, {}
    for name, module in trained.items():
        for key, p in module.named_parameters():
            side = "word" if name == "new_word" else "text" if name in text_parts or key.startswith("lora_te") else "unet"
            params.setdefault(side, []).append(p)
    groups = [{"params": ps, "lr": rates[side]} for side, ps in params.items()]
    if args.use_8bit_adam:
        import bitsandbytes
        return bitsandbytes.optim.AdamW8bit(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8, fused=torch.device(device).type == "cuda")


class PromptText:
    """The text side of every prompt the run trains with: prompt indices -> (context, pooled or None),
    as sample.py encodes them (minidb/pipeline.py). Encoded once and kept when the text side is frozen;
    when it trains, each micro-batch's prompts are encoded afresh, each prompt once, with gradients."""

    def __init__(self, model, prompts, long_prompts, trains, autocast, device):
        self.model, self.trains, self.device = model, trains, device
        self.ids = [token_ids(tokenizer, prompts, long_prompts).to(device)  # (P, 77), or (P, k, 77) when long
                    for tokenizer in (model.tokenizer, model.tokenizer_2) if tokenizer is not None]  # SDXL: two
        if not trains:
            with torch.no_grad(), autocast:
                self.kept = self.encode(torch.arange(len(prompts), device=device))

    def encode(self, which):
        return encode_tokens(self.model, *(ids[which] for ids in self.ids))

    def __call__(self, which):
        if self.trains:
            unique, inverse = which.unique(return_inverse=True)
            context, pooled = self.encode(unique.to(self.device))
        else:
            (context, pooled), inverse = self.kept, which
        inverse = inverse.to(self.device)
        return context[inverse], None if pooled is None else pooled[inverse]


def validation_grid(model, rows, n, steps, seed, resolution, long_prompts, progress=False):
    """The validation picture: a row per list of prompts, `n` seeds per prompt, each drawn as sample.py
    draws by default (DDIM at 7.5, SDXL Euler at 5.0); a short row is padded with white. `progress`: a bar
    counting the prompts drawn (the last grid, drawn after the training bar has closed)."""
    model.unet.eval()
    graph = UnetGraph(model.unet)  # on a GPU (without autocast): one recording for the whole grid
    with tqdm(total=sum(map(len, rows)), desc="validation grid", disable=not progress) as bar:
        def draw(prompt):  # its n pictures
            drawn = decode(model, sample_latents(model, prompt, n=n, steps=steps, seed=seed, height=resolution,
                                                 width=resolution, progress=False, long_prompts=long_prompts,
                                                 graph=graph, **DEFAULTS[model.version]))
            bar.update(1)
            return drawn
        images = [[draw(p) for p in row] for row in rows]
    model.unet.train()
    cols = max(len(row) for row in rows) * n
    blank = Image.new("RGB", (resolution, resolution), "white")
    return grid([tile for row in images for tile in ([im for per_prompt in row for im in per_prompt] + [blank] * cols)[:cols]],
                cols=cols)


@torch.no_grad()
def drift_score(model, schedule, sets, text_for, prompts, seed, resolution, batch=4):
    """The drift score: the prior-preservation loss of `model` as it is now, on class-prior latents it
    never trained on (`sets`: class prompt -> latents), with fixed noise (drawn from `seed`) and
    timesteps spread evenly over the schedule. It rises as "a dog" turns into *this* dog. The mean over
    the latents of each class prompt, then over the prompts, in fp32; `text_for` as PromptText."""
    model.unet.eval()
    device = next(model.unet.parameters()).device
    scores = []
    for prompt, latents in sets.items():
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        t = torch.linspace(0, NUM_TRAIN_TIMESTEPS - 1, len(latents)).round().long()
        context, pooled = text_for(torch.full((len(latents),), prompts.index(prompt)))
        total = 0.0
        for k in range(0, len(latents), batch):
            x0, n, step = (v[k:k + batch].to(device) for v in (latents, noise, t))
            y = None if pooled is None else torch.cat([
                added_conditioning(pooled[k + j:k + j + 1], (resolution, resolution), (0, 0), (resolution, resolution))
                for j in range(len(x0))])
            pred = model.unet(schedule.add_noise(x0, n, step), step, context[k:k + batch], y)
            total += (pred.float() - schedule.target(x0, n, step).float()).square().mean(dim=(1, 2, 3)).sum().item()
        scores.append(total / len(latents))
    model.unet.train()
    return sum(scores) / len(scores)
