"""The speed levers (recomputation, compiled blocks, the final block on the last positions only) keep the loss
and the LoRA gradients of the plain path.

On the CPU everything runs in float32 and the fast path must match the plain one to rounding. On the GPU both
run in bf16, where any reordering of float operations shows; there the fast path's distance from the float32
truth must stay within that of the plain bf16 path."""
import pytest
import torch
import torch.nn.functional as F

from lora import apply_lora, lora_layers
from model import load_llama
from train.objective import loss_sum
from train.predict import autocast

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def every_position_loss(model, tokens, lengths, labels, label_ids):
    """The two-class loss read off the full [B, T, D] hidden states, as before the final block was trimmed."""
    hidden = model.hidden_states(tokens)[torch.arange(len(tokens), device=tokens.device), lengths - 1]
    logits = hidden @ model.lm_head.weight[label_ids].to(hidden.dtype).T
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def loss_and_grads(checkpoint, device, dtype, fast_path=None, every_position=False):
    model = apply_lora(load_llama(checkpoint, dtype=dtype, device=device), 8, 16, verbose=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    if fast_path == "compile":
        model.compile_blocks()
    elif fast_path is not None:
        model.grad_checkpoint = fast_path
    lengths = torch.tensor([14, 9, 3], device=device)
    tokens = torch.randint(0, 300, (3, 14), generator=generator).to(device)
    tokens = tokens * (torch.arange(14, device=device) < lengths[:, None])
    labels, label_ids = torch.tensor([1, 0, 1], device=device), torch.tensor([3, 4], device=device)
    with autocast(torch.device(device)) if dtype != torch.float32 else torch.autocast("cpu", enabled=False):
        loss = (every_position_loss if every_position else loss_sum)(model, tokens, lengths, labels, label_ids)
    loss.backward()
    return loss.detach().float().cpu(), torch.cat([p.grad.float().flatten().cpu() for p in model.parameters()
                                                   if p.requires_grad])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fast_path", [True, 1, "compile"])
def test_fast_path_keeps_loss_and_gradients(tiny_checkpoint, device, fast_path):
    if fast_path == "compile" and device == "cpu":
        pytest.skip("compilation is a GPU lever; inductor's CPU build takes a minute of CI time")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    truth_loss, truth_grads = loss_and_grads(tiny_checkpoint, device, torch.float32)
    plain_loss, plain_grads = loss_and_grads(tiny_checkpoint, device, dtype)
    fast_loss, fast_grads = loss_and_grads(tiny_checkpoint, device, dtype, fast_path)
    scale = truth_grads.abs().max()
    plain_error = (plain_grads - truth_grads).abs().max()
    assert (fast_grads - truth_grads).abs().max() <= 1.5 * plain_error + 1e-6 * scale
    assert (fast_loss - truth_loss).abs() <= 1.5 * (plain_loss - truth_loss).abs() + 1e-6 * truth_loss.abs()


@pytest.mark.parametrize("device", DEVICES)
def test_final_block_on_last_positions_keeps_loss_and_gradients(tiny_checkpoint, device):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    truth_loss, truth_grads = loss_and_grads(tiny_checkpoint, device, torch.float32, every_position=True)
    plain_loss, plain_grads = loss_and_grads(tiny_checkpoint, device, dtype, every_position=True)
    fast_loss, fast_grads = loss_and_grads(tiny_checkpoint, device, dtype)
    scale = truth_grads.abs().max()
    assert scale > 0
    assert (fast_grads - truth_grads).abs().max() <= 1.5 * (plain_grads - truth_grads).abs().max() + 1e-6 * scale
    assert (fast_loss - truth_loss).abs() <= 1.5 * (plain_loss - truth_loss).abs() + 1e-6 * truth_loss.abs()
