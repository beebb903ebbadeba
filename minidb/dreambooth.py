"""The pieces of DreamBooth (Ruiz et al. 2022, arXiv 2208.12242) that train.py puts together.

- the rare-token identifier [V] that names the subject;
- the class prior: images of "a photo of [class]" drawn by the frozen model, cached as latents;
- the loss: denoising on the subject plus λ times denoising on the class prior.

The loss curve drawn at the end is in minidb/plot.py.

The bookkeeping of a run is in minidb/runs.py (its folder and lock) and minidb/state.py (its checkpoints).
"""

import hashlib
import json
import re
import warnings
from pathlib import Path

import torch
import torch.nn as nn
from tqdm import tqdm

from minidb import hub
from minidb.distributed import barrier, rank_and_world
from minidb.files import ModelFileError, read_tensors
from minidb.writes import atomic_write, write_safetensors
from minidb.graphs import UnetGraph
from minidb.single_file import unsupported
from minidb.pipeline import sample_latents

# ---- the identifier ----


def rare_tokens(tokenizer, max_chars=3, rarest_fraction=0.2):
    """Candidate identifiers, as the paper chooses them: tokens that are rare in the vocabulary and
    short when spelled out (at most 3 characters), so they carry little prior meaning.

    CLIP's BPE ids follow the order in which merges were learned, most frequent first, so rare
    tokens are the last ones. We keep whole-word tokens ('</w>') of 2-3 lowercase letters from the
    last `rarest_fraction` of the vocabulary's ids (all of them merges), which the tokenizer reads back
    as one token.
    """
    first_rare = int(len(tokenizer.vocab) * (1 - rarest_fraction))
    candidates = []
    for token, i in tokenizer.vocab.items():
        word = token.removesuffix("</w>")
        if i >= first_rare and token.endswith("</w>") and re.fullmatch(r"[a-z]{2,%d}" % max_chars, word):
            if tokenizer.encode(word) == [i]:
                candidates.append(word)
    return sorted(candidates)


def pick_identifier(tokenizer, rng):
    """One rare token, drawn with `rng` (a random.Random) so a seed always gives the same one."""
    return rng.choice(rare_tokens(tokenizer))


def pick_new_word(tokenizer, rng):
    """A rare token's spelling that is no token by itself (only with '</w>'), so that it can become
    a new word: diffusers' load_textual_inversion refuses a name already in the vocabulary."""
    return rng.choice([w for w in rare_tokens(tokenizer) if w not in tokenizer.vocab])


# ---- a new word: textual inversion (Gal et al. 2022, arXiv 2208.01618) ----


