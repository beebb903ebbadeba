"""Sampling's UNet calls replayed as a CUDA graph.

A sampler calls the UNet with the same shapes at every step: only the values of the latents and the
timestep change. In eager mode PyTorch launches each of the UNet's thousands of kernels from Python,
one by one, and in SDXL's deep 32x32 levels (about 60 transformer blocks of 1024 tokens) a kernel's
work on the GPU takes about as long as its launch on the CPU, so the GPU waits. A CUDA graph records
the whole forward once and then launches it as one unit: the same kernels on the same memory, with no
Python between them (PyTorch's "CUDA Graphs" notes).

    first call:   eager, on a side stream: the warm-up that CUDA graphs ask for (cuDNN and cuBLAS pick
                  their algorithms and workspaces), and already that step's real output
    second call:  copy the inputs into fixed buffers, record the forward into a graph, replay it
    later calls:  copy the inputs into the same buffers, replay
    other shapes: the recording is dropped and the three steps start again

The recording holds one forward's activations for as long as the UnetGraph lives: sample_latents makes
one per call unless it is handed one to keep (sample.py, the class prior and each validation grid keep
one for all their pictures, so each records once). Only for CUDA, a UNet in eval mode, and no autocast (whose weight
cache does not mix with graphs); everywhere else the UNet runs as it always does.
"""

import warnings

import torch

_side_streams = {}  # device -> the one side stream for warm-ups, so that their cached memory is reused


def can_graph(unet, x):
    return x.is_cuda and not unet.training and not torch.is_autocast_enabled("cuda")


def warm_up(fn, device):
    """fn() run eagerly on the device's side stream, after the work queued before it and before what follows."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    side, current = _side_streams[device], torch.cuda.current_stream(device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        out = fn()
    current.wait_stream(side)
    return out


def record(fn):
    """fn recorded as a CUDA graph, not run -> (the graph, the tensors each replay writes)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class UnetGraph:
    """Call as the UNet itself: graph(x, t, context, y) -> the UNet's output for these inputs."""

    def __init__(self, unet):
        self.unet, self.failed = unet, False
        self.graph = self.inputs = self.output = None

    def __call__(self, x, t, context, y=None):
        t = torch.as_tensor(t, device=x.device)  # a device tensor, so the recording reads it from memory
        values = (x, t, context, y)
        if self.failed:
            return self.unet(*values)
        if self.inputs is not None and [(v.shape, v.dtype) for v in self.inputs if v is not None] != \
                [(v.shape, v.dtype) for v in values if v is not None]:
            self.graph = self.inputs = self.output = None  # other shapes: record again
        if self.inputs is None:  # the warm-up, whose output is this step's
            out = warm_up(lambda: self.unet(*values), x.device)
            self.inputs = [v.clone() if v is not None else None for v in values]  # the recording's fixed inputs
            return out
        for buffer, value in zip(self.inputs, values):
            if buffer is not None:
                buffer.copy_(value)
        if self.graph is None:
            try:
                self.graph, self.output = record(lambda: self.unet(*self.inputs))
            except RuntimeError as e:  # an operation that cannot be recorded: eager from here on
                warnings.warn(f"the UNet could not be recorded as a CUDA graph ({e}); sampling runs it eagerly.")
                self.failed, self.graph = True, None
                return self.unet(*values)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites self.output
