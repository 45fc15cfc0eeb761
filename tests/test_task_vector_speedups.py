"""The fast paths of the task-vector family against plain statements of the same math, bit for bit:
DELLA's ranks (numpy's row sort of packed keys) and ramplus_tl's one-pass merge (amplified terms redone
only where one model changed an element, gathered or chunk-wide)."""

import pytest
import torch

import methods


def tie_heavy(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(shape, generator=g) * 8).round() / 64).abs().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(7, 300, 3), (64, 1024, 1), (1, 5000, 1), (3, 1, 4)])
def test_della_ranks_equal_a_stable_double_argsort(dtype, shape):
    magnitudes = tie_heavy(shape, dtype)
    table = torch.rand(shape[1], generator=torch.Generator().manual_seed(1))
    expected = table[magnitudes.argsort(dim=1, stable=True).argsort(dim=1)]
    assert torch.equal(methods.rank_probabilities(magnitudes, table, "stable"), expected)


def ramplus_oracle(models, base, r, alpha, epsilon):
    """mergekit's ramplus_tl as it reads: whole-tensor counts, then torch.where over the stacked terms."""
    deltas = torch.stack([x - base for x in models]).reshape(len(models), -1)
    active = (deltas.abs() > epsilon).to(deltas.dtype)
    counts = active.sum(dim=0, keepdim=True)
    shared = (active * (counts > 1)).sum(dim=1, dtype=torch.float64).to(torch.int64)
    unique = (active * (counts == 1)).sum(dim=1, dtype=torch.float64).to(torch.int64)
    factor = (1 + r * (shared / unique.clamp(min=epsilon)).clamp(min=0, max=alpha)).unsqueeze(-1)
    changed = deltas * active
    merged = torch.where(counts == 1, changed * factor, changed / counts.clamp(min=1)).sum(dim=0)
    return (base.reshape(-1) + merged).reshape(base.shape)


def families(dtype):
    g = torch.Generator().manual_seed(2)
    n = 3 * methods.CHUNK + 17
    base = torch.randn(n, generator=g)
    dense = [torch.randn(n, generator=g) * 0.002 for _ in range(3)]  # a few elements changed by one model
    owner = torch.randint(0, 4, (n,), generator=g)
    disjoint = [torch.randn(n, generator=g) * 0.002 * (owner == i) for i in range(3)]  # most, in every chunk
    mixed = [torch.cat([d[:methods.CHUNK], e[methods.CHUNK:]]) for d, e in zip(dense, disjoint)]
    for deltas in (dense, disjoint, mixed):
        yield base.to(dtype), [(base + d).to(dtype) for d in deltas]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ramplus_tl_equals_mergekits_expression_bit_for_bit(dtype):
    for base, models in families(dtype):
        for r, alpha, epsilon in ((0.1, 0.2, 1e-5), (0.5, 0.4, 1e-3)):
            expected = ramplus_oracle(models, base, r, alpha, epsilon)
            actual = methods.ramplus_tl(models, base=base, r=r, alpha=alpha, epsilon=epsilon)
            assert actual.dtype == expected.dtype
            assert torch.equal(actual, expected)
