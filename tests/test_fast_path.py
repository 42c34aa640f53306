"""The speed levers (recomputation, compiled blocks, CUDA graphs, the final block on the last positions only) keep
the loss and the LoRA gradients of the plain path.

On the CPU everything runs in float32 and the fast path must match the plain one to rounding. On the GPU both
run in bf16, where any reordering of float operations shows; there the fast path's distance from the float32
truth must stay within that of the plain bf16 path."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lora import apply_lora, lora_layers
from model import load_llama
from train.fastpath import (KEPT_ACTIVATION_BUDGET, RECOMPUTED_ACTIVATION_BUDGET, activation_budget,
                            blocks_compile_whole, compile_for_training)
from train.graphs import BackwardGraphs
from train.loop import default_packing
from train.objective import loss_sum
from train.batch import right_padded
from train.optim import AdamW
from train.predict import autocast
from train.step import graphed_backward, optimizer_step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def every_position_loss(model, rows, label_ids):
    """The two-class loss read off the full [B, T, D] hidden states, as before the final block was trimmed."""
    hidden = model.hidden_states(rows.tokens)[torch.arange(len(rows.tokens), device=rows.tokens.device), rows.last]
    logits = hidden @ model.lm_head.weight[label_ids].to(hidden.dtype).T
    return F.cross_entropy(logits.float(), rows.labels, reduction="sum")


def lora_model(checkpoint, device, dtype, fast_path=None, quantize=None, dropout=0.0):
    model = apply_lora(load_llama(checkpoint, dtype=dtype, device=device, quantize=quantize), 8, 16, dropout=dropout,
                       verbose=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            for p in (layer.lora_A.weight, layer.lora_B.weight):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
    if fast_path == "compile":
        model.compile_blocks()
    elif fast_path is not None:
        model.grad_checkpoint = fast_path
    return model


def batch(device, seed=2, seq_len=14):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([seq_len, 9, 3], device=device)
    tokens = torch.randint(0, 300, (3, seq_len), generator=generator).to(device)
    tokens = tokens * (torch.arange(seq_len, device=device) < lengths[:, None])
    return right_padded(tokens, lengths, torch.tensor([1, 0, 1], device=device))


def backward(model, micro_batches, dtype, every_position=False):
    """The summed loss of the micro-batches and the LoRA gradients it accumulates (then cleared)."""
    label_ids, total = torch.tensor([3, 4], device=micro_batches[0].tokens.device), 0
    for rows in micro_batches:
        with autocast(rows.tokens.device) if dtype != torch.float32 else torch.autocast("cpu", enabled=False):
            loss = (every_position_loss if every_position else loss_sum)(model, rows, label_ids)
        loss.backward()
        total += loss.detach().float().cpu()
    grads = torch.cat([p.grad.float().flatten().cpu() for p in model.parameters() if p.requires_grad])
    model.zero_grad(set_to_none=True)
    return total, grads


def loss_and_grads(checkpoint, device, dtype, fast_path=None, every_position=False):
    model = lora_model(checkpoint, device, dtype, fast_path)
    return backward(model, [batch(device)], dtype, every_position)


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


def test_every_block_recomputed_is_left_to_the_partitioner_where_blocks_compile_whole(tiny_checkpoint, monkeypatch):
    """Recomputing every block (True, or N >= the block count) where a block compiles to one graph, the compiled
    blocks get the small budget and none runs under checkpoint(); elsewhere each runs under checkpoint(), budget 1.
    Recomputing some, those run under checkpoint() and the rest keep fewer activations."""
    model = lora_model(tiny_checkpoint, "cpu", torch.float32)
    n_blocks = len(model.model.layers)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: None)  # inductor on the CPU takes a minute
    wrapped = []
    monkeypatch.setattr("model.llama.checkpoint", lambda block, *args, **kwargs: wrapped.append(block) or block(*args))
    for grad_checkpoint, in_graph, budget, n_wrapped in (
            (False, True, KEPT_ACTIVATION_BUDGET, 0), (1, True, KEPT_ACTIVATION_BUDGET, 1),
            (n_blocks - 1, True, KEPT_ACTIVATION_BUDGET, n_blocks - 1),
            (n_blocks, True, RECOMPUTED_ACTIVATION_BUDGET, 0), (n_blocks + 5, True, RECOMPUTED_ACTIVATION_BUDGET, 0),
            (True, True, RECOMPUTED_ACTIVATION_BUDGET, 0), (True, False, 1.0, n_blocks),
            (1, False, KEPT_ACTIVATION_BUDGET, 1)):
        model.grad_checkpoint = grad_checkpoint
        assert activation_budget(model, in_graph) == budget
        try:
            compile_for_training(model, in_graph)
            assert torch._functorch.config.activation_memory_budget == budget
            wrapped.clear()
            backward(model, [batch("cpu")], torch.float32)
            assert len(wrapped) == n_wrapped
        finally:
            torch._functorch.config.activation_memory_budget = 1.0
    model.grad_checkpoint = True
    compile_for_training(model, True)
    model.uncompile_blocks()  # back to eager: checkpoint() recomputes again
    wrapped.clear()
    backward(model, [batch("cpu")], torch.float32)
    assert len(wrapped) == n_blocks


@pytest.mark.parametrize("major, flash", [(7, False), (8, True), (9, True)])  # a T4 is 7.5, an A100 8.0, an H100 9.0
def test_packing_and_recomputation_in_graph_need_flash_attentions_variable_length_kernel(monkeypatch, major, flash):
    monkeypatch.setattr("model.llama.varlen_attn", lambda *args, **kwargs: None)  # whatever this build has
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert default_packing(cuda) == ("on" if flash else "off")
    assert blocks_compile_whole(cuda, torch.bfloat16) == flash and blocks_compile_whole(cuda, torch.float16) == flash
    assert not blocks_compile_whole(cuda, torch.float32)  # packed attention loops over the rows on the host
    assert default_packing(cpu) == "off" and not blocks_compile_whole(cpu, torch.bfloat16)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compilation is a GPU lever")
def test_activation_budgets_save_fewer_bytes_for_the_same_loss_and_gradients(tiny_checkpoint):
    """Compiled blocks that keep their activations keep fewer under KEPT_ACTIVATION_BUDGET, and blocks all to be
    recomputed fewer still under RECOMPUTED_ACTIVATION_BUDGET (no checkpoint()), recomputing the rest in the backward
    pass: the same loss and gradients to bf16's rounding."""
    truth_loss, truth_grads = loss_and_grads(tiny_checkpoint, "cuda", torch.float32)
    plain_loss, plain_grads = loss_and_grads(tiny_checkpoint, "cuda", torch.bfloat16)
    scale, saved = truth_grads.abs().max(), {}
    try:
        for budget, grad_checkpoint in ((1.0, False), (KEPT_ACTIVATION_BUDGET, False),
                                        (RECOMPUTED_ACTIVATION_BUDGET, True)):
            torch._dynamo.reset()
            model = lora_model(tiny_checkpoint, "cuda", torch.bfloat16)
            model.grad_checkpoint = grad_checkpoint
            compile_for_training(model, True, budget)
            sizes = []

            def pack(t: torch.Tensor) -> torch.Tensor:
                sizes.append(t.numel() * t.element_size())
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss, grads = backward(model, [batch("cuda")], torch.bfloat16)
            saved[budget] = sum(sizes)
            assert (grads - truth_grads).abs().max() <= 1.5 * (plain_grads - truth_grads).abs().max() + 1e-6 * scale
            assert (loss - truth_loss).abs() <= 1.5 * (plain_loss - truth_loss).abs() + 1e-6 * truth_loss.abs()
    finally:
        torch._dynamo.reset()
        torch._functorch.config.activation_memory_budget = 1.0
    assert saved[RECOMPUTED_ACTIVATION_BUDGET] < saved[KEPT_ACTIVATION_BUDGET] < saved[1.0]


