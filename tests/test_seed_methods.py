"""karcher, sma, ema and wma against the seed spec's golden values and properties."""

import math

import pytest
import torch

import methods

A = torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.0, -0.5]])
B = torch.tensor([[0.2, -0.1, 0.25], [0.3, 0.1, -0.6]])
C = torch.tensor([[-0.1, -0.15, 0.35], [0.35, 0.2, -0.45]])
D = torch.tensor([[0.15, -0.25, 0.2], [0.45, 0.05, -0.55]])


def karcher(models, weights=None, max_iter=10, tol=1e-5, compute="float32"):
    return methods.karcher(models, weight=weights or [1.0] * len(models), max_iter=max_iter, tol=tol, compute=compute)


def close(actual, expected, atol=1e-6):
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double().flatten(), expected.flatten(), atol=atol, rtol=0), actual.flatten().tolist()


KARCHER_GOLDEN = [
    ([A, B, C], None, 10, [0.06584174, -0.1547758, 0.3099326, 0.3607965, 0.104293, -0.5309312]),
    ([A, B, C], [0.2, 0.3, 0.5], 10, [0.02834541, -0.1498739, 0.3206764, 0.3562223, 0.1352566, -0.5198244]),
    ([A, B], None, 10, [0.1512859, -0.1523002, 0.2785409, 0.354691, 0.05009054, -0.5560675]),
    ([A, B, C, D], None, 1, [0.08647788, -0.1789073, 0.2853732, 0.3848371, 0.09197114, -0.5390092]),
    ([torch.tensor(1.0), torch.tensor(-3.0)], None, 10, [2.0]),
    ([torch.tensor(1.0), torch.tensor(-3.0)], [0.3, 0.7], 10, [-2.4]),
    ([A, torch.zeros_like(A)], None, 10, [0.05, -0.1, 0.15, 0.2, 0.0, -0.25]),
    ([A, B, C], None, 0, [0.0661391, -0.1548427, 0.3098325, 0.3608465, 0.1039757, -0.5309613]),
    ([torch.tensor([1.0, 2, 3, 4]), torch.tensor([2.0, -1, 0.5, 3]), torch.tensor([-1.0, 1, 2, -2])], None, 10,
     [0.86419171, 1.0566931, 3.4394462, 1.852294]),
]


@pytest.mark.parametrize("compute", ["float32", "native"])
@pytest.mark.parametrize("models, weights, max_iter, expected", KARCHER_GOLDEN)
def test_karcher_matches_the_reference_golden_values(models, weights, max_iter, expected, compute):
    close(karcher(models, weights, max_iter, compute=compute), expected)


def test_karcher_scalar_sign_rule_picks_the_weighted_majority_sign():
    out = karcher([torch.tensor(1.0), torch.tensor(-3.0)])
    assert out.shape == () and out.item() == 2.0


def test_karcher_of_identical_inputs_is_that_input():
    x = torch.randn(50, 7, generator=torch.Generator().manual_seed(1))
    out = karcher([x, x.clone(), x.clone()])
    assert torch.allclose(out, x, rtol=3e-7, atol=1e-7)


def test_karcher_two_inputs_is_a_slerp_of_directions_times_the_weighted_mean_norm():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(40, generator=g).double(), torch.randn(40, generator=g).double()
    a1, a2 = 0.3, 0.7
    nx, ny = x.norm(), y.norm()
    ux, uy = x / nx, y / ny
    omega = torch.arccos(torch.dot(ux, uy))
    direction = (torch.sin((1 - a2) * omega) * ux + torch.sin(a2 * omega) * uy) / torch.sin(omega)
    expected = direction * (a1 * nx + a2 * ny)
    out = karcher([x.float(), y.float()], [a1, a2])
    assert torch.allclose(out.double(), expected, rtol=2e-6, atol=1e-7)


def test_karcher_output_norm_is_the_weighted_sum_of_norms():
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(30, generator=g) * s for s in (1.0, 2.0, 0.5)]
    weights = [0.2, 0.5, 0.3]
    out = karcher(xs, weights)
    expected = sum(w * x.double().norm() for w, x in zip(weights, xs))
    assert math.isclose(out.double().norm().item(), expected.item(), rel_tol=1e-6)


def test_karcher_ignores_the_scale_of_the_weights_and_is_homogeneous():
    base = karcher([A, B, C], [0.2, 0.3, 0.5])
    close(karcher([A, B, C], [2.0, 3.0, 5.0]), base.flatten().tolist())
    close(karcher([2.5 * A, 2.5 * B, 2.5 * C], [0.2, 0.3, 0.5]), (2.5 * base).flatten().tolist())


def test_karcher_converges_within_ten_iterations_on_the_golden_inputs():
    assert torch.equal(karcher([A, B, C], max_iter=10), karcher([A, B, C], max_iter=20))


def test_karcher_model_order_does_not_matter():
    forward = karcher([A, B, C], [0.2, 0.3, 0.5])
    backward = karcher([C, B, A], [0.5, 0.3, 0.2])
    assert torch.allclose(forward, backward, atol=1e-7)


