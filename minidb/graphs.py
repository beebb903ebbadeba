"""The UNet's calls replayed as CUDA graphs: sampling's forward, and a training step's forward and backward.

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

Training (TrainingGraph, train.py's step when the UNet's own weights stay frozen: LoRA, a new word) records
the forward and its backward, as torch.cuda.make_graphed_callables does, but by hand, so that each step
gets gradients of its own (added up across --grad-accum micro-batches) and no autograd node of the
trained weights outlives a recording or a step on its stream (the next recording would fail on it).
An SDXL LoRA step at 1024 px took 124 ms replayed on an H200, against 360 to 550 ms eager (varying from
machine to machine, bench/RESULTS.md): eager, the GPU waited for the launches of its 8,100 kernels.

    first call:   warm up eagerly on a side stream (forward and backward, gradients discarded), record
                  the forward and the backward into two graphs that share one memory pool, replay
    later calls:  copy the inputs into the fixed buffers, replay the forward; the loss's backward
                  replays the backward and adds copies of its gradients into the weights' .grad
    other shapes: recorded again; and after release(), which train.py calls before it draws (the
                  recording holds a step's activations, memory that validation and drift need)
"""

import warnings
from contextlib import nullcontext

import torch

_side_streams = {}  # device -> the one side stream for warm-ups, so that their cached memory is reused


def can_graph(unet, x):
    return x.is_cuda and not unet.training and not torch.is_autocast_enabled("cuda")


def can_graph_training(device, method, gradient_checkpointing, world):
    """Whether train.py records its UNet step (TrainingGraph): on CUDA, for a UNet whose own weights stay
    frozen (not --method full, whose gradients for every weight would take another copy of the UNet in
    the recording's memory), without gradient checkpointing (whose recomputation is left eager) and in
    one process (DistributedDataParallel averages gradients in hooks on the weights' gradient nodes,
    which the recorded step does not pass through: it adds into .grad itself)."""
    return torch.device(device).type == "cuda" and method != "full" and not gradient_checkpointing and world == 1


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


def on_its_card(x):
    """A recording starts on the current card: with --device cuda:1, it must be x's."""
    return torch.cuda.device(x.device) if x.is_cuda else nullcontext()


