"""nuslerp, multislerp, model_stock and arcee_fusion work chunk by chunk (a whole vector that a reduction
needs is built in a buffer a chunk at a time; row-wise math runs on blocks of rows): on tensors spanning
several chunks, with rows longer than a chunk or of odd length, their bits equal the whole-tensor
formulas of mergekit-methods.md §2.3, §2.4, §2.8 and §2.10, written out below in the order of operations
mergekit uses. The oracles run on one thread (one-output sums then add up as ours always do); the
methods run on the default thread count.
"""

from __future__ import annotations

import pytest
import torch

import methods

# two chunks and a bit; rows longer than a chunk; odd rows in 3-D
SHAPES = [(300, 1000), (2, 270001), (5, 3, 20011)]
SAMPLED = (1100, 919)  # arcee_fusion samples 10^6 of the scores beyond 10^6
DTYPES = [torch.float32, torch.bfloat16]


def family(shape, dtype, count=3):
    g = torch.Generator().manual_seed(sum(shape))
    base = torch.randn(shape, generator=g) * 0.02
    tunes = [(base + torch.randn(shape, generator=g) * 0.002).to(dtype) for _ in range(count)]
    return base.to(dtype), tunes


def one_thread(oracle):
    def run(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return oracle(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return run


def same_bits(ours, expected):
    return ours.dtype == expected.dtype and ours.shape == expected.shape and torch.equal(
        ours.reshape(-1).view(torch.uint8), expected.reshape(-1).view(torch.uint8))


@one_thread
def nuslerp_oracle(t, x1, x2, base, flatten, row_wise):
    v0, v1 = (x1, x2) if base is None else (x1 - base, x2 - base)
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)
    u0 = v0 / torch.norm(v0, dim=-1, keepdim=True).clamp(min=1e-7)
    u1 = v1 / torch.norm(v1, dim=-1, keepdim=True).clamp(min=1e-7)
    c = (u0 * u1).sum(-1, keepdim=True).clamp(-1, 1)
    straight = (1 - c.square()) <= 1e-8**2
    theta = torch.acos(torch.where(straight, 0, c))
    y = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    y = torch.where(straight, (1 - t) * v0 + t * v1, y)
    if row_wise and not flatten:
        y = y.transpose(0, -1)
    y = y.reshape(shape)
    return y if base is None else base + y


@one_thread
def multislerp_oracle(models, weights, base, eps=1e-8):
    stacked = torch.stack(models)
    if base is not None:
        stacked -= base
    flat = stacked.view(len(models), -1)
    w = torch.tensor(weights, dtype=flat.dtype)
    w = w / w.sum()
    norms = torch.norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean = mean / torch.norm(mean)
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    g = (tangents * w.view(-1, 1)).sum(0)
    r = torch.norm(g) + eps
    y = (mean * torch.cos(r) + g * (torch.sin(r) / r)) * (norms.squeeze(-1) * w).sum()
    y = y.view(models[0].shape)
    return y if base is None else y + base


@one_thread
def model_stock_oracle(base, models, filter_wise):
    if filter_wise:
        w0, ws = (base.unsqueeze(0), [x.unsqueeze(0) for x in models]) if base.dim() == 1 else (base, models)
    else:
        w0, ws = base.reshape(-1), [x.reshape(-1) for x in models]
    offsets = [x - w0 for x in ws]
    cosines = [((a * b).sum(-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
               for i, a in enumerate(offsets) for b in offsets[i + 1:]]
    cos_theta = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    den = 1 + (n - 1) * cos_theta
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos_theta), n * cos_theta / torch.where(singular, 1, den))
    return (t * (sum(ws) / n) + (1 - t) * w0).reshape(base.shape)


@one_thread
def arcee_oracle(base, x, seed):
    p, q = x.softmax(-1) + 1e-8, base.softmax(-1) + 1e-8
    importance = (x - base).abs() * (p * torch.log(p / q)).sum(-1, keepdim=True)
    flat = importance.reshape(-1)
    if flat.numel() > 10**6:
        flat = flat[torch.randint(flat.numel(), (10**6,), generator=torch.Generator().manual_seed(seed))]
    ordered = torch.sort(flat).values
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    return base + (x - base) * (importance >= median + 1.5 * (q3 - q1)).float()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nuslerp_in_chunks_and_row_blocks_has_the_bits_of_the_whole_tensor_formula(shape, dtype):
    base, (a, b, _) = family(shape, dtype)
    for flatten, row_wise in ((True, False), (False, False), (False, True)):
        for origin in (None, base):
            ours = methods.nuslerp([a, b], weight=[0.3, 0.9], nuslerp_flatten=flatten, nuslerp_row_wise=row_wise,
                                   base=origin)
            assert same_bits(ours, nuslerp_oracle(0.75, a, b, origin, flatten, row_wise)), (flatten, row_wise, origin)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_multislerp_in_chunks_has_the_bits_of_the_whole_tensor_formula(shape, dtype):
    base, tunes = family(shape, dtype)
    for origin in (None, base):
        ours = methods.multislerp(tunes, weight=[0.5, 0.3, 0.2], normalize_weights=True, eps=1e-8, base=origin)
        assert same_bits(ours, multislerp_oracle(tunes, [0.5, 0.3, 0.2], origin)), origin


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_model_stock_in_chunks_and_row_blocks_has_the_bits_of_the_whole_tensor_formula(shape, dtype):
    base, tunes = family(shape, dtype)
    for filter_wise in (False, True):
        ours = methods.model_stock(tunes, filter_wise=filter_wise, base=base)
        assert same_bits(ours, model_stock_oracle(base, tunes, filter_wise)), filter_wise


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES + [SAMPLED], ids=str)
def test_arcee_fusion_in_row_blocks_has_the_bits_of_the_whole_tensor_formula(shape, dtype):
    base, (x, _, _) = family(shape, dtype)
    ours = methods.arcee_fusion([x], base=base, generator=torch.Generator().manual_seed(7))
    assert same_bits(ours, arcee_oracle(base, x, seed=7))


