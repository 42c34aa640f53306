"""--precision and fp16 loss scaling: which precision each flag means on each device, the loss scaler's policy
(skip and halve on overflow, double after the growth interval, JSON state), and that fp16 training with loss
scaling gets the float32 gradients within fp16's tolerance where plain fp16 loses them to underflow."""
import contextlib
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import train.precision
from common.errors import UserError
from lora import apply_lora, lora_layers
from model import load_llama
from train.optim import AdamW
from train.precision import LossScaler, Precision, gradient_norm, resolve_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
LABEL_IDS = torch.tensor([3, 4])


# --- resolve_precision -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", [None, "fp32"])
def test_the_cpu_trains_in_fp32(flag):
    precision = resolve_precision(flag, CPU)
    assert precision == Precision("fp32", torch.float32, "cpu")
    assert isinstance(precision.autocast(), contextlib.nullcontext)
    assert not precision.loss_scaling and not precision.scaler().enabled


@pytest.mark.parametrize("flag", ["bf16", "fp16"])
def test_half_precision_on_the_cpu_is_one_line_naming_the_flag(flag):
    with pytest.raises(UserError, match=rf"^--precision {flag}: not available on the CPU") as err:
        resolve_precision(flag, CPU)
    assert "\n" not in str(err.value)


def test_an_unknown_precision_is_refused():
    with pytest.raises(UserError, match=r"^--precision fp8: unknown precision \(choose from bf16, fp16, fp32\)$"):
        resolve_precision("fp8", CPU)


@pytest.mark.parametrize("has_bf16, flag, name", [
    (True, None, "bf16"), (False, None, "fp16"),  # auto: bf16 where the GPU has it, else fp16
    (True, "bf16", "bf16"), (True, "fp16", "fp16"), (False, "fp16", "fp16"), (True, "fp32", "fp32"),
    (False, "fp32", "fp32"),
])
def test_gpu_precisions(monkeypatch, has_bf16, flag, name):
    monkeypatch.setattr(train.precision, "cuda_has_bf16", lambda device: has_bf16)
    precision = resolve_precision(flag, CUDA)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    assert precision == Precision(name, dtype, "cuda")
    assert precision.loss_scaling == (name == "fp16") == precision.scaler().enabled
    with warnings.catch_warnings():  # building a CUDA autocast without CUDA warns (and disables it)
        warnings.simplefilter("ignore")
        context = precision.autocast()
    if name == "fp32":
        assert isinstance(context, contextlib.nullcontext)
    else:
        assert isinstance(context, torch.autocast) and (context.device, context.fast_dtype) == ("cuda", dtype)


def test_bf16_on_a_gpu_without_it_is_one_line_naming_the_flag(monkeypatch):
    monkeypatch.setattr(train.precision, "cuda_has_bf16", lambda device: False)
    with pytest.raises(UserError, match=r"^--precision bf16: .* has no native bf16 \(use --precision fp16") as err:
        resolve_precision("bf16", CUDA)
    assert "\n" not in str(err.value)


# --- LossScaler arithmetic ---------------------------------------------------------------------------------------

def test_a_disabled_scaler_costs_nothing():
    scaler = LossScaler.disabled()
    assert scaler.scale == 1.0 and scaler.scaled(0.25) == 0.25
    weight = torch.nn.Parameter(torch.ones(3))
    weight.grad = grad = torch.tensor([3.0, 4.0, 0.0])
    assert scaler.unscale_and_check([weight]) == (5.0, True)
    assert weight.grad is grad and torch.equal(grad, torch.tensor([3.0, 4.0, 0.0]))
    for finite in [False] * 50 + [True] * 5000:
        scaler.update(finite)
    assert (scaler.scale, scaler.good_steps, scaler.skipped, scaler.exhausted) == (1.0, 0, 0, False)


def test_the_scale_doubles_after_growth_interval_finite_steps_in_a_row():
    scaler = LossScaler()
    assert (scaler.scale, scaler.growth_interval) == (2.0 ** 16, 2000)
    for _ in range(1999):
        scaler.update(True)
    assert (scaler.scale, scaler.good_steps) == (2.0 ** 16, 1999)
    scaler.update(True)
    assert (scaler.scale, scaler.good_steps) == (2.0 ** 17, 0)
    for _ in range(1999):
        scaler.update(True)
    scaler.update(False)  # an overflow restarts the count
    assert (scaler.scale, scaler.good_steps, scaler.skipped) == (2.0 ** 16, 0, 1)
    for _ in range(1999):
        scaler.update(True)
    assert scaler.scale == 2.0 ** 16


def test_a_scale_that_keeps_overflowing_is_exhausted():
    scaler = LossScaler()
    steps = 0
    while not scaler.exhausted:
        scaler.update(False)
        steps += 1
    assert steps == 30 and scaler.scale == 2.0 ** -14 and scaler.skipped == 30  # 2^-13 ≈ 1.2e-4 is not yet < 1e-4


