"""LARS against two steps worked by hand (docs/method.md#resnet-recipe)."""

import math

import torch

from bfcl.optim import LARS

LR, WD = 0.2, 0.1


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_two_steps_worked_by_hand():
    weight = torch.nn.Parameter(t([[3.0, 4.0]]))  # 2-D: decay + trust ratio; ‖w0‖ = 5
    bias = torch.nn.Parameter(t([1.0, -2.0]))  # 1-D: neither
    opt = LARS([weight, bias], lr=LR, weight_decay=WD, momentum=0.9)  # trust coefficient 0.001

    # step 1. weight: g = [-0.3, 0] + 0.1·[3, 4] = [0, 0.4], ‖g‖ = 0.4,
    #   trust = 0.001·5/0.4 = 0.0125, μ1 = [0, 0.005], w1 = w0 - 0.2·μ1 = [3, 3.999]
    # bias: μ1 = g = [0.5, 0.25], b1 = [1, -2] - 0.2·μ1 = [0.9, -2.05]
    weight.grad, bias.grad = t([[-0.3, 0.0]]), t([0.5, 0.25])
    opt.step()
    torch.testing.assert_close(weight.detach(), t([[3.0, 3.999]]))
    torch.testing.assert_close(opt.state[weight]["mu"], t([[0.0, 0.005]]))
    torch.testing.assert_close(bias.detach(), t([0.9, -2.05]))

    # step 2. weight: g = [0.3, -0.3999] + 0.1·[3, 3.999] = [0.6, 0], ‖w1‖ = √24.992001,
    #   g·trust = [0.001·‖w1‖, 0], μ2 = 0.9·[0, 0.005] + that = [0.001·‖w1‖, 0.0045],
    #   w2 = w1 - 0.2·μ2 = [3 - 0.0002·‖w1‖, 3.9981]
    # bias: μ2 = 0.9·[0.5, 0.25] + [-1, 0] = [-0.55, 0.225], b2 = b1 - 0.2·μ2 = [1.01, -2.095]
    weight.grad, bias.grad = t([[0.3, -0.3999]]), t([-1.0, 0.0])
    opt.step()
    w1_norm = math.sqrt(24.992001)
    torch.testing.assert_close(opt.state[weight]["mu"], t([[0.001 * w1_norm, 0.0045]]))
    torch.testing.assert_close(weight.detach(), t([[3.0 - 0.0002 * w1_norm, 3.9981]]))
    torch.testing.assert_close(opt.state[bias]["mu"], t([-0.55, 0.225]))
    torch.testing.assert_close(bias.detach(), t([1.01, -2.095]))


def test_zero_weight_norm_uses_factor_one():
    weight = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.float64))
    opt = LARS([weight], lr=LR, weight_decay=WD)
    weight.grad = t([[1.0, -2.0], [0.5, 0.0]])
    opt.step()  # decay of a zero weight is zero; trust would be 0 -> factor 1 instead
    torch.testing.assert_close(weight.detach(), -LR * t([[1.0, -2.0], [0.5, 0.0]]))


def test_zero_update_norm_uses_factor_one():
    weight = torch.nn.Parameter(t([[1.0, 2.0]]))
    opt = LARS([weight], lr=LR, weight_decay=0.0)
    weight.grad = torch.zeros(1, 2, dtype=torch.float64)
    opt.step()  # 0/0 would be NaN
    assert torch.equal(weight.detach(), t([[1.0, 2.0]]))
    assert torch.equal(opt.state[weight]["mu"], torch.zeros(1, 2, dtype=torch.float64))


def test_parameters_without_gradient_are_left_alone():
    used, unused = torch.nn.Parameter(t([[1.0, 1.0]])), torch.nn.Parameter(t([[2.0, 2.0]]))
    opt = LARS([used, unused], lr=LR, weight_decay=WD)
    used.grad = t([[1.0, 0.0]])
    opt.step()
    assert torch.equal(unused.detach(), t([[2.0, 2.0]]))
    assert unused not in opt.state
