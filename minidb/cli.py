"""What train.py and sample.py share at the command line: argument types that refuse a bad value
before any work starts, the device check, and the way an error or a Ctrl-C reaches the user.

A bad value ends the run with one sentence and exit code 2 (argparse's own convention); Ctrl-C
ends it with exit code 130, the shell's code for SIGINT.
"""

import argparse
import math
import os
import re
import signal
import sys
import warnings
from pathlib import Path

import torch

from minidb.files import not_a_file

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --dtype, --save-dtype
SEED_MAX = 2**63 - 1  # torch.Generator takes 64 bits; batches use seed + i, which must still fit


def number(kind=float, low=None, high=None, above=None):
    """An argparse type: a finite `kind` with low <= x <= high and x > above (each bound optional).

    NaN and infinity are refused everywhere: a NaN learning rate or guidance scale runs to the end
    and writes a model or picture of NaNs.
    """
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'a whole number' if kind is int else 'a number'}")
        if isinstance(x, float) and not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if (low is not None and x < low) or (high is not None and x > high) or (above is not None and x <= above):
            raise argparse.ArgumentTypeError(f"must be {_range(low, high, above)}, not {text}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _range(low, high, above):
    if above is not None:
        return f"above {above}" + (f" and at most {high}" if high is not None else "")
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f"at least {low}" if low is not None else f"at most {high}"


def text(value):
    """An argparse type for prompts, class names and tokens: non-empty, valid UTF-8."""
    try:
        value.encode("utf-8")  # undecodable bytes in argv arrive as lone surrogates, which fail here
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError("is not valid UTF-8 text; check your terminal's encoding") from None
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return value



NAME_MAX = 255  # bytes in one file or folder name, on Linux's and macOS's file systems alike


def nonempty_path(value):
    """An argparse type for --model, --out and the other paths: not empty, which would silently mean the default
    model or the current folder, and no name longer than a file system holds (an OSError deep in the run)."""
    if not value.strip():
        raise argparse.ArgumentTypeError("must not be empty; give a path")
    long = next((name for name in Path(value).parts if len(os.fsencode(name)) > NAME_MAX), None)
    if long:
        raise argparse.ArgumentTypeError(f"has a name of {len(os.fsencode(long))} bytes ({long[:20]}...), longer than "
                                         f"the {NAME_MAX} a file system holds; use a shorter one")
    return value


def path_and_scale(value):
    """An argparse type for LoRAs: PATH or PATH:SCALE, SCALE a finite number from -10 to 10 (default 1).
    A colon that is not followed by a number is part of the path (C:\\loras\\x.safetensors)."""
    path, _, scale = nonempty_path(value).rpartition(":")
    if path and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|[-+]?(nan|inf)", scale.lower()):
        return path, number(float, low=-10, high=10)(scale)
    if path and Path(path).is_file() and not Path(value).exists():  # x.safetensors:abc, a scale mistyped
        raise argparse.ArgumentTypeError(f"the scale after {path}: must be a number from -10 to 10, such as "
                                         f"{path}:0.8, not {scale!r}")
    return value, 1.0


def adapter_problem(flag, paths):
    """One sentence for the first LoRA or embedding in `paths` that is missing, not a file, or given twice,
    else None: found before the model loads, which takes minutes for a large one. A LoRA given twice would
    be merged twice, at the sum of its scales, which is rarely what was meant."""
    seen = {}
    for path in map(Path, paths):
        problem = not_a_file(path)
        if problem:
            return f"{flag} {problem}"
        if path.resolve() in seen:
            return (f"{flag} gives {path} twice (as {seen[path.resolve()]} and {path}); give it once"
                    + (", with the scale you want (PATH:SCALE)." if flag != "--embedding" else "."))
        seen[path.resolve()] = path
    return None


def check_device(name):
    """One sentence if `name` is not a device this machine has, else None."""
    try:
        device = torch.device(name)
    except RuntimeError:
        return f"--device {name!r} is not a device name; use cpu, or cuda (cuda:N for the N-th GPU)."
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"--device {name} is not supported; use cpu, or cuda (cuda:N for the N-th GPU)."
    if not torch.cuda.is_available():
        return f"--device {name} was asked for, but PyTorch sees no CUDA GPU; use --device cpu."
    if device.index is not None and device.index >= torch.cuda.device_count():
        return f"--device {name} names a GPU this machine lacks (it has {torch.cuda.device_count()}); use cuda:0."
    return None


def cpu_bf16():
    """Whether this CPU computes in bf16 natively: AVX512-BF16 (Intel Cooper Lake and later, AMD Zen 4
    and later) or AMX (Intel Sapphire Rapids and later), as torch itself detects them. Elsewhere bf16
    is emulated in fp32 arithmetic plus conversions, which is slower than fp32, so the scripts' CPU
    default is bf16 autocast only where this is true."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without these checks (or not x86): assume emulation
        return False


def warn_if_bf16_is_emulated(device, asked, flag):
    """bf16 asked for (`flag` bf16) on a CPU without it in hardware: it runs, many times slower than fp32."""
    if asked == "bf16" and torch.device(device).type == "cpu" and not cpu_bf16():
        warnings.warn(f"{flag} bf16 on this CPU, which has no bf16 arithmetic (AVX512-BF16 or AMX), is emulated and "
                      f"many times slower than fp32 (37x in the UNet on an AVX2 CPU); leave {flag} out to run in fp32.")


def fail(message, code=2):
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class FinishTheStep:
    """Ctrl-C (SIGINT) or SIGTERM during training: let the current step finish, then save a checkpoint, so
    that a resumed run is exactly the uninterrupted one. SIGTERM is how a cluster's scheduler (SLURM, say)
    stops or preempts a job, and `kill` stops a process. True once asked; `signum` is the signal. A second
    Ctrl-C quits at once, except under torchrun: there a Ctrl-C reaches every process twice (from the
    terminal, then passed on by the launcher), and the launcher itself kills what does not stop."""

    def __init__(self, announce=True):
        self.asked, self.signum, self.announce = False, None, announce
        self.torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        self.previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum, frame):
        if self.asked and signum == signal.SIGINT and not self.torchrun:
            raise KeyboardInterrupt
        if not self.asked and self.announce:
            print(f"\n{'Ctrl-C' if signum == signal.SIGINT else 'SIGTERM'}: saving a checkpoint after this step"
                  + ("" if self.torchrun or signum != signal.SIGINT else " (press again to quit without saving)"),
                  file=sys.stderr)
        self.asked, self.signum = True, self.signum or signum

    def __bool__(self):
        return self.asked

    def restore(self):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's stop, `kill`), raised where the script is, as Ctrl-C raises KeyboardInterrupt, so
    that the same clean-up runs: a temporary file or folder half written is removed, a run that had not begun
    leaves no folder. (Inside train.py's loop FinishTheStep takes both signals and saves a checkpoint.)"""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one (SLURM and torchrun each pass it on) is one stop
    raise Terminated


def run(main, interrupted="interrupted."):
    """Run a script's main(): warnings as one 'warning:' line (under torchrun, from the first process only),
    Ctrl-C as a sentence and exit 130, SIGTERM as the same sentence and exit 143 (the shell's codes)."""
    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    if "WORLD_SIZE" in os.environ and os.environ.get("RANK", "0") != "0":  # torchrun (minidb/distributed.py):
        # every process reads the same inputs; the first warns
        warnings.simplefilter("ignore")
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the scripts quit quietly while importing
    signal.signal(signal.SIGTERM, _terminate)  # by default it ends the process at once, leaving what it was writing
    try:
        sys.exit(main())
    except KeyboardInterrupt as e:
        print(f"\n{interrupted}", file=sys.stderr)
        sys.exit(128 + (signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT))
