"""The speed levers (recomputation, 4-bit base on the GPU) keep the loss and the LoRA gradients of the plain path."""
import pytest
import torch

from lora import apply_lora, lora_layers
from model import load_llama
from train.objective import loss_sum
from train.predict import autocast

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def loss_and_grads(model, tokens, lengths, labels, label_ids):
    model.zero_grad(set_to_none=True)
    with autocast(tokens.device):
        loss = loss_sum(model, tokens, lengths, labels, label_ids)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("recompute", [True, 1, "compile"])
def test_recomputation_keeps_loss_and_gradients(tiny_checkpoint, device, recompute):
    if recompute == "compile" and device == "cpu":
        pytest.skip("compilation is a GPU lever; inductor's CPU build takes a minute of CI time")
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    model = apply_lora(load_llama(tiny_checkpoint, dtype=dtype, device=device), 8, 16, verbose=False)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(0, 0.05)
    lengths = torch.tensor([14, 9, 3], device=device)
    tokens = torch.randint(0, 300, (3, 14), device=device) * (torch.arange(14, device=device) < lengths[:, None])
    labels, label_ids = torch.tensor([1, 0, 1], device=device), torch.tensor([3, 4], device=device)

    plain_loss, plain_grads = loss_and_grads(model, tokens, lengths, labels, label_ids)
    if recompute == "compile":
        model.compile_blocks()
    else:
        model.grad_checkpoint = recompute
    fast_loss, fast_grads = loss_and_grads(model, tokens, lengths, labels, label_ids)
    # Compiled kernels fuse and reorder float operations: equal to rounding, not to the bit.
    torch.testing.assert_close(fast_loss, plain_loss, rtol=1e-5 if recompute != "compile" else 1e-2, atol=0)
    # On the GPU, flash attention's backward accumulates in a run-dependent order: bf16-level agreement.
    rtol, atol = (1e-5, 1e-7) if device == "cpu" else (2e-2, 1e-3)
    for plain, fast in zip(plain_grads, fast_grads):
        torch.testing.assert_close(fast, plain, rtol=rtol, atol=atol * plain.abs().max().item())
