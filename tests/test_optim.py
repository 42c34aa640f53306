import io

import pytest
import torch

from train.optim import AdamW

SHAPES = [(3,), (4, 5), (2, 3, 4), (7, 1)]
HYPER = dict(lr=1e-2, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.1)


def make_params(dtype=torch.float32, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in SHAPES]


def set_grads(params, step, has_grad=lambda i, step: True):
    gen = torch.Generator().manual_seed(1000 + step)
    for i, p in enumerate(params):
        grad = torch.randn(p.shape, generator=gen).to(p.device, p.dtype)
        p.grad = grad if has_grad(i, step) else None


def save_and_reload(optimizer, params):
    buffer = io.BytesIO()
    torch.save(optimizer.state_dict(), buffer)
    buffer.seek(0)
    resumed = AdamW(params, **HYPER)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    return resumed


def max_abs_diff(xs, ys):
    return max((x.detach().float() - y.detach().float()).abs().max().item() for x, y in zip(xs, ys))


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_matches_torch_adamw_over_100_steps_with_save_and_load_midway(device):
    ours, theirs = make_params(device=device), make_params(device=device)
    initial = [p.detach().clone() for p in ours]
    optimizer = AdamW(ours, **HYPER)
    reference = torch.optim.AdamW(theirs, **HYPER)
    for step in range(100):
        if step == 50:
            ours = [torch.nn.Parameter(p.detach().clone()) for p in ours]
            optimizer = save_and_reload(optimizer, ours)
        set_grads(ours, step)
        set_grads(theirs, step)
        optimizer.step()
        reference.step()
    assert max_abs_diff(ours, theirs) <= (1e-6 if device == "cpu" else 1e-5)  # CUDA's fused kernel rounds otherwise
    assert max_abs_diff(ours, initial) > 0.1  # the comparison is not between two untouched tensors


def test_param_groups_with_their_own_lr_and_weight_decay_match_torch():
    ours, theirs = make_params(), make_params()
    groups = lambda ps: [{"params": ps[:2]}, {"params": ps[2:], "lr": 3e-3, "weight_decay": 0.0}]
    optimizer = AdamW(groups(ours), **HYPER)
    reference = torch.optim.AdamW(groups(theirs), **HYPER)
    for step in range(20):
        set_grads(ours, step)
        set_grads(theirs, step)
        optimizer.step()
        reference.step()
    assert max_abs_diff(ours, theirs) <= 1e-6


def test_params_whose_grad_is_none_are_skipped():
    # Parameter 1 gets a gradient on even steps only (so its step count lags); parameter 3 never gets one.
    has_grad = lambda i, step: i != 3 and (i != 1 or step % 2 == 0)
    ours, theirs = make_params(), make_params()
    never_updated = ours[3].detach().clone()
    optimizer = AdamW(ours, **HYPER)
    reference = torch.optim.AdamW(theirs, **HYPER)
    for step in range(30):
        set_grads(ours, step, has_grad)
        set_grads(theirs, step, has_grad)
        optimizer.step()
        reference.step()
    assert max_abs_diff(ours, theirs) <= 1e-6
    assert torch.equal(ours[3].detach(), never_updated)
    assert ours[3] not in optimizer.state
    assert optimizer.state[ours[1]]["step"] == 15


def step_beside_float32_reference(ours, steps):
    """(our optimizer, torch's, its float32 parameters) after `steps` steps on the same gradients; after each step
    the reference parameters are rounded to what ours can hold, so only the update's own rounding differs."""
    theirs = [torch.nn.Parameter(p.detach().float()) for p in ours]  # same values, float32
    optimizer = AdamW(ours, **HYPER)
    reference = torch.optim.AdamW(theirs, **HYPER)
    for step in range(steps):
        set_grads(ours, step)
        for p, q in zip(theirs, ours):
            p.grad = q.grad.float()
        optimizer.step()
        reference.step()
        with torch.no_grad():
            for p, q in zip(theirs, ours):
                p.copy_(p.to(q.dtype).float())
    return optimizer, reference, theirs


def test_bf16_params_keep_float32_moments_and_math():
    ours = make_params(torch.bfloat16)
    optimizer, reference, theirs = step_beside_float32_reference(ours, 20)
    for p, q in zip(ours, theirs):
        assert p.dtype == torch.bfloat16
        state, ref_state = optimizer.state[p], reference.state[q]
        assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
        assert (state["exp_avg"] - ref_state["exp_avg"]).abs().max() <= 1e-6
        assert (state["exp_avg_sq"] - ref_state["exp_avg_sq"]).abs().max() <= 1e-6
    # Float32 math then one rounding: at most one bf16 step (2**-7 relative) from the float32 reference.
    for p, q in zip(ours, theirs):
        assert ((p.float() - q).abs() <= q.abs() * 2**-7 + 1e-6).all()


def test_load_state_dict_keeps_float32_moments_for_bf16_params():
    params = make_params(torch.bfloat16)
    optimizer = AdamW(params, **HYPER)
    for step in range(3):
        set_grads(params, step)
        optimizer.step()
    saved = {p: {k: v.clone() for k, v in optimizer.state[p].items() if k != "step"} for p in params}
    resumed = save_and_reload(optimizer, params)
    for p in params:
        assert resumed.state[p]["step"] == 3
        for key, value in saved[p].items():
            assert resumed.state[p][key].dtype == torch.float32
            assert torch.equal(resumed.state[p][key], value)


def test_float32_and_bf16_params_in_one_group_each_match_their_reference():
    # The float32 parameters take the fused kernel, the bf16 ones the foreach passes: one step must give both.
    ours = make_params()[:2] + make_params(torch.bfloat16)[2:]
    _, _, theirs = step_beside_float32_reference(ours, 3)
    assert max_abs_diff(ours[:2], theirs[:2]) <= 1e-6
    assert max_abs_diff(ours[2:], theirs[2:]) <= 2**-7 * max(p.abs().max().item() for p in theirs[2:]) + 1e-6


@pytest.mark.parametrize("bad", [dict(lr=-1.0), dict(betas=(0.9, 1.0)), dict(eps=-1e-8), dict(weight_decay=-0.1)])
def test_rejects_out_of_range_hyperparameters(bad):
    with pytest.raises(ValueError):
        AdamW(make_params(), **bad)
