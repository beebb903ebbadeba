"""The machinery of train.py's loop, so that the loop itself reads as the story: which examples each
step takes, with which random draws; the optimizer and its learning-rate schedule; the drift score.

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

from minidb.pipeline import added_conditioning
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


def drift_score(model, schedule, latents, text, noise, t, resolution, batch=4):
    """The prior-preservation loss of `model` on class-prior latents it never trained on, with fixed
    noise and timesteps: it rises as "a dog" turns into *this* dog. `text` is (context, pooled) of the
    class prompt, one row per latent. Mean over the latents, in fp32."""
    total = 0.0
    for k in range(0, len(latents), batch):
        device = next(model.unet.parameters()).device
        x0, n, step = (v[k:k + batch].to(device) for v in (latents, noise, t))
        context, pooled = (None if v is None else v[k:k + batch] for v in text)
        y = None if pooled is None else torch.cat([
            added_conditioning(pooled[j:j + 1], (resolution, resolution), (0, 0), (resolution, resolution))
            for j in range(len(x0))])
        pred = model.unet(schedule.add_noise(x0, n, step), step, context, y)
        total += (pred.float() - schedule.target(x0, n, step).float()).square().mean(dim=(1, 2, 3)).sum().item()
    return total / len(latents)
