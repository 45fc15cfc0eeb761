"""The task-vector family, sce and ram: mergekit's golden values, the spec's properties, the selection
tie rule, the random methods' statistics and seeds, and the command line end to end."""

import json
import math
import warnings

import pytest
import torch

import merge
import methods
from conftest import llama_like, load, metadata, save_safetensors, save_sharded

FAMILY = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "della", "della_linear", "breadcrumbs",
          "breadcrumbs_ties"]
ALL = FAMILY + ["sce", "ram", "ramplus_tl"]
SELECTING = ["ties", "della", "della_linear", "breadcrumbs", "breadcrumbs_ties", "sce"]


def call(name, models, base, seed=0, **given):
    """A registered method called with its declared defaults (per-model ones repeated), `given` on top,
    and for random methods a generator seeded with `seed`."""
    declared = methods.REGISTRY[name]
    params = {p.name: [p.default] * len(models) if p.per_model else p.default for p in declared.params}
    for key, value in given.items():
        per_model = declared.param(key).per_model
        params[key] = list(value) if per_model and isinstance(value, (list, tuple)) else (
            [value] * len(models) if per_model else value)
    if declared.random:
        params["generator"] = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", methods.MethodWarning)
        return declared.func(models, base=base, **params)


def close(actual, expected, atol=1e-6):
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double().flatten(), expected.flatten(), atol=atol, rtol=0), actual.flatten().tolist()


A = torch.tensor([1.0, 2, 3, 4])
B = torch.tensor([2.0, -1, 0.5, 3])
C = torch.tensor([-1.0, 1, 2, -2])
D = torch.tensor([0.4, 0.45, -0.5, 1.1])
E = torch.tensor([-1.0, 1.5, 2, -2])
Z = torch.zeros(4)
W = [0.5, 0.3, 0.2]

G2 = [  # base D; A, B, C; weights W (spec §4 G2, mergekit 0.1.5's outputs)
    ("task_arithmetic", {}, [0.89999998, 0.89999998, 2.05, 2.5]),
    ("dare_linear", {}, [0.89999998, 0.89999998, 2.05, 2.5]),
    ("della_linear", {}, [0.89999998, 0.89999998, 2.05, 2.5]),
    ("task_arithmetic", {"lambda_": 0.5}, [0.64999998, 0.67499995, 0.77499998, 1.8]),
    ("task_arithmetic", {"weight": [1, 1, -1]}, [4, -1.2e-7, 1.5, 9]),
    ("ties", {}, [1.375, 1.7142856, 2.05, 3.625]),
    ("della", {}, [1.375, 1.7142856, 2.05, 3.625]),
    ("dare_ties", {}, [1.18, 1.335, 2.05, 3.12]),
    ("ties", {"density": 0.5}, [2.0, 0.45, 2.7142859, 3.625]),
    ("ties", {"density": 0.5, "normalize": False}, [0.88, 0.45, 1.75, 3.12]),
    ("ties", {"density": 0.5, "rescale": True}, [3.12, 0.45, 3.8028541, 4.7326369]),
    ("ties", {"density": [0.75, 0.5, 0.25]}, [2.0, 2.0, 3.0, 3.625]),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.25}, [0.6, 0.79, 0.0, 2.55]),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.75}, [0.42, 0.9, -0.2, 1.1]),
    ("breadcrumbs_ties", {"density": 0.5, "gamma": 0.25}, [0.88, 1.2249999, 0.0, 2.55]),
    ("sce", {}, [1.2836061, 1.5637863, 2.1872144, 3.7163944]),
    ("ram", {}, [0.66666669, 0.66666663, 1.8333333, 1.6666667]),
    ("ramplus_tl", {}, [0.66666669, 0.66666663, 1.8333333, 1.6666667]),
]


@pytest.mark.parametrize("name, given, expected", G2, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(G2)])
def test_g2_task_vector_golden_values(name, given, expected):
    if "weight" not in given and methods.REGISTRY[name].param("weight"):
        given = {"weight": W, **given}
    close(call(name, [A, B, C], D, **given), expected)


