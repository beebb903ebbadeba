"""LoRA (Hu et al. 2021, arXiv 2106.09685): DreamBooth that trains small low-rank updates, in kohya's files,
which AUTOMATIC1111, ComfyUI, kohya's scripts and diffusers read as they are (diffusers' loader in the tests;
the others' naming rules).

A LoRA leaves a layer y = W x + b frozen and adds (alpha / rank) * up(down(x)), where `down` maps the
layer's input to `rank` channels (4 to 128) and `up` maps them back. `up` starts at zero, so training
starts from the base model exactly. Afterwards W + (alpha / rank) * up @ down can be merged into the
weights: sampling then costs nothing extra.

Names. The format people exchange is kohya's (sd-scripts, networks/lora.py): one adapter per layer,
holding `lora_down.weight`, `lora_up.weight` and `alpha`, named
    lora_unet_<diffusers module path, "." -> "_">   lora_unet_down_blocks_0_attentions_0_proj_in
    lora_te_text_model_<transformers module path>   lora_te_text_model_encoder_layers_0_mlp_fc1
minidb's UNet carries the original CompVis names (input_blocks.1.1.proj_in), so `naming()` derives
the table from minidb/convert.py's block table. For SDXL kohya builds its own UNet with the original
names (sd-scripts' sdxl_original_unet.py), and names its two text towers apart:
    lora_unet_<original module path>                lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q
    lora_te1_text_model_... (CLIP-L), lora_te2_text_model_... (OpenCLIP-bigG)
Other tools name the same layers in other ways: minidb/lora_files.py reads them all.

Legend: r rank, O/I a layer's output/input channels, k its kernel size.
"""

import hashlib
import math
import warnings

import safetensors.torch
import torch
import torch.nn as nn
import torch.nn.functional as F

from minidb.convert import native_to_diffusers_names, unet_blocks
from minidb.writes import write_safetensors
from minidb.unet import SpatialTransformer

UNET = "lora_unet_"


