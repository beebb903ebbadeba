"""Sampling's UNet calls replayed as a CUDA graph.

A sampler calls the UNet with the same shapes at every step: only the values of the latents and the
timestep change. In eager mode PyTorch launches each of the UNet's thousands of kernels from Python,
one by one, and in SDXL's deep 32x32 levels (about 60 transformer blocks of 1024 tokens) a kernel's
work on the GPU takes about as long as its launch on the CPU, so the GPU waits. A CUDA graph records
the whole forward once and then launches it as one unit: the same kernels on the same memory, with no
Python between them (PyTorch's "CUDA Graphs" notes).

    step 1:  eager, on a side stream: the warm-up that CUDA graphs ask for (cuDNN and cuBLAS pick their
             algorithms and workspaces), and already the step's real output
    step 2:  copy the inputs into fixed buffers, record the forward into a graph, replay it
    step k:  copy the inputs into the same buffers, replay

The recording's memory lives as long as the UnetGraph, which sample_latents drops when it returns, so
nothing stays allocated between pictures. Only for CUDA, a UNet in eval mode, and no autocast (whose
weight cache does not mix with graphs); everywhere else the UNet runs as it always does.
"""

import warnings

import torch


def can_graph(unet, x):
    return x.is_cuda and not unet.training and not torch.is_autocast_enabled("cuda")


class UnetGraph:
    """Call as the UNet itself: graph(x, t, context, y) -> the UNet's output for these inputs."""

    def __init__(self, unet):
        self.unet, self.graph, self.inputs, self.output, self.failed = unet, None, None, None, False

    def __call__(self, x, t, context, y=None):
        t = torch.as_tensor(t, device=x.device)  # a device tensor, so the recording reads it from memory
        if self.failed:
            return self.unet(x, t, context, y)
        if self.inputs is None:  # step 1: eager on a side stream, the warm-up
            side = torch.cuda.Stream(x.device)
            side.wait_stream(torch.cuda.current_stream(x.device))
            with torch.cuda.stream(side):
                out = self.unet(x, t, context, y)
            torch.cuda.current_stream(x.device).wait_stream(side)
            self.inputs = [v.clone() if v is not None else None for v in (x, t, context, y)]
            return out
        for buffer, value in zip(self.inputs, (x, t, context, y)):
            if buffer is not None:
                buffer.copy_(value)
        if self.graph is None:  # step 2: record
            try:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.output = self.unet(*self.inputs)
            except RuntimeError as e:  # an operation that cannot be recorded: eager from here on
                warnings.warn(f"the UNet could not be recorded as a CUDA graph ({e}); sampling runs it eagerly.")
                self.failed, self.graph = True, None
                return self.unet(x, t, context, y)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites self.output