def test_karcher_with_all_zero_inputs_returns_zeros():
    out = karcher([torch.zeros(5), torch.zeros(5)])
    assert torch.equal(out, torch.zeros(5))


def test_karcher_empty_tensors_give_an_empty_tensor():
    out = karcher([torch.zeros(0, 3), torch.zeros(0, 3)])
    assert out.shape == (0, 3)


def test_karcher_rejects_weights_whose_nonzero_inputs_sum_to_zero():
    with pytest.raises(ValueError, match="sum to 0"):
        karcher([A, B, torch.zeros_like(A)], [1.0, -1.0, 1.0])


def test_karcher_warns_on_antipodal_inputs():
    with pytest.warns(methods.MethodWarning, match="antipodal"):
        karcher([A, -A])


def test_karcher_native_mode_computes_in_the_inputs_dtype():
    out = karcher([A.bfloat16(), B.bfloat16(), C.bfloat16()], compute="native")
    assert out.dtype == torch.bfloat16
    reference = karcher([A, B, C])
    assert (out.float() - reference).norm() / reference.norm() < 1e-2


SMA = [([A, B, C], [0.0666667, -0.15, 0.3, 0.35, 0.1, -0.5166667]),
       ([A, B, C, D], [0.0875, -0.175, 0.275, 0.375, 0.0875, -0.525])]
EMA = [([A, B, C], 0.5, [0.025, -0.15, 0.3125, 0.35, 0.125, -0.5]),
       ([A, B, C], 0.3, [0.061, -0.164, 0.3045, 0.364, 0.081, -0.506]),
       ([A, B, C, D], 0.3, [0.0877, -0.1898, 0.27315, 0.3898, 0.0717, -0.5192])]
WMA = [([A, B, C], None, [0.1, -0.1583333, 0.2916667, 0.3583333, 0.0666667, -0.525]),
       ([A, B, C], [0.5, 0.3, 0.2], [0.09, -0.16, 0.295, 0.36, 0.07, -0.52]),
       ([A, B, C, D], None, [0.095, -0.165, 0.285, 0.365, 0.075, -0.525]),
       ([A, B, C], [1.0, 0.0, 1.0], [0.0, -0.175, 0.325, 0.375, 0.1, -0.475])]


@pytest.mark.parametrize("models, expected", SMA)
def test_sma_golden_values(models, expected):
    close(methods.sma(models), expected)


@pytest.mark.parametrize("models, alpha, expected", EMA)
def test_ema_golden_values(models, alpha, expected):
    close(methods.ema(models, alpha=alpha), expected)


@pytest.mark.parametrize("models, weights, expected", WMA)
def test_wma_golden_values(models, weights, expected):
    close(methods.wma(models, weight=weights or methods.descending(len(models))), expected)


def test_ema_with_alpha_one_returns_the_last_model_bit_for_bit():
    assert torch.equal(methods.ema([A, B, C], alpha=1.0), C)


@pytest.mark.parametrize("alpha, count, expected", [
    (0.5, 3, [0.25, 0.25, 0.5]), (0.5, 4, [0.125, 0.125, 0.25, 0.5]),
    (0.3, 3, [0.49, 0.21, 0.3]), (0.3, 4, [0.343, 0.147, 0.21, 0.3]), (0.7, 3, [0.09, 0.21, 0.7])])
def test_ema_equals_its_closed_form_weights(alpha, count, expected):
    models = [A, B, C, D][:count]
    direct = sum(w * m.double() for w, m in zip(expected, models))
    assert torch.allclose(methods.ema(models, alpha=alpha).double(), direct, atol=1e-7)


def test_sma_equals_equal_weight_wma_and_two_model_ema_at_one_half():
    assert torch.allclose(methods.sma([A, B]), methods.wma([A, B], weight=[1, 1]), atol=1e-7)
    assert torch.allclose(methods.sma([A, B]), methods.ema([A, B], alpha=0.5), atol=1e-7)


def test_sma_of_identical_inputs_is_exact_for_a_power_of_two_count():
    x = torch.randn(100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(methods.sma([x, x, x, x]), x)


def test_wma_ignores_the_scale_of_its_weights():
    assert torch.allclose(methods.wma([A, B, C], weight=[5, 3, 2]), methods.wma([A, B, C], weight=[10, 6, 4]), atol=1e-7)


def test_reversing_the_order_changes_ema_and_wma_but_not_sma():
    assert torch.allclose(methods.sma([A, B, C]), methods.sma([C, B, A]), atol=1e-7)
    assert not torch.allclose(methods.ema([A, B, C], alpha=0.3), methods.ema([C, B, A], alpha=0.3))
    assert not torch.allclose(methods.wma([A, B, C], weight=[3, 2, 1]), methods.wma([C, B, A], weight=[3, 2, 1]))


def test_wma_default_weights_favour_the_first_model():
    assert methods.descending(4) == [4, 3, 2, 1]
