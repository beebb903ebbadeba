"""Say what a checkpoint is and prove that minidb loads it: `python -m minidb.info MODEL`.

Prints the version, the prediction type and how it was decided, the configs and the parameter
counts; with --convert it also writes the model in the other layout.
"""

import argparse
import sys
from pathlib import Path

import torch

from minidb.files import ModelFileError
from minidb.load import load
from minidb.save import save_diffusers, save_single_file

HELP = """\
MODEL is a diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)
or an original single file (.safetensors, or .ckpt read safely with weights_only). SD 1.x and SD 2.x
text-to-image models are supported; SDXL, inpainting and other kinds are recognized and refused.

How the prediction type (epsilon or v) is chosen:
  diffusers folder   scheduler/scheduler_config.json's "prediction_type".
  single file        files written by minidb record it. Otherwise SD 1.x is epsilon; SD 2.x is
                     v_prediction if one LayerNorm bias of the last up block has a spread above 0.09
                     (ComfyUI's test; true of the 768 models), else epsilon (the 512 "base" models).
  --prediction-type  overrides both.
"""


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m minidb.info", description=__doc__.splitlines()[0], epilog=HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a diffusers folder or a .safetensors / .ckpt file")
    parser.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default=None,
                        help="override the detected prediction type (default: detect, see below)")
    parser.add_argument("--convert", metavar="OUT", default=None,
                        help="also write the model to OUT: a .safetensors path gives a single file, "
                             "any other path a diffusers folder")
    args = parser.parse_args(argv)
    try:
        model = load(args.model, prediction_type=args.prediction_type)
    except ModelFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    print(f"{args.model}: {model.version}, predicts {model.prediction_type}, trained at {model.resolution} px")
    for name in ("unet", "vae", "text_encoder"):
        module = getattr(model, name)
        n = sum(p.numel() for p in module.parameters())
        dtype = next(module.parameters()).dtype
        print(f"  {name:13s} {n / 1e6:8.1f} M params, {str(dtype).removeprefix('torch.'):8s} {module.cfg}")
    print(f"  tokenizer     pads with id {model.tokenizer.pad_id}")
    if args.convert:
        out = Path(args.convert)
        if out.suffix == ".safetensors":
            save_single_file(model, out)
        else:
            save_diffusers(model, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
