"""Differential check of the task-vector family, sce and ram against mergekit 0.1.5.

mergekit runs in its own virtual environment, in a subprocess (never imported here): its interpreter is
$MERGEKIT_PYTHON, default /work/mkvenv/bin/python; the test skips when it is absent. One child merges
every case with `mergekit.merge_methods.api.merge_tensors` and saves the results.
"""

import os
import subprocess
from pathlib import Path

import pytest
import torch

from test_task_vectors import call

MERGEKIT_PYTHON = os.environ.get("MERGEKIT_PYTHON", "/work/mkvenv/bin/python")

CHILD = r"""
import sys, torch
from mergekit.merge_methods.api import merge_tensors
cases = torch.load(sys.argv[1])
results = []
for case in cases:
    if case["seed"] is not None:
        torch.manual_seed(case["seed"])  # mergekit's one global stream
    tensors = [*case["models"], case["base"]]
    results.append(merge_tensors(tensors, case["method"], parameters=case["mergekit"], base_index=len(tensors) - 1))
torch.save(results, sys.argv[2])
"""

W = [0.5, 0.3, -0.2]
DETERMINISTIC = [
    ("task_arithmetic", {"weight": W}),
    ("task_arithmetic", {"weight": W, "lambda": 0.7, "normalize": True}),
    ("ties", {"weight": W, "density": 0.4}),
    ("ties", {"weight": W, "density": [0.3, 0.6, 0.9], "normalize": False}),
    ("ties", {"weight": W, "density": 0.4, "rescale": True}),
    ("breadcrumbs", {"weight": W, "density": 0.5, "gamma": 0.1}),
    ("breadcrumbs_ties", {"weight": W, "density": 0.6, "gamma": [0.05, 0.1, 0.3]}),
    ("sce", {}),
    ("sce", {"select_topk": 0.4}),
    ("ram", {"epsilon": 0.01}),
    ("ramplus_tl", {"epsilon": 0.01, "r": 0.5, "alpha": 0.4}),
    # random methods at density 1 draw nothing
    ("dare_linear", {"weight": W}),
    ("dare_ties", {"weight": W}),
    ("della", {"weight": W}),
    ("della_linear", {"weight": W}),
]
# With mergekit's global stream seeded as our generator is, the masks match too (float32: mergekit draws
# with float32 probabilities there, as we always do).
SEEDED = [
    ("dare_linear", {"weight": W, "density": 0.5}),
    ("dare_ties", {"weight": W, "density": [0.3, 0.5, 0.7]}),
    ("della", {"weight": W, "density": 0.5, "epsilon": 0.2}),
    ("della_linear", {"weight": W, "density": [0.4, 0.5, 0.6], "epsilon": 0.1}),
]
SHAPES = [(48, 64), (300,), (4, 6, 10)]
# mergekit's rescale norms and sce's mean squares are sums in the compute dtype; ours are float64 sums
# rounded once, which may differ by one unit in the last place
SUMS = {"rescale", "sce", "dare_linear", "dare_ties", "della", "della_linear"}


def family(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    # rounded deltas give magnitude ties at every cut, and some elements no model changes
    deltas = [(torch.randn(shape, generator=g) * 8).round() / 64 for _ in range(3)]
    deltas[0].view(-1)[::7] = 0.0
    return base.to(dtype), [(base + d).to(dtype) for d in deltas]


def ours(name, given, models, base, seed):
    given = {("lambda_" if k == "lambda" else k): v for k, v in given.items()}
    if name not in ("task_arithmetic", "dare_linear", "dare_ties", "ram", "ramplus_tl"):
        given["tie_break"] = "mergekit"
    return call(name, models, base, seed=seed or 0, **given)


def cases():
    for dtype in (torch.float32, torch.bfloat16):
        for s, shape in enumerate(SHAPES):
            base, models = family(shape, dtype, s)
            for name, given in DETERMINISTIC:
                yield dtype, name, given, base, models, None
            if dtype == torch.float32:
                for name, given in SEEDED:
                    yield dtype, name, given, base, models, 7


def within_one_ulp(actual, expected):
    wide_a, wide_e = actual.double(), expected.double()
    ulp = torch.finfo(actual.dtype).eps * torch.maximum(wide_a.abs(), wide_e.abs())
    return bool(((wide_a - wide_e).abs() <= ulp).all())


@pytest.mark.skipif(not Path(MERGEKIT_PYTHON).exists(), reason="mergekit 0.1.5 venv not found")
def test_our_methods_match_mergekit_0_1_5(tmp_path):
    todo = list(cases())
    torch.save([{"method": name, "mergekit": given, "models": models, "base": base, "seed": seed}
                for _, name, given, base, models, seed in todo], tmp_path / "cases.pt")
    done = subprocess.run([MERGEKIT_PYTHON, "-c", CHILD, str(tmp_path / "cases.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    theirs = torch.load(tmp_path / "out.pt")
    problems = []
    for (dtype, name, given, base, models, seed), expected in zip(todo, theirs):
        actual = ours(name, given, models, base, seed)
        label = f"{name} {given} {dtype} {tuple(base.shape)}"
        if actual.to(expected.dtype).shape != expected.shape:
            problems.append(f"{label}: shape {tuple(actual.shape)}")
        elif dtype == torch.float32:
            if not torch.allclose(actual, expected, atol=1e-6, rtol=0):
                problems.append(f"{label}: max |diff| {(actual - expected).abs().max().item():.3g}")
        elif SUMS & ({name} | set(given)):
            if not within_one_ulp(actual.to(expected.dtype), expected):
                problems.append(f"{label}: more than one ulp apart")
        elif not torch.equal(actual.to(expected.dtype), expected):
            problems.append(f"{label}: {(actual.to(expected.dtype) != expected).sum().item()} elements differ")
    assert not problems, "\n".join(problems)
    # the data ties at the cuts: our default rule keeps other elements there than mergekit's sort does
    index = next(i for i, case in enumerate(todo) if case[0] == torch.bfloat16 and case[1] == "ties")
    _, _, given, base, models, _ = todo[index]
    assert not torch.equal(call("ties", models, base, **given), theirs[index])
