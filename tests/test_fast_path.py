"""The speed levers (recomputation, compiled blocks, CUDA graphs, the final block on the last positions only) keep
the loss and the LoRA gradients of the plain path.

On the CPU everything runs in float32 and the fast path must match the plain one to rounding. On the GPU both
run in bf16, where any reordering of float operations shows; there the fast path's distance from the float32
truth must stay within that of the plain bf16 path."""
import pytest
import torch
import torch.nn.functional as F

from lora import apply_lora, lora_layers
from model import load_llama
from train.objective import loss_sum
from train.optim import AdamW
from train.predict import autocast
from train.step import optimizer_step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def every_position_loss(model, tokens, lengths, labels, label_ids):
    """The two-class loss read off the full [B, T, D] hidden states, as before the final block was trimmed."""
    hidden = model.hidden_states(tokens)[torch.arange(len(tokens), device=tokens.device), lengths - 1]
    logits = hidden @ model.lm_head.weight[label_ids].to(hidden.dtype).T
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def lora_model(checkpoint, device, dtype, fast_path=None):
    model = apply_lora(load_llama(checkpoint, dtype=dtype, device=device), 8, 16, verbose=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    if fast_path in ("compile", "cuda-graphs"):
        model.compile_blocks(cuda_graphs=fast_path == "cuda-graphs")
    elif fast_path is not None:
        model.grad_checkpoint = fast_path
    return model


def batch(device, seed=2, seq_len=14):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([seq_len, 9, 3], device=device)
    tokens = torch.randint(0, 300, (3, seq_len), generator=generator).to(device)
    tokens = tokens * (torch.arange(seq_len, device=device) < lengths[:, None])
    return tokens, lengths, torch.tensor([1, 0, 1], device=device)


def backward(model, micro_batches, dtype, every_position=False):
    """The summed loss of the micro-batches and the LoRA gradients it accumulates (then cleared)."""
    label_ids, total = torch.tensor([3, 4], device=micro_batches[0][0].device), 0
    for tokens, lengths, labels in micro_batches:
        with autocast(tokens.device) if dtype != torch.float32 else torch.autocast("cpu", enabled=False):
            loss = (every_position_loss if every_position else loss_sum)(model, tokens, lengths, labels, label_ids)
        loss.backward()
        total += loss.detach().float().cpu()
    grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return total, grads


def loss_and_grads(checkpoint, device, dtype, fast_path=None, every_position=False):
    model = lora_model(checkpoint, device, dtype, fast_path)
    return backward(model, [batch(device)], dtype, every_position)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fast_path", [True, 1, "compile", "cuda-graphs"])
def test_fast_path_keeps_loss_and_gradients(tiny_checkpoint, device, fast_path):
    if fast_path in ("compile", "cuda-graphs") and device == "cpu":
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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_keep_loss_and_accumulated_gradients_over_replays(tiny_checkpoint):
    # Steps 1 and 2 warm up and record the graphs; later steps replay them. Two micro-batches a step check that
    # gradients add up across replays that reuse the graphs' memory. lr 0 keeps the three models equal.
    results = []
    for dtype, fast_path in ((torch.float32, None), (torch.bfloat16, None), (torch.bfloat16, "cuda-graphs")):
        model = lora_model(tiny_checkpoint, "cuda", dtype, fast_path)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer, grads = AdamW(params, lr=0.0, weight_decay=0.0), []
        optimizer.step = lambda: grads.append(torch.cat([p.grad.float().flatten().cpu() for p in params]))
        losses = [optimizer_step(model, optimizer, [batch("cuda", seed=10 * step + i, seq_len=16) for i in range(2)],
                                 torch.tensor([3, 4], device="cuda"), max_grad_norm=1e9)[0] for step in range(4)]
        results.append((torch.tensor(losses), grads))
    (truth_losses, truth_grads), (plain_losses, plain_grads), (graph_losses, graph_grads) = results
    assert len(graph_grads) == 4
    for truth, plain, graphs in zip(truth_grads, plain_grads, graph_grads):
        assert (graphs - truth).abs().max() <= 1.5 * (plain - truth).abs().max() + 1e-6 * truth.abs().max()
    assert (graph_losses - truth_losses).abs().max() <= 1.5 * (plain_losses - truth_losses).abs().max() + 1e-6
