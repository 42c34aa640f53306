import pytest
import torch

from train.schedule import lr_at, total_steps

BASE = 2e-4


def test_warmup_starts_at_zero_and_rises_linearly():
    assert lr_at(0, BASE, warmup_steps=10, total_steps=100) == 0.0
    assert lr_at(5, BASE, warmup_steps=10, total_steps=100) == pytest.approx(BASE / 2)
    assert lr_at(9, BASE, warmup_steps=10, total_steps=100) == pytest.approx(BASE * 0.9)


def test_peak_at_end_of_warmup():
    assert lr_at(10, BASE, warmup_steps=10, total_steps=100) == pytest.approx(BASE)


def test_decays_linearly_to_zero():
    assert lr_at(55, BASE, warmup_steps=10, total_steps=100) == pytest.approx(BASE / 2)
    assert lr_at(99, BASE, warmup_steps=10, total_steps=100) == pytest.approx(BASE / 90)
    assert lr_at(100, BASE, warmup_steps=10, total_steps=100) == 0.0
    assert lr_at(150, BASE, warmup_steps=10, total_steps=100) == 0.0


def test_no_warmup_starts_at_full_rate():
    assert lr_at(0, BASE, warmup_steps=0, total_steps=40) == pytest.approx(BASE)
    assert lr_at(20, BASE, warmup_steps=0, total_steps=40) == pytest.approx(BASE / 2)
    assert lr_at(39, BASE, warmup_steps=0, total_steps=40) == pytest.approx(BASE / 40)


def test_matches_hf_linear_schedule_with_warmup():
    transformers = pytest.importorskip("transformers")
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
    scheduler = transformers.get_linear_schedule_with_warmup(optimizer, num_warmup_steps=7, num_training_steps=50)
    for step in range(50):  # the loop's order: optimizer step `step` with the current lr, then scheduler.step()
        assert lr_at(step, BASE, 7, 50) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12), step
        optimizer.step()
        scheduler.step()


@pytest.mark.parametrize("step, warmup, total", [(-1, 0, 10), (0, 11, 10), (0, -1, 10)])
def test_rejects_impossible_arguments(step, warmup, total):
    with pytest.raises(ValueError):
        lr_at(step, BASE, warmup, total)


def test_total_steps_counts_short_last_batch_and_short_last_accumulation():
    assert total_steps(n_rows=100, batch_size=10, grad_accum=1, epochs=1) == 10
    assert total_steps(n_rows=101, batch_size=10, grad_accum=1, epochs=1) == 11
    assert total_steps(n_rows=101, batch_size=10, grad_accum=4, epochs=3) == 9
    with pytest.raises(ValueError):
        total_steps(n_rows=0, batch_size=10, grad_accum=1, epochs=1)
