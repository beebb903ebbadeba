"""Say what a checkpoint is and prove that minidb loads it: `python -m minidb.info MODEL`.

Prints the version, the prediction type and how it was decided, the configs and the parameter
counts; with --convert it also writes the model in the other layout (with --merge-lora, a LoRA built
in). Given a LoRA or an embedding instead, it says what that holds (family, layers, rank and alpha,
the word) and how to draw with it. An existing target (such as a trained model) is only replaced
with --overwrite, only if it is a model, and then atomically: a crash leaves the old one.
"""

import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C in the seconds torch takes to import: a sentence, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted.", file=sys.stderr), os._exit(130)))

import argparse
import json
from pathlib import Path

import torch

from minidb.cli import NAME_MAX, adapter_problem, nonempty_path, path_and_scale, run
from minidb.dreambooth import embedding_vectors
from minidb.files import PICKLE_SUFFIXES, ModelFileError, json_loads, read_tensors, tensor_names
from minidb.writes import dangling_link, first_non_finite, replace_folder, writing_into
from minidb.load import load
from minidb.lora_files import describe_lora, merge_lora
from minidb.runs import embedding_to_add, named_subjects, recorded_identifiers, recorded_subjects, run_record
from minidb.save import save_diffusers, save_single_file
from minidb.single_file import unsupported

MODELS = """\
MODEL is a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/;
SDXL also text_encoder_2/, tokenizer_2/), an original single file (.safetensors, or .ckpt read
safely with weights_only), or the Hugging Face Hub id of a diffusers model, owner/name[@revision],
downloaded into the Hugging Face cache (README: "Models by Hub id"). SD 1.x, SD 2.x and SDXL (base)
text-to-image models are supported, smaller or pruned ones too (a single file's architecture is read
from its tensors); the SDXL refiner, inpainting and other kinds are recognized and refused."""

PREDICTION = """\
How the prediction type (epsilon or v) is chosen:
  diffusers folder   scheduler/scheduler_config.json's "prediction_type".
  single file        files written by minidb record it. Otherwise SD 1.x and SDXL are epsilon (a file
                     with ComfyUI's "v_pred" marker: v_prediction); SD 2.x is v_prediction if one
                     LayerNorm bias of the last up block has a spread above 0.09 (ComfyUI's test; true
                     of the 768 models), else epsilon (the 512 "base" models).
  --prediction-type  overrides both.
"""

HELP = MODELS + "\n\n" + PREDICTION  # what train.py and sample.py say of their --model


