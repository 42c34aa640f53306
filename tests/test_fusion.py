"""The graph pass that joins the projections of one input into one GEMM (model.fusion) keeps every output and
gradient, and joins only what it may. On the CPU in float32, through dynamo with a backend that runs the pass and
then the graph eagerly (inductor's own kernels are exercised by the GPU tests of the fast path)."""
import pytest
import torch
import torch.nn.functional as F

import model.fusion
from lora import apply_lora, lora_layers
from model import load_llama
from model.fusion import FuseSharedInputLinears
from model.llama import rope_cos_sin


def linears(graph: torch.fx.Graph) -> int:
    return sum(node.op == "call_function" and node.target in model.fusion.LINEARS for node in graph.nodes)


def compiled_with_the_pass(fn):
    """fn compiled by dynamo into graphs that the pass rewrites; the linears each graph had before and after."""
    counts = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        before = linears(gm.graph)
        FuseSharedInputLinears()(gm.graph)
        gm.graph.lint()
        gm.recompile()
        counts.append((before, linears(gm.graph)))
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(fn, backend=backend, fullgraph=True), counts


def outputs_and_grads(fn, x, params):
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    (out * torch.linspace(-1, 1, out.numel()).view(out.shape)).sum().backward()
    grads = [x.grad] + [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return out.detach(), grads


@pytest.mark.parametrize("adapted", [True, False])
def test_a_blocks_projections_of_one_input_share_a_gemm_with_the_same_outputs_and_gradients(tiny_checkpoint, adapted):
    """With LoRA on all seven projections: q/k/v's A's become one product, gate/up's another, and so do the small
    frozen q/k/v and gate/up weights (21 linears → 15). Without LoRA only gate/up join (7 → 6): q/k/v's outputs are
    viewed as heads, and a view of a piece of the joint product is left alone."""
    llama = load_llama(tiny_checkpoint, dtype=torch.float32)
    if adapted:
        apply_lora(llama, 8, 16, verbose=False)
        with torch.no_grad():
            for layer in lora_layers(llama).values():
                layer.lora_B.weight.normal_(0, 0.1)
    block = llama.model.layers[0]
    params = [p for p in block.parameters() if p.requires_grad] or [block.input_layernorm.weight.requires_grad_()]
    cos, sin = rope_cos_sin(llama.inv_freq, 12, torch.float32)
    x = torch.randn(2, 12, llama.config.hidden_size)
    expected = outputs_and_grads(lambda h: block(h, cos, sin), x, params)
    fused, counts = compiled_with_the_pass(lambda h: block(h, cos, sin))
    out, grads = outputs_and_grads(fused, x, params)
    assert counts == ([(21, 15)] if adapted else [(7, 6)])
    torch.testing.assert_close(out, expected[0], rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_frozen_weights_beyond_the_limit_keep_their_own_gemms(tiny_checkpoint, monkeypatch):
    llama = apply_lora(load_llama(tiny_checkpoint, dtype=torch.float32), 8, 16, verbose=False)
    monkeypatch.setattr(model.fusion, "FROZEN_GROUP_BYTES", 0)
    block = llama.model.layers[0]
    cos, sin = rope_cos_sin(llama.inv_freq, 5, torch.float32)
    fused, counts = compiled_with_the_pass(lambda h: block(h, cos, sin))
    fused(torch.randn(1, 5, llama.config.hidden_size))
    assert counts == [(21, 18)]  # only the trainable A's: q/k/v and gate/up
    limited = FuseSharedInputLinears().uuid()
    monkeypatch.undo()
    assert FuseSharedInputLinears().uuid() != limited  # compiled graphs cached under one limit are not reused


def test_products_that_must_stay_apart_are_left_alone():
    """Products in other autocast, no-grad or inference-mode regions, on either side of a write into their input,
    whose outputs are viewed, written into or handed out of the graph, or with a bias, keep their own GEMMs and give
    what they gave."""
    w1, w2 = torch.randn(4, 6, requires_grad=True), torch.randn(3, 6, requires_grad=True)
    bias = torch.randn(3)

    def in_region(enter):
        def fn(x):  # both products feed a product (a reader), so only the region keeps them apart
            a = F.linear(x, w1) * 2
            with enter():
                b = F.linear(x, w2) * 2
            return a.sum() + b.float().sum()
        fn.__name__ = enter.__name__
        return fn

    def autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    def input_written_between(x):
        x = x + 0
        a = F.linear(x, w1) * 2
        x.mul_(2)
        return a.sum() + (F.linear(x, w2) * 2).sum()

    def input_set_between(x):
        x = x + 0
        a = F.linear(x, w1) * 2
        x[0] = 1
        return a.sum() + (F.linear(x, w2) * 2).sum()

    def output_written(x):
        a, b = F.linear(x, w1) * 2, F.linear(x, w2)
        b[0] = 0
        return a.sum() + b.sum()

    def output_viewed(x):  # a view that merges rows needs the columns laid out on their own
        return F.linear(x, w1).view(-1).cumsum(0).sum() + (F.linear(x, w2) * 2).sum()

    def outputs_returned(x):
        return F.linear(x, w1), F.linear(x, w2) * 2

    def biased(x):
        return (F.linear(x, w1) * 2).sum() + (F.linear(x, w2, bias) * 2).sum()

    def joined(x):
        return (F.linear(x, w1) * 3).sum() + F.silu(F.linear(x, w2)).sum() + (F.linear(x.flip(0), w2) * 2).sum()

    x = torch.randn(5, 6)
    for fn, count in ((in_region(torch.no_grad), (2, 2)), (in_region(torch.inference_mode), (2, 2)),
                      (in_region(autocast), (2, 2)), (input_written_between, (2, 2)),
                      (input_set_between, (2, 2)), (output_written, (2, 2)),
                      (output_viewed, (2, 2)), (outputs_returned, (2, 2)), (biased, (2, 2)), (joined, (3, 2))):
        fused, counts = compiled_with_the_pass(fn)
        torch.testing.assert_close(fused(x), fn(x))
        assert counts == [count], fn.__name__