def test_state_dict_round_trips_through_json():
    scaler = LossScaler()
    for finite in [False, False] + [True] * 7:
        scaler.update(finite)
    state = json.loads(json.dumps(scaler.state_dict()))
    assert state == {"enabled": True, "scale": 2.0 ** 14, "good_steps": 7, "skipped": 2}
    restored = LossScaler()
    restored.load_state_dict(state)
    assert restored.state_dict() == scaler.state_dict()
    for finite in [True] * 1993 + [False, True]:  # both go on alike: growth after 2000, then a skip
        scaler.update(finite)
        restored.update(finite)
    assert restored.state_dict() == scaler.state_dict() == {"enabled": True, "scale": 2.0 ** 14, "good_steps": 1,
                                                            "skipped": 3}


@pytest.mark.parametrize("state", [
    {"scale": 1024.0, "good_steps": 3},
    {"scale": "lots", "good_steps": 3, "skipped": 0},
    {"scale": float("nan"), "good_steps": 3, "skipped": 0},
    {"scale": 0.0, "good_steps": 3, "skipped": 0},
    {"scale": 1024.0, "good_steps": -1, "skipped": 0},
    {"scale": 1024.0, "good_steps": 1.5, "skipped": 0},
    {"enabled": False, "scale": 1.0, "good_steps": 0, "skipped": 0},  # saved by a bf16 run
    [1024.0, 3, 0],
])
def test_a_malformed_state_is_a_user_error(state):
    with pytest.raises(UserError, match=r"^loss scaler state "):
        LossScaler().load_state_dict(state)


# --- LossScaler in an optimizer step on a LoRA model -------------------------------------------------------------

def lora_model(checkpoint, dtype: torch.dtype, device=CPU, quantize=None) -> torch.nn.Module:
    """The tiny Llama (frozen base in `dtype`) with float32 LoRA r 4 on every projection; the same adapter values
    whatever `dtype` is, and B nonzero so that every adapter weight gets a gradient."""
    torch.manual_seed(0)
    model = apply_lora(load_llama(checkpoint, dtype=dtype, device=device, quantize=quantize), 4, 8, verbose=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.05)
    return model.train()


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def batch():
    generator = torch.Generator().manual_seed(2)
    return torch.randint(0, 300, (4, 12), generator=generator), torch.tensor([1, 0, 1, 0])


def loss_sum(model, tokens, labels):
    """The classifier's summed loss on the rows' last token, its small product in float32 as train.objective's."""
    hidden = model.hidden_states(tokens)[:, -1]
    with torch.autocast(hidden.device.type, enabled=False):
        logits = hidden.float() @ model.lm_head.weight[LABEL_IDS.to(hidden.device)].float().T
    return F.cross_entropy(logits, labels.to(hidden.device), reduction="sum")


def scaled_gradients(model, precision: Precision, scaler: LossScaler, factor: float = 1.0):
    """One micro-batch's backward as optimizer_step should run it: the loss times factor × scale, then unscaled.
    Returns (gradient norm, finite); the unscaled gradients are left in .grad."""
    tokens, labels = batch()
    params = trainable(model)
    for p in params:
        p.grad = None
    with precision.autocast():
        loss = loss_sum(model, tokens.to(params[0].device), labels)
    (loss * scaler.scaled(factor)).backward()
    return scaler.unscale_and_check(params)


def flat_gradients(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in trainable(model)])


def relative_error(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).norm() / reference.norm()).item()


FP32_CPU = Precision("fp32", torch.float32, "cpu")
FP16_CPU = Precision("fp16", torch.float16, "cpu")  # never resolved on a CPU: the tests' fp16, under CPU autocast


def test_an_overflowing_gradient_skips_the_step_and_halves_the_scale(tiny_checkpoint):
    model = lora_model(tiny_checkpoint, torch.float32)
    optimizer, scaler = AdamW(trainable(model), lr=1e-2), LossScaler()
    before = [p.detach().clone() for p in trainable(model)]

    def step() -> tuple[float, bool]:  # the caller's logic: step only on finite gradients, then update the scaler
        grad_norm, finite = scaled_gradients(model, FP32_CPU, scaler, 1 / 4)
        if finite:
            optimizer.step()
        scaler.update(finite)
        optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

    hook = trainable(model)[3].register_hook(lambda grad: grad * float("inf"))  # one gradient overflows
    grad_norm, finite = step()
    assert not finite and grad_norm == float("inf")
    assert (scaler.scale, scaler.good_steps, scaler.skipped) == (2.0 ** 15, 0, 1)
    assert all(torch.equal(p, b) for p, b in zip(trainable(model), before)) and not optimizer.state

    hook.remove()
    grad_norm, finite = step()
    assert finite and grad_norm > 0
    assert (scaler.scale, scaler.good_steps, scaler.skipped) == (2.0 ** 15, 1, 1)
    assert all(not torch.equal(p, b) for p, b in zip(trainable(model), before))