def main(argv=None):
    addons = "MODEL may also be a LoRA or a textual-inversion embedding, to see what it holds."
    parser = argparse.ArgumentParser(prog="python -m minidb.info", description=__doc__.splitlines()[0],
                                     epilog=f"{MODELS}\n{addons}\n\n{PREDICTION}",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=nonempty_path, help="a diffusers folder, a .safetensors / .ckpt file or a "
                        "Hugging Face Hub id owner/name[@revision]; or a LoRA or an embedding, to describe it")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                        help="override the detected prediction type (default: detect, see below)")
    parser.add_argument("--convert", type=nonempty_path, metavar="OUT", default=None,
                        help="also write the model to OUT: a .safetensors path gives a single file, any other path a "
                             "diffusers folder (no .ckpt: minidb writes no pickles, which can carry code)")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --convert replace an existing model at OUT (never another file)")
    parser.add_argument("--merge-lora", type=path_and_scale, action="append", default=[], metavar="LORA[:SCALE]",
                        help="merge a LoRA into the model first, at SCALE (default 1), so that --convert writes "
                             "one model file with it built in; repeat for several")
    args = parser.parse_args(argv)
    if args.merge_lora and not args.convert and not is_addon(args.model):  # an add-on: the load names it, below
        return fail("--merge-lora changes the model only in memory; add --convert OUT to write the merged model.")
    if args.overwrite and not args.convert:  # it was taken, and nothing was written
        return fail("--overwrite lets --convert replace the model at OUT; add --convert OUT, or leave it out.")
    loras = [path for path, _ in args.merge_lora]
    problem = (adapter_problem("--merge-lora", loras)  # before the slow load
               or args.convert and target_problem(Path(args.convert), args.overwrite, [args.model, *loras]))
    if problem:
        return fail(problem)
    try:
        model = load(args.model, prediction_type=args.prediction_type)
        parts = {name: getattr(model, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
        broken = args.convert and next((f"{name}.{key}" for name, module in parts.items() if module is not None
                                        and (key := first_non_finite(module.state_dict()))), None)
        if broken:  # (merge_lora checks the layers it changes)
            return fail(f"{args.model} holds NaN or infinite weights (first in {broken}), so it was not converted: "
                        "they draw black pictures; it is damaged, so download or export it again.")
        for path, scale in args.merge_lora:
            n = merge_lora(model, path, scale)
            second = f" and {n['text_encoder_2']} second-text-encoder" if "text_encoder_2" in n else ""
            print(f"merged {path} at scale {scale:g}: {n['unet']} UNet, {n['text_encoder']} text-encoder{second} layers")
    except ModelFileError as e:
        try:  # a LoRA or an embedding: say what it holds (not with --convert or --merge-lora, which need a model)
            lines = None if args.convert or args.merge_lora else describe_addon(Path(args.model))
        except ModelFileError as refusal:  # an adapter kind minidb cannot use
            return fail(str(refusal))
        if lines is None:
            return fail(str(e))
        if args.prediction_type:  # a model's; an add-on has none
            return fail(f"--prediction-type sets a model's prediction type, but {args.model} is a LoRA or an "
                        "embedding, which has none (the model it is drawn with decides); leave it out.")
        print(f"{args.model}: {lines[0][1]}")
        for heading, text in lines[1:]:
            print(f"  {heading:10s} {text}")
        return 0

    print(f"{args.model}: {model.version}, predicts {model.prediction_type}, trained at {model.resolution} px")
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(model, name)
        if module is None:  # text_encoder_2: SDXL only
            continue
        n = sum(p.numel() for p in module.parameters())
        dtype = next(module.parameters()).dtype
        print(f"  {name:14s} {n / 1e6:8.1f} M params, {str(dtype).removeprefix('torch.'):8s} {module.cfg}")
    for name in ("tokenizer", "tokenizer_2"):
        if getattr(model, name) is not None:
            print(f"  {name:14s} pads with id {getattr(model, name).pad_id}")
    identifiers = recorded_identifiers([args.model])
    if identifiers:  # a model train.py exported
        what = ("the subject train.py trained; sample.py reads [V] as it" if len(identifiers) == 1 else
                "the subjects train.py trained, each by its own word (sample.py reads [V] as none of them)")
        print(f"  {'identifier':14s} {', '.join(identifiers)}: {what}"
              + "".join(needs_embedding(s) for s in recorded_subjects([args.model]) if s["new_word"]))
    if args.convert:
        out = Path(args.convert)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with writing_into(out.parent):  # a second convert to OUT waits here, then finds OUT written: checked again
                problem = target_problem(out, args.overwrite, [args.model, *loras])
                if problem:
                    return fail(problem)
                record = kept_record(args.model, loras)
                if out.suffix.lower() == ".safetensors":
                    save_single_file(model, out, metadata=record)
                else:
                    replace_folder(out, lambda tmp: save_diffusers(model, tmp, metadata=record))
        except OSError as e:
            return fail(f"cannot write {out} ({e.strerror or e}); choose a place you can write to.")
        print(f"wrote {out}")
    return 0


def kept_record(model, loras):
    """The train.py record a converted model keeps, as save_*'s metadata ({} for none): the model's own; else, with
    one LoRA merged that has one, the LoRA's, whose identifier the merged model now draws (sample.py reads [V]
    as it). Without it info, sample.py and the toy lab would take a trained model for a base."""
    record = run_record(model) or (run_record(loras[0]) if len(loras) == 1 else None)
    return {"minidb_run": record} if record else {}


def is_addon(path):
    """Whether `path` is a LoRA's or an embedding's safetensors file, from its header alone: unsupported()'s rules
    for those two kinds read the tensors' names, not their values."""
    names = tensor_names(path)
    kind = names is not None and unsupported(dict.fromkeys(names)) or ""
    return kind.startswith(("a LoRA", "a textual-inversion"))


def describe_addon(path):
    """A LoRA's or an embedding's description as (heading, text) lines, the kind first and how to draw
    with it last; None for any other file."""
    if not path.is_file():
        return None
    try:
        tensors, metadata = read_tensors(path)
    except ModelFileError:
        return None
    kind = unsupported(tensors) or ""
    if kind.startswith("a LoRA"):
        (family, lines), use, subject = describe_lora(path, tensors, metadata), f"--lora {path}", None
    elif kind.startswith("a textual-inversion"):
        (family, lines), use, subject = describe_embedding(path, tensors), f"--embedding {path}", path.stem.lower()
    else:
        return None
    try:
        made = json_loads(metadata.get("minidb", "null"))
    except json.JSONDecodeError:
        made = None
    steps = f", {metadata['ss_steps']} steps" if "ss_steps" in metadata else ""
    base = f" on {metadata['ss_sd_model_name']}" if "ss_sd_model_name" in metadata else ""
    if isinstance(made, dict) and isinstance(made.get("identifier"), str):  # kohya's ss_* and minidb's own record
        word = made["identifier"]
        new_word = made.get("new_word") is True and kind.startswith("a LoRA")  # pivotal tuning: the word has its own file
        several = named_subjects(made) if len(named_subjects(made)) > 1 else []  # a --concepts run's subjects
        trained = ("identifiers " + ", ".join(f"{s['identifier']} ({s.get('class')})" for s in several) if several
                   else f"identifier {word}, class {made.get('class')}")
        renamed = subject and subject != word  # an embedding's word is its file's name, in A1111 as in sample.py
        lines.append(("trained", f"by minidb ({made.get('method')}{steps}{base}): {trained}"
                                 + (f"; renamed since, so the word is {subject}" if renamed else "")
                                 + (needs_embedding(recorded_subjects([path])[0]) if new_word else "")))
        subject = f"{subject or word} {made.get('class')}"
        if new_word:
            use += f" --embedding {path.parent / f'{word}.safetensors'}"
    elif base:
        lines.append(("trained", base.strip() + steps))
    model = f"<an {family} model>" if family else "<its base model>"
    prompt = f"a photo of {subject}" if subject else "..."
    return lines + [("use", f'python sample.py --model {model} {use} --prompt "{prompt}"')]


def needs_embedding(subject):
    """The end of the identifier's line for a new word: the model knows it only with its embedding file."""
    return f", but {subject['identifier']} is a new word that needs its embedding: add --embedding " \
        f"{embedding_to_add(subject)}"


def describe_embedding(path, tensors):
    """AUTOMATIC1111's embedding layouts: emb_params (n, C), string_to_param in a .pt, SDXL's clip_l and
    clip_g -> (the family it was made for or None, [(heading, text)])."""
    vectors = embedding_vectors(path, tensors)  # checked as sample.py reads them
    layout, (n, width) = " and ".join(vectors), next(iter(vectors.values())).shape
    family = "SDXL" if len(vectors) == 2 else {768: "SD 1.x", 1024: "SD 2.x"}.get(width)
    wide = " + ".join(str(v.shape[-1]) for v in vectors.values())
    return family, [("kind", f"a textual-inversion embedding for {family or 'an unknown model family'}, "
                             f"AUTOMATIC1111's layout ({layout})"),
                    ("word", f"{path.stem.lower()} (the file's name), {n} vector{'s' * (n > 1)} of {wide} numbers")]


def fail(message):  # one sentence for the user, exit status 2
    print(f"error: {message}", file=sys.stderr)
    return 2


# What a diffusers Stable Diffusion folder holds: save_diffusers writes all but the last two.
MODEL_FOLDER = {"model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                "scheduler", "safety_checker", "feature_extractor"}


# Names of files that are not folders: --convert writes a folder for any name but .safetensors, so these are typos
# or other formats (.sft: ComfyUI's other name for safetensors)
FILE_SUFFIXES = {".safetensor", ".sft", ".gguf", ".onnx", ".pkl", ".pickle", ".json", ".txt", ".zip"}
CONVERT_MAX = NAME_MAX - len("..12345678.tmp")  # the name it is first written under (.NAME.XXXXXXXX.tmp) must fit


def target_problem(out, overwrite, inputs):
    """Why --convert must not write to `out`, or None. Only --overwrite replaces an existing file or
    non-empty folder (such as a trained model), never a file by a folder or a folder by a file, never one of
    the `inputs` (the model and the LoRAs), and never anything but a model: as train.py's --overwrite, it
    deletes nothing else."""
    if out.name in ("", ".."):  # ".", "/", "..": no name to write under, nor to swap a folder in by
        return f"--convert {out} names no new folder or file; give it a name, such as --convert {out / 'model'}."
    if len(os.fsencode(out.name)) > CONVERT_MAX:
        return (f"--convert {out.name[:20]}... is a name of {len(os.fsencode(out.name))} bytes; it is written under "
                f"a longer temporary name first, so it can be at most {CONVERT_MAX}: choose a shorter one.")
    link = dangling_link(out) or (out if out.is_symlink() else None)
    if link:
        target = os.readlink(link)
        return (f"--convert {out} goes through {link}, a link to {target}" + ("" if link.exists() else ", which "
                "does not exist") + "; give the real path, or choose another.")
    left = out.with_name(f".{out.name}.old")  # writes.replace_folder's copy of the old folder, between two renames
    if left.is_dir() and not out.exists():
        return (f"a crash while replacing {out} left the model it held as {left}; move that back to {out} (or delete "
                "it), then convert again.")
    if out.suffix.lower() in FILE_SUFFIXES:
        return (f"--convert {out} names a {out.suffix} file, but --convert writes a .safetensors file or a diffusers "
                f"folder; name it {out.with_suffix('.safetensors')}, or give a folder name.")
    single = out.suffix.lower() == ".safetensors"
    parent = next(p for p in out.parents if p.exists())  # the folders below it are made when writing
    if not parent.is_dir():
        return f"cannot write {out}: {parent} is a file, not a folder; choose another path."
    if out.suffix.lower() in PICKLE_SUFFIXES:  # a user asking for a .ckpt wants one file, not a folder of that name
        return (f"--convert {out} asks for a {out.suffix} file, which minidb does not write (a pickle can carry "
                f"code); name it {out.with_suffix('.safetensors')}, which AUTOMATIC1111 and ComfyUI read, or give "
                "a folder name for the diffusers layout.")
    if not out.exists() or out.is_dir() and not single and not any(out.iterdir()):
        return None  # an empty folder holds nothing to lose
    entries = sorted(p.name for p in out.iterdir()) if out.is_dir() and not single else []
    foreign = [name for name in entries if name not in MODEL_FOLDER or "model_index.json" not in entries]
    if foreign:
        return (f"--convert {out} holds files that are not a model ({', '.join(foreign[:3])}"
                f"{', ...' if len(foreign) > 3 else ''}); choose a new or empty folder.")
    if any(out.resolve() == Path(p).resolve() for p in inputs):
        return f"--convert {out} is what it converts from (the model or a LoRA); choose another path."
    if single and out.is_file() and not is_model_file(out):
        return (f"--convert {out} is a file that is not a model (a LoRA, an embedding or another file), which "
                "--overwrite does not replace; choose another path.")
    if not overwrite:
        return f"{out} already exists; pass --overwrite to replace it, or choose another path."
    if out.is_dir() == single:
        kind, wanted = ("a folder", "a .safetensors file") if single else ("a file", "a diffusers folder")
        return f"{out} is {kind} and would be replaced by {wanted}; remove it first or choose another path."
    return None


def is_model_file(path):
    """Whether a .safetensors file holds a whole model (its UNet in the original layout, as --convert writes
    one), read from its header alone."""
    return any(key.startswith("model.diffusion_model.") for key in tensor_names(path) or ())  # None: no safetensors


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    run(main)
