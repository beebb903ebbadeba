"""bench/run.py's SDXL rows (defined in bench/rows.py) measure like against like: at tiny SDXL-shaped
presets, minidb's and diffusers' UNets compute the same thing from the same weights and conditioning,
the LoRA rows train the same number of parameters (with checkpointing too), and the load row's file,
written one tensor at a time, is what safetensors, minidb and diffusers (offline) all read."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from conftest import diffusers  # noqa: F401  (skips without diffusers)
from minidb import text_encoder as te, unet as un, vae as va
from test_sdxl import TINY_G, TINY_L, TINY_SDXL_UNET

rows = pytest.importorskip("bench.rows")  # python -m pytest runs from the repository root
from bench.checkpoints import prepare_load_files, write_streamed  # noqa: E402


@pytest.fixture
def tiny_sdxl(monkeypatch):
    """SDXL's presets made tiny: the text towers 64-wide per head, as the shape reader expects, the
    pooled vector and the context as wide as SDXL's, which the rows' inputs have."""
    monkeypatch.setattr(te, "SDXL_L", dataclasses.replace(TINY_L, width=768, heads=12, mlp_width=64, layers=2))
    monkeypatch.setattr(te, "SDXL_G", dataclasses.replace(TINY_G, width=1280, heads=20, mlp_width=64, layers=2,
                                                          projection=1280))
    monkeypatch.setattr(un, "SDXL", dataclasses.replace(TINY_SDXL_UNET, context_dim=2048,
                                                        adm_in_channels=1280 + 6 * un.SIZE_FEATURES))
    monkeypatch.setattr(va, "SDXL", dataclasses.replace(va.TINY, scale_factor=va.LATENT_SCALE_XL))


def test_streamed_safetensors_read_back(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g), "b.weight": torch.randn(7, generator=g).half(),
               "c": torch.randn(2, 2, 3, generator=g).bfloat16()}
    write_streamed(tmp_path / "x.safetensors", {k: (tuple(t.shape), t.dtype) for k, t in tensors.items()},
                       lambda k: tensors[k])
    back = load_file(tmp_path / "x.safetensors")
    assert back.keys() == tensors.keys()
    assert all(back[k].dtype == t.dtype and torch.equal(back[k], t) for k, t in tensors.items())


def test_sdxl_unet_row_computes_the_same_in_both(tiny_sdxl, tmp_path):
    with torch.no_grad():
        ours, theirs = (rows.task("sdxl-unet", impl, "cpu", 16, tmp_path)() for impl in ("minidb", "diffusers"))
    assert ours.shape == (2, 4, 16, 16)
    assert torch.allclose(ours, theirs, atol=1e-5 * theirs.abs().max().item()) and theirs.abs().max() > 1e-3


@pytest.mark.parametrize("row", ["sdxl-lora-step", "sdxl-lora-step-gc"])
def test_sdxl_lora_rows_train_the_same_layers(tiny_sdxl, tmp_path, row):
    with torch.enable_grad():
        steps = [rows.task(row, impl, "cpu", 64, tmp_path) for impl in ("minidb", "diffusers")]
        for step in steps:
            step()  # the first step checks that every adapter got a gradient
    assert steps[0].trained == steps[1].trained > 0


def test_sdxl_load_row_reads_the_same_weights_in_both(tiny_sdxl, tmp_path):
    prepare_load_files(tmp_path, "SDXL")
    sums = [rows.loader(impl, "cpu", tmp_path, "SDXL")() for impl in ("minidb", "diffusers")]
    assert sums[0] == pytest.approx(sums[1], rel=1e-6) and sums[0] != 0


def test_op_count_counts_kernels_and_leaves_out_views():
    """bench/op_count.py counts what launches a kernel: the matmul, the add, and a reshape that has to
    copy; not a transpose, a reshape that needn't copy, or a detach."""
    from bench.op_count import Launches
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    with Launches() as launched:
        ((a.t().t() @ b).reshape(-1) + 1).detach()
    assert launched.ops == {"mm": 1, "add": 1}
    with Launches() as launched:
        (a @ b).t().reshape(-1)  # the transpose is not contiguous: the reshape copies it
    assert launched.ops == {"mm": 1, "clone": 1}


def test_a_norm_returned_in_fp32_is_cast_once_and_the_block_computes_the_same():
    """Under CUDA's autocast a LayerNorm returns fp32, and each layer reading it casts it to bf16 again.
    minidb's transformer block casts each norm's output once instead. With the CPU made to run norms as
    CUDA does (bench/op_count.py's cuda_norms), the block's output is bit for bit what each layer casting
    for itself gives, and it casts 2 times fewer: norm1 feeds to_q, to_k and to_v (3 casts -> 1), norm2
    and norm3 one layer each (1 -> 1)."""
    from bench.op_count import Launches, cuda_norms
    from minidb.unet import BasicTransformerBlock
    torch.manual_seed(0)
    block = BasicTransformerBlock(64, 32, heads=2, head_dim=32, upcast=False).to(torch.bfloat16)
    x, context = torch.randn(2, 16, 64).bfloat16(), torch.randn(2, 7, 32).bfloat16()

    def each_layer_casts(x):  # the block's forward without its casts
        n = block.norm1(x)
        x = x + block.attn1(n, n)
        x = x + block.attn2(block.norm2(x), context)
        return x + block.ff(block.norm3(x))

    with torch.no_grad(), cuda_norms(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert block.norm1(x).dtype == torch.float32  # the emulation holds
        with Launches() as once:
            ours = block(x, context)
        with Launches() as each:
            theirs = each_layer_casts(x)
    assert ours.dtype == theirs.dtype == torch.bfloat16 and torch.equal(ours, theirs)
    assert each.ops["_to_copy"] - once.ops["_to_copy"] == 2
    assert {op: n for op, n in once.ops.items() if op != "_to_copy"} == \
        {op: n for op, n in each.ops.items() if op != "_to_copy"}
