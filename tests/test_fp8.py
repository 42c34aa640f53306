"""FP8 matmuls for the frozen 4-bit base (model/fp8.py): the float8 weight is the NF4 weight to e4m3's rounding,
the products are exactly what their float8 operands and scales say (an emulation in float32), and the whole is
the NF4 layer's float product to FP8's tolerance — forward and input gradient, on the CPU and on an FP8 GPU."""
import json
import shutil

import pytest
import torch

from lora import apply_lora, lora_layers
from model import load_llama
from model.fp8 import (E4M3_MAX, block_absmax, fp8_eligible, fp8_linear, fp8_unavailable, nf4_parts, nf4_to_fp8,
                       quantize_rows, use_fp8)
from model.nf4 import dequantize_nf4, is_nf4, quantize_nf4

pytest.importorskip("bitsandbytes")
HALF_ULP = 2.0 ** -4  # e4m3 keeps 3 mantissa bits
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and fp8_unavailable(torch.device("cuda")) is None else [])


def nf4_layer(out_features: int, in_features: int, device: str, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.02
    weight[3] *= 40  # rows of very different size: each gets its own scale
    weight[5, :64] *= 1e-3  # and a block far below the rest of its row
    holder = torch.nn.Module()
    holder.layer = quantize_nf4(weight.to(device, torch.bfloat16), torch.bfloat16)
    assert use_fp8(holder) == 1
    return holder.layer


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_weight_is_the_nf4_weight_to_e4m3_rounding(device):
    layer = nf4_layer(96, 256, device)
    truth = dequantize_nf4(layer, torch.float32)
    weight8 = nf4_to_fp8(nf4_parts(layer), layer.fp8_scale)
    scale = layer.fp8_scale[:, None]
    assert weight8.dtype == torch.float8_e4m3fn and weight8.shape == (96, 256)
    assert torch.equal(weight8.float().abs().amax(1), torch.full((96,), E4M3_MAX, device=device))  # rows fill e4m3
    error = (weight8.float() * scale - truth).abs()
    assert (error <= HALF_ULP * truth.abs() + scale * 2.0 ** -10 + 1e-12).all()  # normals; subnormals' step 2^-9
    transposed = nf4_to_fp8(nf4_parts(layer), layer.fp8_scale, transpose=True)
    assert transposed.shape == (256, 96) and transposed.is_contiguous()
    assert torch.equal(transposed.float(), weight8.float().t())


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_rows(device):
    x = torch.randn(7, 64, device=device) * torch.logspace(-3, 3, 7, device=device)[:, None]
    x[2] = 0
    x8, scale = quantize_rows(x)
    assert x8.dtype == torch.float8_e4m3fn and scale.shape == (7, 1) and scale.dtype == torch.float32
    assert not x8.float().isnan().any()
    assert torch.equal(x8.float()[2], torch.zeros(64, device=device))
    assert torch.equal(x8.float().abs().amax(1)[[0, 1, 3, 4, 5, 6]], torch.full((6,), E4M3_MAX, device=device))
    error = (x8.float() * scale - x).abs()
    assert (error <= HALF_ULP * x.abs() + scale * 2.0 ** -10).all()


@pytest.mark.parametrize("device", DEVICES)
def test_products_are_those_of_their_float8_operands(device):
    """The scaled products (layouts, which scale goes where) against float32 arithmetic on the same float8 values."""
    layer = nf4_layer(96, 256, device)
    x = torch.randn(2, 37, 256, device=device, dtype=torch.bfloat16, requires_grad=True)
    y = fp8_linear(x, layer)
    assert y.shape == (2, 37, 96) and y.dtype == torch.bfloat16
    grad = torch.randn(2, 37, 96, device=device, dtype=torch.bfloat16)
    y.backward(grad)

    weight8, scale = nf4_to_fp8(nf4_parts(layer), layer.fp8_scale).float(), layer.fp8_scale
    x8, x_scale = quantize_rows(x.detach().reshape(-1, 256))
    assert_product(y.reshape(-1, 96), x8.float() * x_scale, (weight8 * scale[:, None]).t())
    grad8, grad_scale = quantize_rows(grad.reshape(-1, 96).float() * scale)
    assert_product(x.grad.reshape(-1, 256), grad8.float() * grad_scale, weight8)


def assert_product(actual: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """actual = a @ b to bf16's rounding, plus (on the GPU) float8 tensor cores' coarser accumulation: a small
    fraction of the sum of the terms' sizes."""
    expected = a @ b
    allowed = 2 ** -8 * expected.abs() + 2 ** -9 * (a.abs() @ b.abs())
    assert ((actual.float() - expected).abs() <= allowed).all()


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_linear_is_the_nf4_product_to_fp8_tolerance(device):
    layer = nf4_layer(96, 256, device)
    weight = dequantize_nf4(layer, torch.float32)
    x = torch.randn(64, 256, device=device, requires_grad=True)
    y = fp8_linear(x, layer)
    assert y.dtype == torch.float32
    grad = torch.randn(64, 96, device=device)
    y.backward(grad)
    reference_x = x.detach().requires_grad_()
    reference = reference_x @ weight.t()
    reference.backward(grad)
    assert (y - reference).norm() / reference.norm() < 0.06  # about 0.04: e4m3 weights and activations
    assert (x.grad - reference_x.grad).norm() / reference_x.grad.norm() < 0.06


def test_only_layers_whose_rows_are_whole_blocks_switch(tiny_checkpoint):
    """The tiny model's down projections read 160 inputs, 2.5 NF4 blocks a row: they keep bitsandbytes' path."""
    model = load_llama(tiny_checkpoint, dtype=torch.bfloat16, quantize="nf4")
    nf4 = {name: m for name, m in model.named_modules() if is_nf4(m)}
    switched = {name for name, m in nf4.items() if fp8_eligible(m)}
    assert switched and all("down_proj" not in name for name in switched)
    assert use_fp8(model) == len(switched)
    assert all(hasattr(m, "fp8_scale") == (name in switched) for name, m in nf4.items())


@pytest.mark.parametrize("device", DEVICES)
def test_lora_model_in_fp8_tracks_its_bf16_twin(tiny_checkpoint, device):
    """The loss and the LoRA gradients of a whole QLoRA model stay near those of the bf16 base."""
    def run(fp8: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = load_llama(tiny_checkpoint, dtype=torch.bfloat16, device=device, quantize="nf4")
        if fp8:
            use_fp8(model)
        apply_lora(model, 8, 16, verbose=False)
        for layer in lora_layers(model).values():
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        tokens = torch.randint(0, 300, (2, 24), device=device)
        logits = model(tokens).float()
        loss = torch.nn.functional.cross_entropy(logits.view(-1, logits.shape[-1]), tokens.view(-1))
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    loss_bf16, grads_bf16 = run(False)
    loss_fp8, grads_fp8 = run(True)
    assert abs(loss_fp8 - loss_bf16) / loss_bf16 < 0.01
    relative = torch.stack([(a.float() - b.float()).norm() / b.float().norm() for a, b in zip(grads_fp8, grads_bf16)])
    assert relative.max() < 0.15 and relative.mean() < 0.08


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU with FP8 matmuls")
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("transpose", [False, True])
def test_triton_dequantization_is_the_reference(nested, transpose):
    """The one-pass kernel against the plain torch arithmetic, on a weight whose rows and columns are not whole
    tiles; a fused multiply-add may move a value by one float8 step, rarely."""
    from model.fp8_triton import nf4_to_fp8_triton

    layer = nf4_layer(208, 640, "cuda")
    parts = nf4_parts(layer)
    if not nested:
        parts = parts._replace(absmax=block_absmax(parts).reshape(-1), inner_code=None, inner_absmax=None,
                               offset=None, inner_blocksize=0)
    expected = nf4_to_fp8(parts, layer.fp8_scale, transpose).float()
    actual = nf4_to_fp8_triton(parts, layer.fp8_scale, transpose)
    assert actual.dtype == torch.float8_e4m3fn and actual.shape == expected.shape and actual.is_contiguous()
    same = actual.float() == expected
    assert same.float().mean() > 0.999
    assert ((actual.float() - expected).abs() <= HALF_ULP * 2 * expected.abs())[~same].all()


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU with FP8 matmuls")
def test_compiled_fp8_matches_eager():
    """torch.compile's fused dequantization computes the same float8 weight and the same products."""
    layer = nf4_layer(256, 512, "cuda")
    x = torch.randn(300, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    eager = fp8_linear(x, layer)
    eager.backward(grad)
    eager_grad, x.grad = x.grad, None
    compiled = torch.compile(fp8_linear, fullgraph=True)(x, layer)
    compiled.backward(grad)
    assert torch.equal(torch.compile(nf4_to_fp8)(nf4_parts(layer), layer.fp8_scale).float(),
                       nf4_to_fp8(nf4_parts(layer), layer.fp8_scale).float())
    torch.testing.assert_close(compiled, eager, rtol=2 ** -7, atol=1e-3 * eager.abs().max().item())
    torch.testing.assert_close(x.grad, eager_grad, rtol=2 ** -7, atol=1e-3 * eager_grad.abs().max().item())


def test_fp8_unavailable_names_the_gpu_or_allows_the_cpu():
    assert fp8_unavailable(torch.device("cpu")) is None
    if torch.cuda.is_available():
        reason = fp8_unavailable(torch.device("cuda"))
        assert reason is None or torch.cuda.get_device_name() in reason


def test_train_and_infer_with_fp8_on_the_cpu(tiny_llama3, tables, tmp_path, monkeypatch, capsys):
    """`--fp8 on` trains on an (emulated) FP8 base and records it; infer scores the same way unless told not to;
    a base that is not 4-bit is one line."""
    import run
    import train.setup

    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))
    switched = []
    monkeypatch.setattr(train.setup, "use_fp8", lambda model: switched.append(use_fp8(model)))
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_llama3), "--data", str(tables[0]), "--out", str(out), "--rank", "4",
            "--batch-size", "4", "--max-steps", "2", "--warmup-steps", "1", "--val-size", "8", "--max-len", "256"]
    assert run.main([*argv, "--quant", "nf4", "--fp8", "on"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["flags"]["fp8"] == "on" and config["manifest"]["precision"].endswith("FP8 base products")
    assert switched and switched[0] > 0
    for flags, calls in (([], 2), (["--fp8", "off"], 2), (["--fp8", "on"], 3)):
        assert run.main(["infer", "--run", str(out), "--data", str(tables[1]), "--out", str(tmp_path / "s.csv"),
                         *flags]) == 0
        assert len(switched) == calls
    # a merged export scores as its run did
    assert run.main(["export", "--run", str(out), "--out", str(tmp_path / "hf"), "--format", "hf"]) == 0
    assert json.loads((tmp_path / "hf" / "judge.json").read_text())["fp8"] == "on"
    assert run.main(["infer", "--model", str(tmp_path / "hf"), "--data", str(tables[1]),
                     "--out", str(tmp_path / "e.csv")]) == 0
    assert len(switched) == 4
    capsys.readouterr()
    assert run.main([*argv, "--out", str(tmp_path / "other"), "--quant", "none", "--fp8", "on"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --fp8 on: FP8 products are for a 4-bit base, and this one is not (the run's --quant none)")
    if not torch.cuda.is_available():
        assert run.main([*argv, "--out", str(tmp_path / "other"), "--fp8", "on"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            "error: --fp8 on: FP8 products are for a 4-bit base, and this one is not (a CPU keeps the base "
            "unquantized unless --quant nf4)")


def test_fp8_on_a_model_with_no_suitable_projection_is_one_line(tmp_path, tables, monkeypatch, capsys):
    """Inputs of 48 and 96: no NF4 row is whole blocks of 64, so --fp8 on would multiply nothing in FP8."""
    import run
    from conftest import llama3_tokenizer_file, make_hf_checkpoint

    monkeypatch.setenv("LLAMA_JUDGE_CACHE", str(tmp_path / "cache"))
    model = make_hf_checkpoint(tmp_path / "odd", hidden_size=48, head_dim=12, intermediate_size=96,
                               vocab_size=128256, bos_token_id=128000, eos_token_id=128001, max_shard_size="20MB")
    shutil.copy(llama3_tokenizer_file(), model / "tokenizer.model")
    capsys.readouterr()
    assert run.main(["train", "--model", str(model), "--data", str(tables[0]), "--out", str(tmp_path / "run"),
                     "--quant", "nf4", "--fp8", "on"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        f"error: --fp8 on: no projection of {model} can multiply in FP8")
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a GPU with FP8 matmuls")
def test_8b_shaped_blocks_in_fp8_stay_near_the_float32_truth(tmp_path, monkeypatch):
    """Two blocks of Llama-3.1-8B's exact shape, one NF4 base: the classifier loss and the LoRA gradients of the
    FP8 path, eager and with its first block compiled (its row quantizations over 14,336 columns as persistent
    reductions, then as looped ones), against float32 arithmetic on the same 4-bit weights, beside the bf16 path's.
    Stated tolerance: loss within 25 % and gradients within 40 % (relative norm) of the truth, where bf16 stays
    within 2 % and 10 %: e4m3 keeps 3 mantissa bits to bf16's 7, and random weights of this shape amplify every
    rounding (measured on an H100: loss 15-19 % and gradients 32-33 % off, bf16 0.6 % and 2.8 %). A wrong scale or
    layout is off by 100 %."""
    from safetensors.torch import load_file, save_file

    from conftest import make_hf_checkpoint
    from train.batch import right_padded
    from train.objective import loss_sum

    checkpoint = make_hf_checkpoint(tmp_path / "8b", max_shard_size="4GB", num_hidden_layers=2, hidden_size=4096,
                                    intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                                    head_dim=128, vocab_size=512)
    for shard in checkpoint.glob("*.safetensors"):  # bf16 values: both loads quantize the same numbers
        save_file({k: v.to(torch.bfloat16) for k, v in load_file(shard).items()}, shard, metadata={"format": "pt"})
    generator = torch.Generator().manual_seed(3)
    lengths = torch.tensor([300, 211, 97, 256])
    tokens = torch.randint(0, 512, (4, 300), generator=generator) * (torch.arange(300) < lengths[:, None])
    rows = right_padded(tokens.cuda(), lengths.cuda(), torch.tensor([1, 0, 0, 1]).cuda())
    label_ids = torch.tensor([3, 4], device="cuda")

    def loss_and_grads(dtype: torch.dtype, fp8: bool, reductions: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        model = load_llama(checkpoint, dtype=dtype, device="cuda", quantize="nf4", head_rows=[3, 4])
        if fp8:
            use_fp8(model)
        apply_lora(model, 16, 16, verbose=False)
        if reductions:  # inductor's multi-kernel mode: 2 persistent reductions only, 3 looped ones only
            model.compile_blocks()
            monkeypatch.setattr(torch._inductor.config.triton, "multi_kernel", reductions)
            torch._dynamo.reset()  # no recompile limit reached by earlier tests: this block compiles
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        init = torch.Generator().manual_seed(1)
        with torch.no_grad():  # the same adapter in all five
            for layer in lora_layers(model).values():
                for p in (layer.lora_A.weight, layer.lora_B.weight):
                    p.copy_(torch.randn(p.shape, generator=init) * 0.01)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.float32):
            loss = loss_sum(model, rows, label_ids)
        loss.backward()
        if reductions:
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs
        return loss.detach().float(), torch.cat([p.grad.float().flatten() for p in model.parameters()
                                                 if p.requires_grad])

    truth_loss, truth = loss_and_grads(torch.float32, False)
    bf16_loss, bf16 = loss_and_grads(torch.bfloat16, False)
    fp8_loss, fp8 = loss_and_grads(torch.bfloat16, True)
    persistent_loss, persistent = loss_and_grads(torch.bfloat16, True, reductions=2)
    looped_loss, looped = loss_and_grads(torch.bfloat16, True, reductions=3)
    bf16_error, fp8_error, persistent_error, looped_error = (
        (g - truth).norm() / truth.norm() for g in (bf16, fp8, persistent, looped))
    print(f"loss {truth_loss:.5f} bf16 {bf16_loss:.5f} fp8 {fp8_loss:.5f} compiled {persistent_loss:.5f} (persistent) "
          f"{looped_loss:.5f} (looped); gradient error bf16 {bf16_error:.4f} fp8 {fp8_error:.4f} compiled "
          f"{persistent_error:.4f} (persistent) {looped_error:.4f} (looped)")
    assert (bf16_loss - truth_loss).abs() <= 0.02 * truth_loss.abs() and bf16_error <= 0.1
    for loss, error in ((fp8_loss, fp8_error), (persistent_loss, persistent_error), (looped_loss, looped_error)):
        assert (loss - truth_loss).abs() <= 0.25 * truth_loss.abs() and error <= 0.4
