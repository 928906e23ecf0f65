"""The one optimization loop outside training: minimize reaches the minimum of a quadratic with
either schedule and leaves its caller's gradient mode alone."""

import pytest
import torch

from zoo.optimize import minimize, set_learning_rate


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_minimize_finds_the_minimum_of_a_quadratic(schedule):
    target = torch.tensor([1.5, -2.0, 0.25])
    theta = torch.zeros(3, requires_grad=True)
    calls = []
    with torch.no_grad():                       # gradients are recorded all the same
        minimize(lambda: (theta - target).square().sum(), [theta], steps=500, lr=0.05,
                 schedule=schedule, on_step=lambda: calls.append(1))
        assert not torch.is_grad_enabled()
    assert len(calls) == 500
    torch.testing.assert_close(theta.detach(), target, atol=1e-3, rtol=0)


def test_learning_rates_are_scaled_per_group_in_order():
    a, b = torch.zeros(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([{"params": [a], "step_scale": 0.1}, {"params": [b]}], lr=1.0)
    set_learning_rate(optimizer, 0.3, 0.5, 0.25)
    assert [group["lr"] for group in optimizer.param_groups] == [0.3 * 0.1 * 0.5 * 0.25,
                                                                  0.3 * 0.5 * 0.25]
