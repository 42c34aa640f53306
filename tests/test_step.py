"""One optimizer step: the loss is the mean over every micro-batch's rows, the norm is taken before clipping, and a
step whose loss or gradient norm is not finite leaves the parameters as they were."""
import math

import pytest
import torch

import train.step
from lora import apply_lora, lora_layers
from model import load_llama
from train.objective import loss_sum
from train.batch import right_padded
from train.optim import AdamW
from train.step import optimizer_step

LABEL_IDS = torch.tensor([3, 4])


@pytest.fixture
def model_and_batches(tiny_checkpoint):
    model = apply_lora(load_llama(tiny_checkpoint, dtype=torch.float32), 4, 8, verbose=False)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.normal_(std=0.05)
    generator = torch.Generator().manual_seed(2)
    batches = [right_padded(torch.randint(0, 300, (n, 6), generator=generator), torch.full((n,), 6),
                            torch.tensor([1, 0, 1][:n])) for n in (3, 2)]
    return model, batches


def trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def test_loss_is_the_mean_over_all_rows_and_norm_is_before_clipping(model_and_batches):
    model, batches = model_and_batches
    for rows in batches:
        (loss_sum(model, rows, LABEL_IDS) / 5).backward()
    expected_norm = torch.cat([p.grad.flatten() for p in trainable(model)]).norm().item()
    with torch.no_grad():
        expected_loss = sum(loss_sum(model, batch, LABEL_IDS).item() for batch in batches) / 5
    model.zero_grad(set_to_none=True)
    before = [p.detach().clone() for p in trainable(model)]

    loss, grad_norm = optimizer_step(model, AdamW(trainable(model), lr=1e-2), batches, LABEL_IDS,
                                     max_grad_norm=expected_norm / 10)
    assert loss == pytest.approx(expected_loss, rel=1e-6)
    assert grad_norm == pytest.approx(expected_norm, rel=1e-5)
    assert all(not torch.equal(p, b) for p, b in zip(trainable(model), before))
    assert all(p.grad is None for p in trainable(model))


@pytest.mark.parametrize("broken", ["loss", "gradient"])
def test_non_finite_step_leaves_parameters_untouched(model_and_batches, monkeypatch, broken):
    model, batches = model_and_batches
    if broken == "loss":
        real_loss_sum = train.step.loss_sum
        monkeypatch.setattr(train.step, "loss_sum", lambda *a, **k: real_loss_sum(*a, **k) * float("nan"))
    else:  # a finite loss whose gradient overflows in one parameter
        trainable(model)[0].register_hook(lambda grad: grad * float("inf"))
    optimizer = AdamW(trainable(model), lr=1e-2)
    before = [p.detach().clone() for p in trainable(model)]

    loss, grad_norm = optimizer_step(model, optimizer, batches, LABEL_IDS)
    assert math.isfinite(loss) == (broken == "gradient")
    assert not math.isfinite(grad_norm)
    assert all(torch.equal(p, b) for p, b in zip(trainable(model), before))
    assert all(p.grad is None for p in trainable(model))
    # skipped on the device: the moments stay zero (the step counts advance; the loop ends the run here)
    assert all(not state["exp_avg"].any() and not state["exp_avg_sq"].any() for state in optimizer.state.values())
