"""What a finished train.py run hands over: the files its method made (the personalized model as a
diffusers folder and one original-layout file, kohya's LoRA file, or an embedding), the command that
draws with them, how AUTOMATIC1111, ComfyUI and diffusers load them, and the run's README that says it."""

import json
from pathlib import Path

import torch

from minidb.plot import plot_losses
from minidb.writes import atomic_write, replace_folder
from minidb.lora import save_kohya
from minidb.runs import log_rows
from minidb.save import save_diffusers, save_single_file


def disk_needed(trained, parts, dtypes, full):
    """Bytes a run will write, at most: a checkpoint (what trains, and Adam's two moments, all fp32) and,
    when the whole model is exported, each part in its export dtype twice (the diffusers folder and the
    single file)."""
    return sum(12 * p.numel() for m in trained.values() for p in m.parameters()) + full * sum(
        2 * p.numel() * dtypes[name].itemsize for name, m in parts.items() for p in m.parameters())


def export(args, settings, out, model, parts, trained, subjects, steps, dtypes):
    """Write the run's results into `out`; returns ([the paths written for other tools], the sample.py
    command). Full fine-tuning exports every part in `dtypes[name]` (--save-dtype, else the base's own,
    so frozen parts come out as they went in); LoRA goes out in kohya's format, fp16 as LoRAs are shared."""
    identifier = subjects[0].identifier
    lora_file, word_file = out / "lora.safetensors", out / f"{identifier}.safetensors"
    # The LoRA's name in AUTOMATIC1111 (its alias, read from ss_output_name) is the run folder's: every run's file
    # is lora.safetensors, and A1111 disables an alias that two of its files share (networks.py).
    # A --concepts run records its subjects, but not their photos' folders: those are the user's, not a shared file's.
    named = [{k: v for k, v in subject.items() if k != "images"} for subject in settings.get("subjects") or []]
    about = {"ss_output_name": lora_name(out), "ss_sd_model_name": Path(args.model).name, "ss_steps": str(steps),
             "ss_learning_rate": str(args.lr),
             "ss_training_comment": "minidb DreamBooth: " + "; ".join(s.instance_prompt for s in subjects),
             "minidb": json.dumps({"identifier": identifier, "class": subjects[0].class_name, "method": args.method,
                                   # a new word means nothing without its embedding file, so sample.py says so
                                   **({"new_word": True} if "new_word" in trained else {}),
                                   **({"subjects": named} if args.concepts else {})})}
    sample, elsewhere = how_to_use(args, out, model, subjects, lora_file if "lora" in trained else None,
                                   word_file if "new_word" in trained else None, dtypes["unet"])
    plot_losses([row for _, row in log_rows(out / "log.jsonl")], out / "loss.png")
    written = []
    if args.method == "full":
        for name, module in parts.items():
            module.to(dtypes[name])
        run = {"minidb_run": about["minidb"]}  # its identifier, which sample.py reads [V] as
        replace_folder(out / "model", lambda tmp: save_diffusers(model, tmp, metadata=run))
        save_single_file(model, out / "model.safetensors", metadata=run)
        written += [out / "model", out / "model.safetensors"]
    if "lora" in trained:
        save_kohya(trained["lora"], lora_file, metadata=about)
        written.append(lora_file)
    if "new_word" in trained:
        trained["new_word"].save(word_file, metadata={"minidb": about["minidb"]})
        written.append(word_file)
    text = readme(args, settings, model, subjects, sample, elsewhere)
    atomic_write(out / "README.md", lambda tmp: Path(tmp).write_text(text))
    return written, sample


def lora_name(out):
    """The name a run's LoRA goes by in AUTOMATIC1111's prompt tag <lora:NAME:1>: the run folder's, without
    the ":" and "," that the tag and A1111's "Lora hashes" field cannot hold."""
    return Path(out).resolve().name.translate(str.maketrans("", "", ":,"))


def literal(path):
    """`path` as a Python string in a line of code to copy: in double quotes, a Windows path's backslashes doubled
    (in "D:\\work\\runs", Python reads \\r as a carriage return)."""
    return json.dumps(str(path), ensure_ascii=False)