def test_unscaled_float32_gradients_equal_the_unscaled_backward_exactly(tiny_checkpoint):
    """Scaling by a power of two commutes with every rounding in float32 (nothing under- or overflows here)."""
    model = lora_model(tiny_checkpoint, torch.float32)
    grad_norm, _ = scaled_gradients(model, FP32_CPU, LossScaler.disabled())
    reference = flat_gradients(model)
    assert grad_norm == pytest.approx(reference.norm().item(), rel=1e-6)
    assert gradient_norm(trainable(model)).item() == pytest.approx(grad_norm, rel=1e-6)
    scaler = LossScaler(init_scale=2.0 ** 20)
    assert scaled_gradients(model, FP32_CPU, scaler) == (grad_norm, True)
    assert torch.equal(flat_gradients(model), reference)


def test_fp16_with_loss_scaling_matches_fp32_where_plain_fp16_underflows(tiny_checkpoint):
    """fp16 emulated on the CPU: base weights float16 and CPU autocast to float16 (matmuls, attention and their
    backward in float16; LoRA weights and their gradients float32), against the float32 model's gradients."""
    model32, model16 = lora_model(tiny_checkpoint, torch.float32), lora_model(tiny_checkpoint, torch.float16)
    base = next(iter(lora_layers(model16).values())).base_layer
    assert base.weight.dtype == torch.float16 and all(p.dtype == torch.float32 for p in trainable(model16))

    # A realistic loss: plain fp16 is fine, but 2^16 × the loss overflows fp16 in the backward pass, so the scaler
    # skips and backs off until the gradients fit, and then matches float32.
    scaled_gradients(model32, FP32_CPU, LossScaler.disabled())
    reference = flat_gradients(model32)
    scaled_gradients(model16, FP16_CPU, LossScaler.disabled())
    assert relative_error(flat_gradients(model16), reference) < 1e-2
    scaler = LossScaler()
    while not scaled_gradients(model16, FP16_CPU, scaler)[1]:
        scaler.update(False)
        assert not scaler.exhausted
    assert scaler.skipped >= 1
    assert relative_error(flat_gradients(model16), reference) < 1e-2

    # A loss a million times smaller (as a tiny per-row weight or a late, well-fit model gives): its gradients
    # underflow fp16's range (smallest subnormal ~6e-8) and plain fp16 loses nearly all of them; scaled, they live.
    tiny = 1e-6
    scaled_gradients(model32, FP32_CPU, LossScaler.disabled(), tiny)
    reference = flat_gradients(model32)
    assert (reference != 0).all()
    scaled_gradients(model16, FP16_CPU, LossScaler.disabled(), tiny)
    plain = flat_gradients(model16)
    assert (plain == 0).float().mean() > 0.5 and relative_error(plain, reference) > 0.5
    grad_norm, finite = scaled_gradients(model16, FP16_CPU, LossScaler(), tiny)
    assert finite and grad_norm == pytest.approx(reference.norm().item(), rel=1e-2)
    scaled = flat_gradients(model16)
    assert (scaled == 0).float().mean() < 0.01 and relative_error(scaled, reference) < 1e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_fp16_with_loss_scaling_matches_fp32_on_cuda(tiny_checkpoint, quantize):
    """The real thing: resolve_precision's fp16 (CUDA autocast, float16 base, or NF4 computing in float16) against
    float32 (an NF4 base computing in float32) on the GPU."""
    if quantize:
        pytest.importorskip("bitsandbytes")
    fp16, fp32 = resolve_precision("fp16", CUDA), resolve_precision("fp32", CUDA)
    model32 = lora_model(tiny_checkpoint, torch.float32, CUDA, quantize)
    model16 = lora_model(tiny_checkpoint, torch.float16, CUDA, quantize)
    # The two NF4 bases are not the same weights (one quantized from float32, the other from float16-rounded values,
    # a few codes apart): 9.8e-3 on an H100 whether or not the loss is scaled, 1.3e-3 for float bases.
    tolerance = 1e-2 if quantize is None else 3e-2
    for factor in (1.0, 1e-6):
        scaled_gradients(model32, fp32, fp32.scaler(), factor)
        reference = flat_gradients(model32)
        scaled_gradients(model16, fp16, LossScaler.disabled(), factor)
        plain = flat_gradients(model16)
        scaler = fp16.scaler()
        while not scaled_gradients(model16, fp16, scaler, factor)[1]:
            scaler.update(False)
            assert not scaler.exhausted
        assert relative_error(flat_gradients(model16), reference) < tolerance
        if factor < 1:
            assert relative_error(plain, reference) > 0.5


def test_a_gpu_quantizes_a_base_to_4_bits_by_default_only_where_it_is_large():
    from model.config import LlamaConfig
    from train.setup import default_quantization

    smollm2_135m = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, vocab_size=49152)  # projections: 0.2 GB in bf16
    llama_32_1b = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=64)  # 1.9 GB
    llama_31_8b = LlamaConfig()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert [default_quantization(c, cuda) for c in (smollm2_135m, llama_32_1b, llama_31_8b)] == ["none", "nf4", "nf4"]
    assert {default_quantization(c, cpu) for c in (smollm2_135m, llama_32_1b, llama_31_8b)} == {"none"}