def embedding_vectors(path, tensors):
    """An embedding file's tensors -> {name: vectors (n, C)}, checked: AUTOMATIC1111's `emb_params`, or
    `string_to_param` in a .pt; SDXL's `clip_l` and `clip_g`; or any file of one tensor (diffusers')."""
    if isinstance(tensors.get("string_to_param"), dict):
        tensors = tensors["string_to_param"]
    found = {name: t for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if "clip_l" in found and "clip_g" in found:
        names = ["clip_l", "clip_g"]
    elif "emb_params" in found or len(found) == 1:
        names = ["emb_params" if "emb_params" in found else next(iter(found))]
    else:
        names = []
    kind = "" if names else unsupported(found)  # None: a Stable Diffusion model of its own
    if kind is None:  # a file given in another's place: said where it goes
        raise ModelFileError(f"{path} is a full model checkpoint, not an embedding; load it as the base model "
                             "(--model) instead.")
    if kind.startswith("a LoRA"):
        raise ModelFileError(f"{path} is a LoRA, not a textual-inversion embedding: it changes weights rather than "
                             f"adding a word, so draw with it by sample.py --lora {path}.")
    if not names or any(found[name].ndim not in (1, 2) for name in names):
        held = ", ".join(f"{k} {tuple(found[k].shape)}" if k in found else k for k in list(tensors)[:3]) or "nothing"
        raise ModelFileError(f"{path} is not a textual-inversion embedding (one tensor of vectors (n, width), e.g. "
                             f"emb_params, or SDXL's clip_l and clip_g); it holds {held}.")
    for name in names:
        if not found[name].is_floating_point():  # cast to float, int8 vectors would be zeros and bool ones 0 and 1
            raise ModelFileError(f"{path} holds {str(found[name].dtype).removeprefix('torch.')} values in {name} where "
                                 "an embedding holds floating-point numbers; the file is damaged or of another kind, "
                                 "so make it again.")
        if found[name].numel() == 0:
            raise ModelFileError(f"{path} holds no vectors ({name} has the shape {tuple(found[name].shape)}); the file "
                                 "is damaged, so make it again.")
        if not torch.isfinite(found[name].float()).all():  # float(): torch has no isfinite for fp8
            raise ModelFileError(f"{path} holds NaN or infinite numbers in {name}, which draw black pictures; the file "
                                 "is damaged, so make it again.")
    return {name: found[name].reshape(-1, found[name].shape[-1]) for name in names}


class NewWord(nn.Module):
    """A word the model did not know, learned as n embedding vectors while all else stays as it was.

    One parameter per text encoder, named as AUTOMATIC1111's embedding files name them, so the state
    dict is the file: `emb_params` (n, C) for SD 1.x / 2.x, and for SDXL `clip_l` (n, 768) and `clip_g`
    (n, 1280), the vectors for its two encoders. The encoders' embedding tables are not touched (nor the
    model files written from them): hooks on them read the new word's ids from these vectors instead.
    """

    def __init__(self, model, word, vectors):  # vectors (n, C), or a list of them, one per text encoder
        super().__init__()
        vectors = [vectors] if torch.is_tensor(vectors) else list(vectors)
        self.names = ("clip_l", "clip_g") if model.text_encoder_2 is not None else ("emb_params",)
        if len(vectors) != len(self.names):
            raise ValueError(f"A new word for {model.version} needs {len(self.names)} sets of vectors, not {len(vectors)}.")
        tokenizers = [model.tokenizer, model.tokenizer_2][: len(self.names)]
        self.word, self.ids = word, [tok.add_word(word, len(vectors[0])) for tok in tokenizers]
        for name, v in zip(self.names, vectors):
            self.register_parameter(name, nn.Parameter(v.detach().clone().float()))
        self._hooks = []

    @classmethod
    def starting_as(cls, model, word, text, n=1):
        """The paper's start: every vector is the embedding of a coarse description ("cup"), averaged
        over its tokens when it has several (in each text encoder's own table)."""
        ids = model.tokenizer.encode(text)
        tables = [e.embeddings.token_embedding.weight for e in (model.text_encoder, model.text_encoder_2) if e]
        return cls(model, word, [table[ids].mean(0, keepdim=True).repeat(n, 1) for table in tables])

    @classmethod
    def from_file(cls, model, path):
        """An embedding file: AUTOMATIC1111's (`emb_params`, or `string_to_param` in a .pt; SDXL's `clip_l`
        and `clip_g`), or any file of one tensor (diffusers'). The word is the file's name, as in AUTOMATIC1111."""
        vectors = list(embedding_vectors(path, read_tensors(path)[0]).values())
        sdxl_file = len(vectors) == 2
        widths = [e.cfg.width for e in (model.text_encoder, model.text_encoder_2) if e]
        if [v.shape[1] for v in vectors] != widths:
            made_for = " (made for SDXL)" if sdxl_file else {768: " (made for SD 1.x)", 1024: " (made for SD 2.x)"}.get(
                vectors[0].shape[1], "")
            holds = " and ".join(f"{v.shape[1]}-wide" for v in vectors)
            raise ModelFileError(f"{path} holds {holds} vectors{made_for}, but this {model.version} model's words are "
                                 f"{' and '.join(map(str, widths))} wide; use an embedding made for it.")
        if len({len(v) for v in vectors}) > 1:
            raise ModelFileError(f"{path} holds {len(vectors[0])} clip_l but {len(vectors[1])} clip_g vectors, "
                                 "where each token needs one of each; the file is damaged, so make it again.")
        word = Path(path).stem.lower()
        try:
            return cls(model, word, [v.to(next(model.text_encoder.parameters()).device) for v in vectors])
        except ValueError as e:
            reason = str(e).rstrip(".")
            raise ModelFileError(f"{path} cannot be used as the word {word!r}: {reason[0].lower() + reason[1:]}; "
                                 "rename the file.") from None

    def save(self, path, metadata=None):
        """The embedding file: `emb_params` (n, C), which AUTOMATIC1111 (word = file name), ComfyUI and
        diffusers' load_textual_inversion (word = its token argument) all read; for SDXL `clip_l` and
        `clip_g`, A1111's and ComfyUI's SDXL layout (diffusers loads each into its encoder)."""
        write_safetensors(path, {name: p.float() for name, p in self.named_parameters()},
                          metadata={"format": "pt", **(metadata or {})})

    def attach(self, *text_encoders):
        """Look the word's ids up in its own vectors, in each text encoder in turn (SDXL: both; None is
        skipped, so `attach(model.text_encoder, model.text_encoder_2)` suits every model)."""
        self.detach()
        encoders = [e for e in text_encoders if e is not None]
        if len(encoders) != len(self.names):
            raise ValueError(f"This word has vectors for {len(self.names)} text encoder(s), not {len(encoders)}.")
        for encoder, name, ids in zip(encoders, self.names, self.ids):
            self._hooks += self._hook(encoder.embeddings.token_embedding, getattr(self, name), ids)
        return self

    @staticmethod
    def _hook(table, vectors, ids):
        """ids (B, L) -> table rows, replaced where the id is the word's by its row of `vectors`."""
        first, n, seen = ids[0], len(ids), {}
        assert ids == list(range(first, first + n))  # one id range

        def before(module, args):
            ids = args[0]
            seen["ours"], seen["row"] = (ids >= first) & (ids < first + n), (ids - first).clamp(0, n - 1)
            return (ids.masked_fill(seen["ours"], 0),)  # any id the table has; its row is replaced below

        def after(module, args, out):  # out (B, L, C)
            return torch.where(seen["ours"][..., None], vectors.to(out.dtype)[seen["row"]], out)

        return [table.register_forward_pre_hook(before), table.register_forward_hook(after)]

    def detach(self):
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


# ---- the loss ----


def dreambooth_loss(pred, target, n_instance, prior_weight, weights=None):
    """The DreamBooth objective (paper, eq. 2) for a batch whose first n_instance examples show the
    subject and whose others are class-prior samples:

        loss = mean ‖ε̂ − ε‖² over subject examples + λ · mean ‖ε̂' − ε'‖² over class examples

    (ε, or v for v-prediction models: `target` is whichever the model predicts). `weights`, one per
    example, rescale each example's error, e.g. for min-SNR weighting: the class examples' too, as kohya
    weights every example (diffusers' DreamBooth scripts weight the subject's alone), since the prior
    term is the same denoising loss on other pictures. Returns (loss, instance, prior).
    """
    per_example = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))  # (B,)
    if weights is not None:
        per_example = per_example * weights
    instance_loss = per_example[:n_instance].mean()
    prior_loss = per_example[n_instance:].mean() if len(per_example) > n_instance else torch.zeros_like(instance_loss)
    return instance_loss + prior_weight * prior_loss, instance_loss, prior_loss