P, Q, R = torch.tensor([0.0, 2, 0, 1]), torch.tensor([1.0, 0, 0, 3]), torch.tensor([0, 0, 5, 1e-6])
G3_G4 = [  # base Z (spec §4 G3 and G4's ram rows)
    ("ties", [A, B, C], {"density": 0.5}, [2, 0, 2.5, 3.5]),
    ("ties", [torch.tensor([1.0, -2, 3, 0]), torch.tensor([-1.0, -1, 1, 2])], {}, [1, -1.5, 2, 2]),
    ("ties", [torch.tensor([1.0, -2, 3, 0]), torch.tensor([-1.0, -1, 1, 2])], {"normalize": False}, [1, -3, 4, 2]),
    ("breadcrumbs", [A, B, C], {"density": 0.5, "gamma": 0.25}, [2, 2, 5, 0]),  # |C| ties at the cut
    ("breadcrumbs_ties", [A, B, C], {"density": 0.5, "gamma": 0.25}, [2, 3, 5, 0]),
    ("sce", [A, B, C], {}, [1.3220339, 1.7499999, 2.1589861, 3.6779661]),
    ("sce", [A, B, C], {"select_topk": 0.5}, [1.4333333, 0, 0, 3.5666667]),  # a variance tie: our rule
    ("sce", [A, B, C], {"select_topk": 0.5, "tie_break": "mergekit"}, [0, 1.8000001, 0, 3.6666665]),
    ("sce", [A, B, E], {}, [1.322034, 1.8636364, 2.1554058, 3.6779661]),
    ("sce", [A, B, E], {"select_topk": 0.5}, [0, 1.8809524, 0, 3.6666667]),
    ("ram", [P, Q, R], {}, [1, 2, 5, 2]),
    ("ramplus_tl", [P, Q, R], {}, [1.02, 2.04, 5, 2]),
    ("ramplus_tl", [P, Q, R], {"r": 1.0, "alpha": 1.0}, [2, 4, 5, 2]),
]


@pytest.mark.parametrize("name, models, given, expected", G3_G4, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(G3_G4)])
def test_g3_golden_values_on_a_zero_base(name, models, given, expected):
    close(call(name, models, torch.zeros_like(models[0]), **given), expected)


def bf16(*values):
    return torch.tensor(values, dtype=torch.bfloat16)


G6_BASE = bf16(-0.0177001953125, -0.6640625, -0.9921875, -0.48828125)
G6_MODELS = [bf16(1.171875, -0.3203125, 0.034912109375, 1.0), bf16(0.173828125, 0.8125, 1.640625, -0.08935546875)]


@pytest.mark.parametrize("name, given, expected", [
    ("task_arithmetic", {}, [0.87109375, 0.01953125, 0.5078125, 0.66796875]),
    ("ties", {"density": 0.5}, [1.171875, 0.8125, 1.6328125, 0.99609375]),
])
def test_g6_bf16_inputs_give_mergekits_bits(name, given, expected):
    out = call(name, G6_MODELS, G6_BASE, weight=[0.7, 0.3], **given)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.tensor(expected, dtype=torch.bfloat16)), out.tolist()


X1 = torch.arange(1.0, 13.0).reshape(3, 4)


@pytest.mark.parametrize("name, models, given, expected", [
    ("dare_linear", [X1], {"density": 0.5}, [1.5, 0, 4.5, 6, 7.5, 0, 10.5, 0, 13.5, 0, 16.5, 18]),
    ("dare_ties", [X1, 1 - X1 / 2], {"density": 0.5},
     [2.7727273, 0, 4.5, 6, 7.5, 0, 10.5, -7.6363635, 13.5, 0, 16.5, 18]),
    ("della_linear", [X1], {"density": 0.5, "epsilon": 0.2},
     [0, 0, 6.3243241, 8.4324322, 0, 0, 14.756756, 0, 0, 0, 23.189188, 25.297297]),
])
def test_g7_draws_follow_mergekits_stream_from_the_same_generator_state(name, models, given, expected):
    # mergekit after torch.manual_seed(0); ours from a generator seeded 0: the same masks and rescaling
    close(call(name, models, torch.zeros(3, 4), seed=0, **given), expected)


# ---------------------------------------------------------------------------------------------------
# properties


