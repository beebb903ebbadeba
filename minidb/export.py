"""What a finished train.py run hands over besides its files: the command that draws with it, how
AUTOMATIC1111, ComfyUI and diffusers load what it wrote, and the run's README that says both."""

import json


def how_to_use(args, out, model, subjects, lora_file=None, word_file=None):
    """(the sample.py command, [one line per other tool]) for a run whose method wrote `out`'s files."""
    identifier = subjects[0].identifier
    sample = (f"python sample.py --model {out / 'model.safetensors' if args.method == 'full' else args.model}"
              + (f" --lora {lora_file}" if lora_file else "")
              + (f" --embedding {word_file}" if word_file else "") + f' --prompt "{subjects[0].new_scene}"')
    elsewhere = []
    if lora_file:
        elsewhere.append("AUTOMATIC1111 / Forge: copy `lora.safetensors` into `models/Lora` and add `<lora:lora:1>` to "
                         "the prompt; ComfyUI: copy it into `models/loras` and use a LoraLoader node; diffusers: "
                         f"`pipe.load_lora_weights(\"{out}\", weight_name=\"lora.safetensors\")`.")
    if word_file:
        diffusers = (f"`pipe.load_textual_inversion(\"{word_file}\", token=\"{identifier}\")`." if model.version != "SDXL"
                     else f"`vectors = safetensors.torch.load_file(\"{word_file}\")`, then `pipe.load_textual_inversion("
                     f"vectors[\"clip_l\"], token=\"{identifier}\", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)`"
                     " and the same with `clip_g`, `pipe.text_encoder_2`, `pipe.tokenizer_2`.")
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