def steps_through(model, graphed, steps=4, seq_len=16):
    """Losses and accumulated gradients of `steps` optimizer steps of two micro-batches each, at lr 0 (so every
    step sees the same weights), with or without the CUDA graphs. With graphs, the first step warms up and
    records them and later steps replay them: each replay adds into gradients whose memory the graph reuses."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, grads = AdamW(params, lr=0.0, weight_decay=0.0), []
    optimizer.step = lambda **_: grads.append(torch.cat([p.grad.float().flatten().cpu() for p in params]))
    label_ids = torch.tensor([3, 4], device="cuda")
    graphs = graphed_backward(model, params, label_ids) if graphed else None
    losses = [optimizer_step(model, optimizer, [batch("cuda", seed=10 * step + i, seq_len=seq_len) for i in range(2)],
                             label_ids, max_grad_norm=1e9, graphs=graphs)[0] for step in range(steps)]
    assert len(grads) == steps
    return torch.tensor(losses), grads


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_keep_loss_and_accumulated_gradients_over_replays(tiny_checkpoint):
    # As `run.py train --cuda-graphs` runs: compiled blocks, bf16, replayed; against float32 and plain bf16.
    (truth_losses, truth_grads), (plain_losses, plain_grads), (graph_losses, graph_grads) = [
        steps_through(lora_model(tiny_checkpoint, "cuda", dtype, fast_path), graphed)
        for dtype, fast_path, graphed in ((torch.float32, None, False), (torch.bfloat16, None, False),
                                          (torch.bfloat16, "compile", True))]
    for truth, plain, graphs in zip(truth_grads, plain_grads, graph_grads):
        assert (graphs - truth).abs().max() <= 1.5 * (plain - truth).abs().max() + 1e-6 * truth.abs().max()
    # A compiled forward rounds to bf16 in other places than the eager one: each loss within 1.5x the eager bf16
    # error or a quarter of bf16's epsilon of the loss (eager happened to be 3e-6 off at a step where compiled was 5e-4)
    bf16_floor = torch.finfo(torch.bfloat16).eps / 4 * truth_losses.abs()
    assert ((graph_losses - truth_losses).abs() <= torch.maximum(1.5 * (plain_losses - truth_losses).abs(),
                                                                 bf16_floor)).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("base", ["nf4", "recomputed"])
def test_cuda_graphs_replay_the_eager_step_with_4bit_or_recomputed_blocks(tiny_checkpoint, base):
    # Not compiled: a replay runs the very kernels the eager step runs, so the two agree to the last bits that
    # reordered atomics in attention's backward may change.
    def model():
        m = lora_model(tiny_checkpoint, "cuda", torch.bfloat16, quantize="nf4" if base == "nf4" else None)
        m.grad_checkpoint = base == "recomputed"
        return m
    (eager_losses, eager_grads), (graph_losses, graph_grads) = steps_through(model(), False), steps_through(model(), True)
    for eager, graphs in zip(eager_grads, graph_grads):
        assert (graphs - eager).abs().max() <= 1e-3 * eager.abs().max()
    torch.testing.assert_close(graph_losses, eager_losses, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_draw_new_dropout_masks_at_every_replay(tiny_checkpoint):
    model = lora_model(tiny_checkpoint, "cuda", torch.bfloat16, dropout=0.5)
    params = [p for p in model.parameters() if p.requires_grad]
    graphs = graphed_backward(model, params, torch.tensor([3, 4], device="cuda"))
    rows = batch("cuda", seq_len=16)
    losses = [graphs(rows, 1.0).item() for _ in range(4)]
    assert len(set(losses)) == 4


def test_cuda_graphs_refuse_gradients_replaced_behind_their_back():
    params = [torch.zeros(3, requires_grad=True)]
    graphs = BackwardGraphs(lambda *inputs: torch.zeros(()), params)
    params[0].grad = None
    with pytest.raises(RuntimeError, match="replaced"):
        graphs(right_padded(torch.zeros(1, 1), torch.ones(1)), 1.0)