def random_family(count=3, shape=(24, 40), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    return base.to(dtype), [(base + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(count)]


def test_density_one_makes_dare_and_della_linear_task_arithmetic_and_della_ties():
    base, models = random_family()
    reference = call("task_arithmetic", models, base, weight=W)
    assert torch.equal(call("dare_linear", models, base, weight=W), reference)
    assert torch.equal(call("della_linear", models, base, weight=W), reference)
    assert torch.equal(call("della", models, base, weight=W), call("ties", models, base, weight=W))


def test_density_one_makes_dare_ties_ties_with_the_same_normalize():
    base, models = random_family()
    for normalize in (False, True):
        assert torch.equal(call("dare_ties", models, base, weight=W, normalize=normalize),
                           call("ties", models, base, weight=W, normalize=normalize))


@pytest.mark.parametrize("name", ALL)
def test_zero_task_vectors_give_the_base(name):
    base, _ = random_family()
    assert torch.equal(call(name, [base.clone(), base.clone()], base, density=0.5) if name in FAMILY[1:]
                       else call(name, [base.clone(), base.clone()], base), base)


@pytest.mark.parametrize("name", ALL)
def test_one_model_with_weight_one_gives_base_plus_its_task_vector(name):
    base, (model,) = random_family(count=1)
    out = call(name, [model], base)
    assert torch.allclose(out, model, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in ALL if methods.ORDER_FREE in methods.REGISTRY[n].properties])
def test_order_free_methods_ignore_the_model_order(name):
    base, models = random_family()
    given = {"weight": W} if methods.REGISTRY[name].param("weight") else {}
    if methods.REGISTRY[name].param("density"):
        given["density"] = [0.3, 0.5, 0.7]
    forward = call(name, models, base, **given)
    backward = call(name, models[::-1], base, **{k: v[::-1] for k, v in given.items()})
    assert torch.allclose(forward, backward, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in ALL if methods.HOMOGENEOUS in methods.REGISTRY[n].properties])
def test_homogeneous_methods_scale_with_their_inputs(name):
    base, models = random_family()
    given = {"weight": W, "density": 0.5}
    assert torch.equal(call(name, [2 * m for m in models], 2 * base, **given), 2 * call(name, models, base, **given))


@pytest.mark.parametrize("name", ALL)
def test_chunked_passes_give_the_bits_of_one_whole_pass(name, monkeypatch):
    base, models = random_family(shape=(64, 96), dtype=torch.bfloat16)
    given = {"density": 0.5} if methods.REGISTRY[name].param("density") else {}
    if name == "sce":
        given = {"select_topk": 0.5}
    whole = call(name, models, base, **given)
    monkeypatch.setattr(methods, "CHUNK", 1 << 10)
    assert torch.equal(call(name, models, base, **given), whole)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "della", "sce", "breadcrumbs"])
def test_results_do_not_depend_on_the_thread_count(name):
    base, models = random_family(shape=(300, 500))
    given = {"select_topk": 0.5} if name == "sce" else {"density": 0.5, "rescale": True}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = call(name, models, base, **given)
        torch.set_num_threads(4)
        assert torch.equal(call(name, models, base, **given), single)
    finally:
        torch.set_num_threads(threads)


def test_sign_election_uses_the_weighted_deltas():
    # unweighted, +1 +1 -1.5 elects +; with weights 1, 1, 2 the sum is -1, so only the third survives
    base = torch.zeros(1)
    models = [torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([-1.5])]
    assert call("ties", models, base, weight=[1, 1, 2]).item() == -1.5
    assert call("ties", models, base, weight=[1, 1, 1]).item() == 1.0


def test_negation_needs_no_normalize():
    base, (model,) = random_family(count=1)
    assert torch.allclose(call("task_arithmetic", [model], base, weight=-1.0), 2 * base - model, atol=1e-6)
    # ties normalises by the weights that took part: -1 / -1 undoes the negation
    assert torch.allclose(call("ties", [model], base, weight=-1.0), model, atol=1e-6)
    assert torch.allclose(call("ties", [model], base, weight=-1.0, normalize=False), 2 * base - model, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# selection and its tie rule


def stable_sort_mask(keys, count, largest):
    order = torch.sort(keys.reshape(-1).double(), descending=largest, stable=True).indices[:count]
    mask = torch.zeros(keys.numel(), dtype=torch.bool)
    mask[order] = True
    return mask.view(keys.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 37, 5000, methods.RADIX_FROM + 4321])