def min_snr_weights(schedule, t, gamma):
    """Min-SNR-γ loss weights (Hang et al. 2023, arXiv 2303.09556): min(SNR_t, γ) / SNR_t for ε
    targets, / (SNR_t + 1) for v targets. Down-weights the easy, low-noise timesteps."""
    alpha_bar = schedule.alphas_cumprod[t.cpu()]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=gamma)
    return (clipped / snr if schedule.prediction_type == "epsilon" else clipped / (snr + 1)).to(t.device)


# ---- the class prior ----


def _model_identity(path):
    """What names a model for the cache: its path, size and modification time (hashing gigabytes
    at every start would be slow). A Hub id is named by its snapshot folder, whose name is the commit."""
    path = Path(hub.local_path(path)).resolve()
    files = [path] if path.is_file() else sorted(path.glob("*/*.safetensors")) + sorted(path.glob("*/*.bin"))
    return [str(path)] + [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]


def class_prior(model, model_path, prompt, count, resolution, sampler, steps, guidance, seed, cache_root, batch=4,
                label="class prior"):
    """`count` latents (count, 4, h, w) of `prompt` drawn by the frozen model, cached on disk.

    The cache folder is keyed by everything that changes the samples (model, prompt, resolution,
    sampler, steps, guidance, seed), so a second run reuses them and a larger count only tops up.
    Each batch is seeded with seed + the index of its first sample, so the same sequence of runs
    always gives the same files. Under torchrun the missing batches are shared out: process r draws
    batches r, r + N, r + 2N, ..., so no image is drawn twice, and all read the one cache.
    """
    rank, world = rank_and_world()
    settings = {"model": _model_identity(model_path), "prompt": prompt, "resolution": resolution,
                "sampler": sampler, "steps": steps, "guidance": guidance, "seed": seed}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(cache_root) / f"{re.sub(r'[^a-z0-9]+', '-', prompt.lower()).strip('-')[:40]}-{key}"
    side = resolution // 2 ** (len(model.vae.cfg.ch_mult) - 1)
    shape = (model.vae.cfg.z_channels, side, side)  # each latent's
    if rank == 0:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / "settings.json", lambda tmp: Path(tmp).write_text(json.dumps(settings, indent=2)))
        _valid_prefix(folder, count, shape)  # a damaged file is removed, with those after it, by one process
    barrier()
    have = _valid_prefix(folder, count, shape)
    mine = shard(have, count, batch, rank, world)
    graph = UnetGraph(model.unet)  # on a GPU without autocast (--mixed-precision no): one recording for every batch
    with tqdm(total=sum(min(batch, count - first) for first in mine),  # the last batch may be short
              desc=f"{label} '{prompt}'" + (f" (process {rank})" if world > 1 else ""),
              disable=not mine) as bar:
        for first in mine:
            n = min(batch, count - first)
            latents = sample_latents(model, prompt, n=n, steps=steps, guidance=guidance, seed=seed + first,
                                     height=resolution, width=resolution, sampler=sampler, progress=False, graph=graph)
            for j in range(n):
                write_safetensors(folder / f"{first + j:05d}.safetensors", {"latent": latents[j].float()})
            bar.update(n)
    barrier()
    return torch.stack([read_tensors(folder / f"{i:05d}.safetensors")[0]["latent"] for i in range(count)])


def shard(have, count, batch, rank, world):
    """The first index of each batch process `rank` of `world` draws, when images have .. count-1 are missing."""
    return list(range(have, count, batch))[rank::world]


CACHED = "[0-9]" * 5 + ".safetensors"  # 00000.safetensors, ...; other names there ("00000 copy") are not ours


def _valid_prefix(folder, count, shape):
    """How many cached latents 0, 1, 2, ... are readable, finite and of this `shape`. A damaged file (a crash,
    a full disk, a bad sector, an edit) is a cache miss: it and every file after it are drawn again, exactly
    as a run that had cached only the files before it would draw them."""
    for i in range(count):
        path = folder / f"{i:05d}.safetensors"
        if not path.exists():
            return i
        try:
            latent = read_tensors(path)[0]["latent"]
            ok = tuple(latent.shape) == shape and latent.is_floating_point() and bool(torch.isfinite(latent).all())
        except (ModelFileError, KeyError):
            ok = False
        if not ok:
            warnings.warn(f"the class-prior cache file {path} is damaged; drawing it and the ones after it again")
            for later in folder.glob(CACHED):
                if int(later.stem) >= i:
                    later.unlink()
            return i
    return count