def edge_values(dtype):
    g = torch.Generator().manual_seed(3)
    mixed = torch.randn(20001, generator=g)
    nans = mixed.clone()
    nans[::7], nans[3::11] = float("nan"), -float("nan")
    zeros = mixed.abs()
    zeros[::2], zeros[1::4] = 0.0, -0.0
    infinite = mixed.clone()
    infinite[::5], infinite[2::5] = float("inf"), -float("inf")
    cases = {"mixed signs": mixed, "NaN of both signs": nans, "zeros of both signs": zeros, "infinities": infinite,
             "non-negative": mixed.abs(), "constant": torch.full((9,), 0.5), "one value": torch.tensor([-2.0])}
    return {label: x.to(dtype) for label, x in cases.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_quartile_selection_finds_the_values_torch_sort_puts_there(dtype):
    for label, x in edge_values(dtype).items():
        positions = (torch.tensor([0.25, 0.5, 0.75]) * (x.numel() - 1)).long()
        expected = torch.sort(x).values[positions]
        found = methods.sorted_floats(x, positions)
        assert found.dtype == dtype, label
        # equal values (0.0 and -0.0 are equal; NaN is NaN)
        assert torch.equal(found.isnan(), expected.isnan()), label
        assert torch.equal(found[~found.isnan()], expected[~expected.isnan()]), label


def karcher_oracle(models, alphas, max_iter, tol):
    """mergekit's karcher (and the seed's native arithmetic), whole tensors, op for op."""
    wide = torch.float64 if models[0].dtype == torch.float64 else torch.float32
    norms = [torch.linalg.vector_norm(x.to(wide)) for x in models]
    units = [(x / n).to(x.dtype) for x, n in zip(models, norms)]
    betas = [a / sum(alphas) for a in alphas]
    point = torch.zeros_like(units[0])
    for beta, unit in zip(betas, units):
        point += beta * unit
    point = (point / torch.linalg.vector_norm(point.to(wide))).to(point.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(point)
        for beta, unit in zip(betas, units):
            cosine = torch.clamp(torch.dot(point.flatten(), unit.flatten()), -1.0, 1.0)
            theta = torch.arccos(cosine)
            if theta.item() < tol:
                continue
            tangent += beta * (theta / torch.sin(theta)) * (unit - cosine * point)
        size = torch.linalg.vector_norm(tangent.to(wide))
        if size.item() < tol:
            break
        point = (torch.cos(size) * point + torch.sin(size) * (tangent / size)).to(point.dtype)
        length = torch.linalg.vector_norm(point.to(wide))
        if length.item() > tol:
            point = (point / length).to(point.dtype)
    return sum(a * n for a, n in zip(alphas, norms)) * point


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_karcher_replayed_op_for_op_in_chunks_has_the_bits_of_the_whole_tensor_formula(shape, dtype):
    base, tunes = family(shape, dtype)
    models = [base, *tunes]
    g = torch.Generator().manual_seed(5)
    models[1] = (models[1].float() + 0.02 * torch.randn(shape, generator=g)).to(dtype)  # some real angles
    for alphas in ([0.25] * 4, [0.4, 0.3, 0.2, 0.1]):
        ours = methods.karcher_direct(models, alphas, max_iter=10, tol=1e-5)
        assert same_bits(ours, karcher_oracle(models, alphas, 10, 1e-5))
