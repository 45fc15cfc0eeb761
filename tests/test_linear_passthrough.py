"""linear and passthrough against mergekit 0.1.5's golden values (mergekit-methods.md §4)."""

import pytest
import torch

import methods

A = torch.tensor([1.0, 2, 3, 4])
B = torch.tensor([2.0, -1, 0.5, 3])
C = torch.tensor([-1.0, 1, 2, -2])


def linear(models, weights, normalize=True):
    return methods.linear(models, weight=weights, normalize=normalize)


@pytest.mark.parametrize("weights, normalize, expected", [
    ([0.5, 0.3, 0.2], True, [0.90000004, 0.89999998, 2.05, 2.5]),
    ([1.0, 2.0, 3.0], True, [0.33333334, 0.5, 1.6666666, 0.66666669]),
    ([1.0, 2.0, 3.0], False, [2.0, 3.0, 10.0, 4.0]),
])
def test_linear_golden_values(weights, normalize, expected):
    out = linear([A, B, C], weights, normalize)
    assert torch.allclose(out, torch.tensor(expected), atol=1e-6, rtol=0)


def test_linear_on_bfloat16_inputs_accumulates_in_float32_and_rounds_once():
    xs = [torch.tensor(v, dtype=torch.bfloat16) for v in (
        [-0.85546875, 1.1015625, -1.0703125, 0.12255859375],
        [-0.56640625, 0.373046875, -0.890625, -1.5078125],
        [0.37109375, 1.453125, 0.94140625, 0.7734375])]
    out = linear([x.float() for x in xs], [0.5, 0.3, 0.2]).to(torch.bfloat16)
    expected = torch.tensor([-0.5234375, 0.953125, -0.61328125, -0.236328125], dtype=torch.bfloat16)
    assert torch.equal(out, expected)


def test_linear_of_identical_inputs_is_that_input():
    x = torch.randn(64, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(linear([x, x, x], [0.2, 0.3, 0.5]), x, atol=1e-7)


def test_linear_negative_weights_without_normalize_subtract():
    out = linear([A, B], [1.0, -1.0], normalize=False)
    assert torch.equal(out, A - B)


def test_passthrough_scales_or_copies():
    assert torch.equal(methods.passthrough([A], scale=[0.5]), torch.tensor([0.5, 1, 1.5, 2]))
    assert methods.passthrough([A], scale=[None]) is A