def text_parts(model):
    """{text tower: kohya's prefix}: SD 1.x / 2.x have one text encoder, SDXL two."""
    if getattr(model, "text_encoder_2", None) is None:
        return {"text_encoder": "lora_te_"}
    return {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def naming(model):
    """{kohya name: (part, minidb module name, diffusers / transformers module path)} for every Linear
    and Conv2d of the UNet and the text encoders' layers: the rule files use to name a LoRA's layers."""
    table, sdxl = {}, getattr(model, "text_encoder_2", None) is not None
    layers = [n for n, m in model.unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    paths = native_to_diffusers_names([n + ".weight" for n in layers], unet_blocks(model.unet.cfg))
    for name in layers:
        path = paths[name + ".weight"].removesuffix(".weight")  # input_blocks.1.1 -> down_blocks.0.attentions.0
        table[UNET + (name if sdxl else path).replace(".", "_")] = ("unet", name, path)
    for part, prefix in text_parts(model).items():
        for name, m in getattr(model, part).named_modules():
            if isinstance(m, nn.Linear) and name.startswith("encoder."):  # transformers 4's CLIPTextModel, which
                # kohya names, wraps all in text_model
                table[prefix + "text_model_" + name.replace(".", "_")] = (part, name, "text_model." + name)
    return table


def _kohya_targets(model, text_encoder):
    """kohya's default LoRA (no conv_dim): every Linear and 1x1 Conv2d inside the UNet's
    SpatialTransformers (its Transformer2DModel), and every Linear of the CLIP layers."""
    inside = tuple(n + "." for n, m in model.unet.named_modules() if isinstance(m, SpatialTransformer))
    for kohya, (part, name, _) in naming(model).items():
        layer = getattr(model, part).get_submodule(name)
        if part == "unet" and name.startswith(inside) and (isinstance(layer, nn.Linear) or layer.kernel_size == (1, 1)):
            yield kohya, layer
        elif part != "unet" and text_encoder and name.startswith("encoder.layers."):
            yield kohya, layer


class Adapter(nn.Module):
    """One layer's update (alpha / rank) * up(down(x)), laid out as kohya's LoRAModule."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        if isinstance(base, nn.Conv2d):  # down takes the layer's kernel, up is 1x1
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            self.lora_down = nn.Linear(base.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # kohya's init (PyTorch's Linear default)
        nn.init.zeros_(self.lora_up.weight)  # so that step 0 is the base model
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        # The scale as a Python number: a tensor would cost a kernel each call, and on a GPU the eager
        # step appears bound by its kernel launches. A loaded state (--resume) brings its own alpha.
        self.scale = float(alpha) / rank
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "scale", module.alpha.item() / rank))
        self.cast = None  # (down, up) in autocast's dtype for this forward, when the LoRA cast them all at once

    def weights(self):
        return self.cast or (self.lora_down.weight, self.lora_up.weight)

    def forward(self, x):  # the scale applied to the rank-wide middle, the smallest tensor on the way;
        down, up = self.weights()  # at alpha = rank (the default) there is nothing to apply
        conv = isinstance(self.lora_up, nn.Conv2d)
        h = F.conv2d(x, down, None, self.lora_down.stride, self.lora_down.padding) if conv else F.linear(x, down)
        h = h if self.scale == 1 else h * self.scale
        return F.conv2d(h, up) if conv else F.linear(h, up)

    def add_to(self, output, x):
        """output + self(x). For a Linear, one addmm projects up, scales and adds: one kernel for three."""
        if isinstance(self.lora_up, nn.Conv2d):
            return output + self(x).to(output.dtype)
        down, up = self.weights()
        h = F.linear(x, down)
        flat = torch.addmm(output.reshape(-1, output.shape[-1]).to(h.dtype), h.reshape(-1, h.shape[-1]), up.t(),
                           alpha=self.scale)
        return flat.view(output.shape).to(output.dtype)


def _add_update(adapter):
    def hook(layer, args, output):  # a forward hook's return value replaces the layer's output
        x = args[0]
        if not torch.is_autocast_enabled(x.device.type):  # an fp16 model, fp32 adapters (under autocast the
            x = x.to(adapter.lora_down.weight.dtype)      # adapter's matmuls cast for themselves: no fp32 copy)
        return adapter.add_to(output, x)
    return hook


class _CastAll(torch.autograd.Function):
    """Many weights (of one dtype) to another dtype in one batched copy, and their gradients back in one.
    Autocast does the same numbers weight by weight: two kernels per weight and step, 2888 for the 722 adapters
    of SDXL's default LoRA (2240 for the 560 of the attention-only bench row), where CUDA's batched copy takes
    one kernel per 64 tensors (bench/op_count.py)."""

    @staticmethod
    def forward(ctx, dtype, *weights):
        ctx.set_materialize_grads(False)
        ctx.dtype = weights[0].dtype
        copies = [torch.empty_like(w, dtype=dtype) for w in weights]
        torch._foreach_copy_(copies, weights)
        return tuple(copies)

    @staticmethod
    def backward(ctx, *grads):
        given = [g for g in grads if g is not None]  # None: a weight this forward did not use
        back = [torch.empty_like(g, dtype=ctx.dtype) for g in given]
        if given:
            torch._foreach_copy_(back, given)
        back = iter(back)
        return (None, *[None if g is None else next(back) for g in grads])


def _cast_all(adapters):
    """A forward pre-hook for a model part: under autocast, with gradients, give its adapters their
    weights in autocast's dtype for this forward, all cast at once; otherwise their own weights (and
    autocast casts as usual). The copies stay until the part's next forward, so that a block that
    gradient checkpointing recomputes in the backward finds the same ones."""
    def hook(part, args):
        device = adapters[0].lora_down.weight.device.type
        if not (torch.is_grad_enabled() and torch.is_autocast_enabled(device)):
            for a in adapters:
                a.cast = None
            return
        copies = _CastAll.apply(torch.get_autocast_dtype(device), *[w for a in adapters for w in
                                                                    (a.lora_down.weight, a.lora_up.weight)])
        for i, a in enumerate(adapters):
            a.cast = copies[2 * i:2 * i + 2]
    return hook


class LoRA(nn.Module):
    """Low-rank adapters W + (alpha/rank) * up @ down on a StableDiffusion model's modules.

    Targets, as kohya's default LoRA (sd-scripts networks/lora.py without conv_dim): every Linear and
    1x1 Conv2d inside the UNet's SpatialTransformers (proj_in, proj_out, attn1/attn2 to_q, to_k, to_v,
    to_out.0, ff.net.0.proj, ff.net.2); with text_encoder=True also each CLIP layer's self_attn q_proj,
    k_proj, v_proj, out_proj and mlp fc1, fc2 (in both of SDXL's text encoders). Each adapter is a
    submodule named as kohya names it, so `state_dict()` keys are the file's keys. alpha None means
    alpha = rank (scale 1). The adapters are fp32 on the model's device, trainable (but for those of a
    layer nothing runs: SDXL's CLIP-L's last); the model itself is left as it is.
    """

    def __init__(self, model, rank=16, alpha=None, text_encoder=False):
        super().__init__()
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"The LoRA rank must be a positive whole number, not {rank!r}.")
        self.rank, self.alpha = rank, float(rank if alpha is None else alpha)
        self.version, self.prediction_type = model.version, model.prediction_type
        self.bases = {}  # kohya name -> the layer it adapts; a plain dict, so not part of the LoRA's state
        for kohya, layer in _kohya_targets(model, text_encoder):
            self.add_module(kohya, Adapter(layer, rank, self.alpha).to(layer.weight.device))
            self.bases[kohya] = layer
        widest = max((min(layer.weight.shape[:2]) for layer in self.bases.values()), default=rank)  # a layer's rank
        if rank > widest:  # (the toy model's are 64 or 128; SD's 320 to 1280)
            warnings.warn(f"--lora-rank {rank} is more than any adapted layer's own rank (at most {widest}), so "
                          f"the adapters hold more numbers than their layers and learn no more than at rank {widest}; "
                          f"pick --lora-rank {widest} or less.")
        for part, prefix in text_parts(model).items() if text_encoder else ():
            cfg = getattr(model, part).cfg
            if cfg.skip_last and not cfg.projection:  # SDXL's CLIP-L: its context is the penultimate layer's
                # output, and with no pooled vector asked of it nothing runs its last layer. kohya adapts that
                # layer all the same (its files and counts have it); frozen, its adapters stay as they start,
                # and DistributedDataParallel does not wait for gradients that never come.
                unread = tuple(f"{prefix}text_model_encoder_layers_{i}_"
                               for i in range(cfg.layers - cfg.skip_last, cfg.layers))
                for kohya, adapter in self.named_children():
                    if kohya.startswith(unread):
                        adapter.requires_grad_(False)
        self.parts = {UNET: model.unet, **{prefix: getattr(model, part) for part, prefix in text_parts(model).items()}}
        self.handles = []

    def attach(self):
        """Add each adapter's update to its layer's output: forward hooks, which autocast casts like any
        layer, and which run again when torch.utils.checkpoint recomputes a block. Under autocast each
        model part's forward first casts all its adapters' weights at once (_cast_all)."""
        self.detach()
        self.handles = [self.bases[k].register_forward_hook(_add_update(a)) for k, a in self.named_children()]
        for prefix, part in self.parts.items():
            adapters = [a for k, a in self.named_children() if k.startswith(prefix)]
            if adapters:
                self.handles.append(part.register_forward_pre_hook(_cast_all(adapters)))
        return self

    def detach(self):
        for handle in self.handles:
            handle.remove()
        self.handles = []
        return self.drop_casts()

    def drop_casts(self):
        """Forget the weights the last forward cast (_cast_all), and the autograd graph they hold."""
        for adapter in self.children():
            adapter.cast = None
        return self


def save_kohya(lora, path, metadata=None, dtype=torch.float16):
    """Write `lora` as kohya's .safetensors, with the ss_* metadata A1111 and Forge read (ss_v2 tells
    them SD 2.x; ss_base_model_version as kohya spells it: get_model_version_str_for_sd1_sd2, and
    sdxl_model_util's "sdxl_base_v1-0")."""
    version = {"SDXL": "sdxl_base_v1-0", "SD 2.x": "sd_v2"}.get(lora.version, "sd_v1")
    if lora.version != "SDXL" and lora.prediction_type == "v_prediction":
        version += "_v"
    info = {k: str(v) for k, v in (metadata or {}).items()}
    info.update({"ss_network_module": "networks.lora", "ss_network_dim": str(lora.rank),
                 "ss_network_alpha": str(lora.alpha), "ss_base_model_version": version,
                 "ss_v2": str(lora.version == "SD 2.x")})
    # alpha stays fp32, the number training scaled by: in fp16 0.1 would read back as 0.09998, and an alpha under
    # 6e-8 as 0, which kohya, A1111 and ComfyUI take for "no alpha", scale 1
    tensors = {k: t.to(torch.float32 if k.endswith(".alpha") else dtype).contiguous().cpu()
               for k, t in lora.state_dict().items()}
    # sshs_model_hash, as kohya writes it: the sha256 of the bytes after the header (the "addnet" hash, which the
    # header and so the metadata do not change). A1111 indexes its LoRAs by it, so that a picture's "Lora hashes"
    # finds this file by its content on paste (extensions-builtin/Lora/network.py); without it, only once hashed.
    data = safetensors.torch.save(tensors)
    info["sshs_model_hash"] = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    write_safetensors(path, tensors, metadata=info)