def test_partial_selection_equals_a_stable_sort_on_tie_heavy_data(dtype, size):
    g = torch.Generator().manual_seed(size)
    keys = (torch.randn(size, generator=g) * 0.01).to(torch.bfloat16).to(dtype).abs()
    keys[::97] = float("nan")
    keys[1::89] = 0.0
    counts = {0, 1, size // 3, size // 2, size - 1, size} if size <= methods.RADIX_FROM else {size // 3, size - 1}
    for count in sorted(counts):
        for largest in (True, False):
            assert torch.equal(methods.first_in_order(keys, count, largest=largest),
                               stable_sort_mask(keys, count, largest)), (count, largest)


def test_equal_magnitudes_at_the_cut_keep_the_lower_index():
    base = torch.zeros(6)
    model = torch.tensor([1.0, -2.0, 2.0, -2.0, 2.0, 0.5])
    # keep 2 of 6: one 2.0 is certain (there are four), the next goes to the lowest index among the rest
    kept = methods.magnitude_mask(model, base, 2 / 6, "stable")
    assert kept.tolist() == [False, True, True, False, False, False]
    # breadcrumbs keeps ascending positions [bottom, bottom + keep): here drop 1 smallest, keep 3
    kept = methods.outlier_mask(model, base, 0.5, 2 / 6, "stable")
    assert kept.tolist() == [True, True, True, False, False, False]


def test_tie_break_mergekit_makes_mergekits_sort_calls():
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(4000)
    model = (torch.randn(4000, generator=g) * 4).round().to(torch.bfloat16)
    keys = model.abs().float()
    expected = torch.zeros(4000, dtype=torch.bool)
    expected[torch.argsort(keys, descending=True)[:1000]] = True
    assert torch.equal(methods.magnitude_mask(model, base.bfloat16(), 0.25, "mergekit"), expected)
    assert not torch.equal(methods.magnitude_mask(model, base.bfloat16(), 0.25, "stable"), expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_della_ranks_run_along_dim_1_equal_values_in_index_order(dtype):
    magnitudes = torch.tensor([[3.0, 1.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=dtype).view(2, 4, 1)
    ranks = methods.rank_probabilities(magnitudes, torch.arange(4.0), "stable")
    assert ranks.view(2, 4).tolist() == [[2, 1, 3, 0], [0, 1, 2, 3]]
    # along dim 1 of a 3-D tensor: each (row, column) pair is a line of its own
    cube = torch.tensor([[[5.0, 0.0], [1.0, 0.0], [3.0, 0.0]]], dtype=dtype)
    assert methods.rank_probabilities(cube, torch.arange(3.0), "stable").tolist() == [[[2, 0], [0, 1], [1, 2]]]


# ---------------------------------------------------------------------------------------------------
# random methods: statistics, the L1 rule, seeds


def within(observed, p, trials, sigmas=5):
    return abs(observed - p) <= sigmas * math.sqrt(p * (1 - p) / trials)


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_dare_keeps_a_fraction_within_sampling_error_of_density(density):
    mask = methods.dare_mask(torch.zeros(200_000), density, torch.Generator().manual_seed(1))
    assert within(mask.float().mean().item(), density, mask.numel())


def test_dare_masks_equal_torch_bernoulli_across_chunks():
    n = 3 * methods.CHUNK + 17
    mask = methods.dare_mask(torch.zeros(n), 0.3, torch.Generator().manual_seed(5))
    expected = torch.bernoulli(torch.full((n,), 0.3), generator=torch.Generator().manual_seed(5)).bool()
    assert torch.equal(mask, expected)


def test_della_keep_rate_of_each_rank_is_its_probability():
    rows, length, density, epsilon = 20_000, 5, 0.5, 0.3
    g = torch.Generator().manual_seed(2)
    model = torch.randn(rows, length, generator=g)
    kept = methods.della_mask(model, torch.zeros(rows, length), density, epsilon, "stable", g)
    ranks = model.abs().argsort(dim=1).argsort(dim=1)
    for rank in range(length):
        p = density - epsilon + 2 * epsilon * rank / (length - 1)
        assert within(kept[ranks == rank].float().mean().item(), p, rows), rank


def test_rescaled_task_vectors_keep_their_l1_norm_not_one_over_density():
    base, (model,) = random_family(count=1, shape=(100, 100))
    for name, given in (("dare_linear", {}), ("della_linear", {"epsilon": 0.1})):
        merged = call(name, [model], base, density=0.5, **given)
        delta, kept = model - base, merged - base
        assert math.isclose(kept.abs().sum().item(), delta.abs().sum().item(), rel_tol=1e-5)
        survivors = (delta * (kept != 0)).abs().sum().item()
        assert not math.isclose(kept.abs().sum().item(), survivors / 0.5, rel_tol=1e-3)  # not 1/density


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_random_methods_repeat_with_a_generator_state_and_differ_across_states(name):
    base, models = random_family()
    given = {"density": 0.5, "epsilon": 0.1} if "della" in name else {"density": 0.5}
    first = call(name, models, base, seed=3, **given)
    assert torch.equal(call(name, models, base, seed=3, **given), first)
    assert not torch.equal(call(name, models, base, seed=4, **given), first)


def test_the_della_epsilon_band_is_checked_per_model():
    problems = methods.REGISTRY["della"].problems({"density": [0.5, 0.5, 1.0], "epsilon": [0.5, 0.2, 0.9]}, 3)
    assert len(problems) == 1 and problems[0][0] == "epsilon" and "model 1" in problems[0][1]


def test_density_one_and_above_warn_that_nothing_is_pruned():
    base, models = random_family()
    with pytest.warns(methods.MethodWarning, match="mergekit reads values above 1 as 1"):
        out = methods.ties(models, base=base, weight=W, density=[1.5] * 3, lambda_=1.0, normalize=True,
                           rescale=False, int8_mask=False, tie_break="stable")
    assert torch.equal(out, call("ties", models, base, weight=W))


# ---------------------------------------------------------------------------------------------------
# the command line


def family(tmp_path, dtype=torch.float32, sharded=False):
    base_state = llama_like(0, dtype)
    states = []
    for i in range(1, 4):
        g = torch.Generator().manual_seed(i)
        states.append({k: (v + 0.05 * torch.randn(v.shape, generator=g).to(dtype)) if v.is_floating_point() else v
                       for k, v in base_state.items()})
    if sharded:
        paths = [save_sharded(tmp_path / name, state) for name, state in zip(("base", "ft1", "ft2", "ft3"),
                                                                            [base_state, *states])]
    else:
        paths = [save_safetensors(tmp_path / f"{name}.safetensors", state)
                 for name, state in zip(("base", "ft1", "ft2", "ft3"), [base_state, *states])]
    return paths[0], paths[1:], base_state, states


@pytest.mark.parametrize("name", ALL)
def test_every_method_runs_end_to_end_with_a_base(tmp_path, run, name):
    base, models, base_state, states = family(tmp_path, sharded=True)
    code, _, err = run("--method", name, "--base", base, "--models", *models, "--seed", 1, "--output", "out/")
    assert code == 0, err
    out = load(tmp_path / "out")
    tensor = "model.layers.1.mlp.up_proj.weight"
    expected = call(name, [s[tensor] for s in states], base_state[tensor], seed=merge.tensor_seed(1, tensor))
    assert torch.equal(out[tensor], expected)
    assert torch.equal(out["position_ids"], base_state["position_ids"])
    recipe = json.loads(metadata(tmp_path / "out" / "model.safetensors")["merge_recipe"])
    assert recipe["merge_method"] == name and recipe["base_model"] == str(base)


def test_cli_flags_reach_the_method(tmp_path, run):
    base, models, base_state, states = family(tmp_path)
    code, _, err = run("--method", "della", "--base", base, "--models", *models, "--weights", "0.5,0.3,0.2",
                       "--density", "0.6", "--epsilon", "0.1", "0.2", "0.3", "--lambda", "0.8", "--no-rescale",
                       "--tie-break", "mergekit", "--seed", "9", "--output", "o.safetensors")
    assert code == 0, err
    tensor = "model.embed_tokens.weight"
    expected = call("della", [s[tensor] for s in states], base_state[tensor], seed=merge.tensor_seed(9, tensor),
                    weight=W, density=0.6, epsilon=[0.1, 0.2, 0.3], lambda_=0.8, rescale=False,
                    tie_break="mergekit")
    assert torch.equal(load(tmp_path / "o.safetensors")[tensor], expected)
    recipe = json.loads(metadata(tmp_path / "o.safetensors")["merge_recipe"])
    assert recipe["seed"] == 9 and recipe["parameters"]["tie_break"] == "mergekit"
    assert [m["parameters"]["epsilon"] for m in recipe["models"]] == [0.1, 0.2, 0.3]


def test_ramplus_tl_takes_its_own_flags(tmp_path, run):
    base, models, *_ = family(tmp_path)
    code, _, err = run("--method", "ramplus_tl", "--base", base, "--models", *models, "--ram-r", "1",
                       "--ram-alpha", "0.5", "--epsilon", "1e-4", "--output", "o.safetensors")
    assert code == 0, err
    code, _, err = run("--method", "ramplus_tl", "--base", base, "--models", *models, "--alpha", "0.5",
                       "--output", "p.safetensors")
    assert code == 2 and "ramplus_tl takes --ram-alpha" in err


def test_seeded_runs_repeat_bit_for_bit_and_seeds_differ(tmp_path, run):
    base, models, *_ = family(tmp_path, dtype=torch.bfloat16)
    for output, seed in (("a", 5), ("b", 5), ("c", 6)):
        code, _, err = run("--method", "dare_ties", "--base", base, "--models", *models, "--density", "0.5",
                           "--seed", seed, "--output", f"{output}.safetensors")
        assert code == 0, err
    a, b, c = (load(tmp_path / f"{n}.safetensors") for n in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["lm_head.weight"], c["lm_head.weight"])


def test_an_unseeded_random_merge_stores_the_seed_that_repeats_it(tmp_path, run):
    base, models, *_ = family(tmp_path)
    code, _, err = run("--method", "della_linear", "--base", base, "--models", *models, "--density", "0.5",
                       "--epsilon", "0.2", "--output", "a.safetensors")
    assert code == 0, err
    seed = json.loads(metadata(tmp_path / "a.safetensors")["merge_recipe"])["seed"]
    assert f"seed: {seed}" in err
    code, _, err = run("--method", "della_linear", "--base", base, "--models", *models, "--density", "0.5",
                       "--epsilon", "0.2", "--seed", seed, "--output", "b.safetensors")
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_epsilon_outside_the_band_fails_before_any_output(tmp_path, run):
    base, models, *_ = family(tmp_path)
    code, _, err = run("--method", "della", "--base", base, "--models", *models, "--density", "0.5",
                       "--epsilon", "0.5", "--output", "o.safetensors")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 3 and not (tmp_path / "o.safetensors").exists()
    assert lines[0].startswith("error: della: --epsilon 0.5 with density 0.5 for model 1 ")


def test_tie_break_is_refused_by_methods_that_select_nothing(tmp_path, run):
    base, models, *_ = family(tmp_path)
    code, _, err = run("--method", "dare_linear", "--base", base, "--models", *models, "--tie-break", "stable",
                       "--output", "o.safetensors")
    assert code == 2 and "--tie-break is not used by dare_linear" in err


def test_density_one_is_reported_once_as_a_warning(tmp_path, run):
    base, models, *_ = family(tmp_path)
    code, _, err = run("--method", "ties", "--base", base, "--models", *models, "--output", "o.safetensors")
    assert code == 0
    assert [line for line in err.splitlines() if "nothing is pruned" in line][0].startswith("warning: tensor ")


def test_bf16_models_are_merged_and_written_in_bf16(tmp_path, run):
    base, models, base_state, states = family(tmp_path, dtype=torch.bfloat16)
    code, _, err = run("--method", "ties", "--base", base, "--models", *models, "--density", "0.5", "--weights",
                       "0.7", "--output", "o.safetensors")
    assert code == 0, err
    tensor = "model.layers.0.self_attn.q_proj.weight"
    out = load(tmp_path / "o.safetensors")[tensor]
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, call("ties", [s[tensor] for s in states], base_state[tensor], weight=0.7, density=0.5))