def record(fn, pool=None):
    """fn recorded as a CUDA graph, not run -> (the graph, the tensors each replay writes). Graphs given
    one `pool` (torch.cuda.graph_pool_handle()) share memory: a backward reads what its forward kept."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
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
                with on_its_card(x):
                    self.graph, self.output = record(lambda: self.unet(*self.inputs))
            except RuntimeError as e:  # an operation that cannot be recorded: eager from here on
                warnings.warn(f"the UNet could not be recorded as a CUDA graph ({e}); sampling runs it eagerly.")
                self.failed = True
            if self.failed:  # (outside the except block, whose traceback would hold the recording's memory)
                self.graph = self.inputs = self.output = None
                return self.unet(*values)
        self.graph.replay()
        return self.output.clone()  # the next replay overwrites self.output


class _Replay(torch.autograd.Function):
    """A recorded forward as one step of autograd: forward(recording, anchor, *inputs) replays the
    forward, where `inputs` are those that need gradients (the context, when the text side trains);
    backward replays the backward graph, adds its gradients for the trained weights into their .grad
    itself (copies: the next replay overwrites the graph's own) and returns those for the inputs.
    The weights are not inputs of this step of autograd: their gradient-accumulating nodes, which would
    then live on with the step's loss, on the default stream, would break the next recording (after
    release()). The anchor, a scalar that needs a gradient, makes the output need one."""

    @staticmethod
    def forward(ctx, recording, anchor, *inputs):
        ctx.recording, ctx.call = recording, recording.calls
        recording.forward_graph.replay()
        return recording.output.clone()  # the next replay overwrites recording.output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        r = ctx.recording
        if ctx.call != r.calls:  # the activations it would read are another forward's
            raise RuntimeError("a recorded UNet forward was replayed again before the backward of the one before it; "
                               "run each step's backward before its next forward.")
        r.grad_output.copy_(grad)
        r.backward_graph.replay()
        n = len(r.grads) - len(r.trained)
        weights = r.grads[n:]
        new = [i for i, p in enumerate(r.trained) if p.grad is None]
        added = [i for i, p in enumerate(r.trained) if p.grad is not None]
        for i, g in zip(new, torch._foreach_mul([weights[i] for i in new], 1.0) if new else []):
            r.trained[i].grad = g
        if added:  # --grad-accum: the micro-batches' gradients add up
            torch._foreach_add_([r.trained[i].grad for i in added], [weights[i] for i in added])
        return (None, None, *torch._foreach_mul(list(r.grads[:n]), 1.0)) if n else (None, None)


class TrainingGraph:
    """Call as the UNet in a training step: graph(x, t, context, y) -> the UNet's prediction, whose
    backward gives gradients to `trained` (the weights the UNet uses that train: a LoRA's UNet adapters,
    or none) and to any input that needs them (the context, when the text side trains). The UNet's own
    weights must stay frozen. `dtype`: the autocast dtype of the step (None: no autocast), which the
    recording applies itself, its weight cache off as graphs require. `forget`: called before and after
    each recording to let go of tensors that hold an autograd graph of the trained weights (train.py: the
    LoRA's cast copies). Such a graph keeps each weight's gradient-accumulating node alive, with the stream
    it was made on: one from an eager step, on the default stream, breaks the recording (CUDA refuses
    the wait on a stream outside it), and one from the recording slows every later backward."""

    def __init__(self, unet, trained, dtype=None, forget=None):
        self.unet, self.trained, self.dtype = unet, list(trained), dtype
        self.forget = forget or (lambda: None)
        self.key, self.failed, self.calls, self.anchor = None, False, 0, None

    def _record(self, values):
        device = values[0].device
        self.inputs = [None if v is None else v.detach().clone().requires_grad_(v.requires_grad) for v in values]
        wanting = [b for b in self.inputs if b is not None and b.requires_grad] + self.trained

        def forward():
            with torch.autocast("cuda", dtype=self.dtype or torch.float16, enabled=self.dtype is not None,
                                cache_enabled=False):
                return self.unet(*self.inputs)

        def both():  # the warm-up: cuBLAS and cuDNN set themselves up outside the recording
            out = forward()
            torch.autograd.grad(out, wanting, torch.ones_like(out))
        self.forget()
        warm_up(both, device)
        self.forget()
        pool = torch.cuda.graph_pool_handle()
        self.forward_graph, out = record(forward, pool)
        self.grad_output = torch.empty_like(out)
        self.backward_graph, self.grads = record(lambda: torch.autograd.grad(out, wanting, self.grad_output), pool)
        self.output = out.detach()  # the recording's autograd graph goes with `out`
        self.forget()

    def release(self):
        """Let go of the recording and the memory it holds (a step's activations), for drawing the
        validation grid, say; the next call records again."""
        self.key = self.inputs = self.output = self.grad_output = self.grads = None
        self.forward_graph = self.backward_graph = None

    def __call__(self, x, t, context, y=None):
        t = torch.as_tensor(t, device=x.device)
        values = (x, t, context, y)
        if self.failed:
            return self.unet(*values)
        key = [(v.shape, v.dtype, v.requires_grad) for v in values if v is not None]
        if key != self.key:
            self.release()  # another shape's recording first: two would hold two steps' activations
            try:
                with on_its_card(x):
                    self._record(values)
                self.key = key
            except RuntimeError as e:  # an operation that cannot be recorded, or no memory for the recording
                warnings.warn(f"the UNet's training step could not be recorded as CUDA graphs ({e}); it runs eagerly.")
                self.failed = True
            if self.failed:  # (outside the except block, whose traceback would hold the recording's memory)
                self.release()
                self.forget()
                return self.unet(*values)
        with torch.no_grad():
            for buffer, value in zip(self.inputs, values):
                if buffer is not None:
                    buffer.copy_(value)
        self.calls += 1
        if self.anchor is None:
            self.anchor = torch.zeros((), device=x.device, requires_grad=True)
        return _Replay.apply(self, self.anchor, *[v for v in values if v is not None and v.requires_grad])
