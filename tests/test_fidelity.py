"""Reproduction fidelity (issue 13): LARS, L1 pruning, exclusions by module type, selection without
consistency, best vs final reporting, fc_norm. Expected values are written out by hand."""
import pytest
import torch
import torch.nn as nn


# ---------------------------------------------------------------------------------------------- LARS

def _lars_step(opt, params, grads):
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    opt.step()


def test_lars_trust_ratio_with_zero_weight_decay_and_momentum():
    from lars import Lars
    w = nn.Parameter(torch.tensor([[3., 4.]]))   # ||w|| = 5
    opt = Lars([w], lr=1.0, weight_decay=0.0, momentum=0.9, trust_coefficient=0.001)
    # step 1: ||g|| = 1, ratio 0.001 * 5 / 1 = 0.005 -> update (0.003, 0.004); mu = update
    _lars_step(opt, [w], [[[0.6, 0.8]]])
    torch.testing.assert_close(w.detach(), torch.tensor([[2.997, 3.996]]), rtol=0, atol=1e-7)
    # step 2: ||w|| = 4.995, ratio 0.004995 -> update (0.002997, 0.003996);
    # mu = 0.9 * (0.003, 0.004) + update = (0.005697, 0.007596)
    _lars_step(opt, [w], [[[0.6, 0.8]]])
    torch.testing.assert_close(w.detach(), torch.tensor([[2.991303, 3.988404]]), rtol=0, atol=1e-6)


def test_lars_weight_decay_enters_before_the_trust_ratio():
    from lars import Lars
    w = nn.Parameter(torch.tensor([[3., 4.]]))
    opt = Lars([w], lr=1.0, weight_decay=0.1, momentum=0.9)
    # g + 0.1 w = (0.3 + 0.3, 0.4 + 0.4) = (0.6, 0.8): norm 1, ratio 0.005
    _lars_step(opt, [w], [[[0.3, 0.4]]])
    torch.testing.assert_close(w.detach(), torch.tensor([[2.997, 3.996]]), rtol=0, atol=1e-7)


def test_lars_biases_skip_trust_ratio_and_weight_decay():
    from lars import Lars
    b = nn.Parameter(torch.tensor([2., -1.]))
    opt = Lars([b], lr=1.0, weight_decay=0.1, momentum=0.9)
    _lars_step(opt, [b], [[0.5, 0.5]])   # plain momentum SGD: b - 1.0 * g
    torch.testing.assert_close(b.detach(), torch.tensor([1.5, -1.5]))
    _lars_step(opt, [b], [[0.5, 0.5]])   # mu = 0.9 * 0.5 + 0.5 = 0.95
    torch.testing.assert_close(b.detach(), torch.tensor([0.55, -2.45]))


def test_lars_zero_weight_is_not_frozen_and_create_lars_takes_a_model():
    from lars import create_lars
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    lin.bias.requires_grad_(False)
    opt = create_lars(lin, lr=0.5, weight_decay=0.0, momentum=0.9)
    assert [p for g in opt.param_groups for p in g['params']] == [lin.weight]
    _lars_step(opt, [lin.weight], [[[1., -2.]]])   # ||w|| = 0: ratio 1, w = -0.5 g
    torch.testing.assert_close(lin.weight.detach(), torch.tensor([[-0.5, 1.0]]))