def how_to_use(args, out, model, subjects, lora_file=None, word_file=None, dtype=torch.float32):
    """(the sample.py command, [one line per other tool]) for a run whose method wrote `out`'s files; a full
    run's model was saved in `dtype` (its UNet's, which diffusers is told to load every part in)."""
    identifier = subjects[0].identifier
    sample = (f"python sample.py --model {out / 'model.safetensors' if args.method == 'full' else args.model}"
              + (f" --lora {lora_file}" if lora_file else "")
              + (f" --embedding {word_file}" if word_file else "") + f' --prompt "{subjects[0].new_scene}"')
    elsewhere = []
    if args.method == "full":
        pipeline = "StableDiffusionXLPipeline" if model.version == "SDXL" else "StableDiffusionPipeline"
        folder, file = out / "model", out / "model.safetensors"
        elsewhere.append(f"AUTOMATIC1111 / Forge: copy `model.safetensors` into `models/Stable-diffusion`; ComfyUI: "
                         f"copy it into `models/checkpoints` and pick it in a Load Checkpoint node; diffusers: "
                         f"`pipe = {pipeline}.from_pretrained({literal(folder)}, torch_dtype={dtype})`, or "
                         f"`pipe = {pipeline}.from_single_file({literal(file)}, config={literal(folder)}, "
                         f"torch_dtype={dtype})`. torch_dtype is the dtype the model was saved in (without it diffusers "
                         "loads the UNet in fp32 and the text encoder in the file's dtype, which fails in half "
                         "precision; diffusers 0.42 and later also take it as dtype=); config is the "
                         "folder beside the file, whose configs give this model's architecture and prediction type "
                         "(without it diffusers downloads a stock one: any SD 2 file as 2.1's 768 v-prediction, SDXL "
                         "as epsilon).")
    if lora_file:
        name = lora_name(out)
        elsewhere.append(f"AUTOMATIC1111 / Forge: copy `lora.safetensors` into `models/Lora` as `{name}.safetensors` "
                         f"and add `<lora:{name}:1>` to the prompt; ComfyUI: copy it into `models/loras` and use a "
                         f"LoraLoader node; diffusers: `pipe.load_lora_weights({literal(out)}, weight_name=\"lora.safetensors\")`.")
    if word_file:
        diffusers = (f"`pipe.load_textual_inversion({literal(word_file)}, token=\"{identifier}\")`." if model.version != "SDXL"
                     else f"`vectors = safetensors.torch.load_file({literal(word_file)})`, then `pipe.load_textual_inversion("
                     f"vectors[\"clip_l\"], token=\"{identifier}\", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`"
                     " and the same with `clip_g`, `pipe.text_encoder_2`, `pipe.tokenizer_2`; then "
                     "`pipe.text_encoder_2.text_model.eos_token_id = 49407`, so that its pooled vector is taken at the "
                     "end-of-text token, as in training (SDXL's config says 2, which takes it at the new word).")
        elsewhere.append(f"AUTOMATIC1111: copy `{word_file.name}` into `embeddings/` and write `{identifier}` in the "
                         f"prompt; ComfyUI: copy it into `models/embeddings` and write `embedding:{identifier}`; "
                         f"diffusers: {diffusers}")
    return sample, elsewhere


def readme(args, settings, model, subjects, sample, elsewhere):
    """The run folder's README.md: every subject's identifier and prompt, the base model, how to draw."""
    return (f"# DreamBooth ({args.method})\n\n" + "".join(
            f"Subject: `{s.identifier}` (a {s.class_name}). Prompt it as \"{s.instance_prompt}\" or in new contexts, "
            f"e.g. \"{s.new_scene}\".\n\n" for s in subjects)
            + f"Base model: {args.model} ({model.version}, {model.prediction_type}).\n\n    {sample}\n\n"
            + "".join(f"{line}\n\n" for line in elsewhere)
            + f"Settings:\n\n```json\n{json.dumps(settings, indent=2)}\n```\n")
