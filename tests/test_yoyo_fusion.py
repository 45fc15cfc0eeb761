"""yoyo_fusion against the seed spec (§3): golden values, properties, a direct SVD oracle, and the CLI."""

import itertools
import json

import pytest
import torch

import methods
from conftest import llama_like, load, metadata, save_sharded

A = torch.tensor([[0.1, -0.2, 0.3], [0.4, 0.0, -0.5]])
B = torch.tensor([[0.2, -0.1, 0.25], [0.3, 0.1, -0.6]])
C = torch.tensor([[-0.1, -0.15, 0.35], [0.35, 0.2, -0.45]])
D = torch.tensor([[0.15, -0.25, 0.2], [0.45, 0.05, -0.55]])
DEFAULTS = dict(anchor=0, median="coordinate", k_minus_one=True, config_from=1, median_rule="lower")


def yoyo(models, **options):
    return methods.yoyo_fusion(models, **{**DEFAULTS, **options})


def close(actual, expected, atol=1e-6):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double().flatten(), expected.flatten(), atol=atol, rtol=0), actual.flatten().tolist()


def reference_yoyo(models, anchor=0, median="coordinate", k_minus_one=True, median_rule="lower"):
    """§3.3 step by step, with the D x K residual matrix and its real SVD, in float64 (u_i in float32)."""
    eps = 1e-8
    x = torch.stack([m.reshape(-1).float() for m in models])
    count, numel = x.shape
    rms = ((x.double() ** 2).sum(dim=1) / (numel + 1e-12) + eps).sqrt().clamp(min=1e-6)
    u = (x / (rms + eps).float().unsqueeze(1)).double()
    norms = x.double().norm(dim=1)

    def lowmed(v):
        return v.sort(dim=0).values[(v.shape[0] - 1) // 2]

    def centre_median(v):
        ordered = v.sort(dim=0).values
        if median_rule == "lower" or count % 2:
            return lowmed(v)
        return (ordered[count // 2 - 1] + ordered[count // 2]) / 2

    if anchor:
        centre = u[anchor - 1]
    else:
        centre = centre_median(u)
        if median == "geometric":
            y = centre
            for _ in range(100):
                w = 1 / ((u - y).norm(dim=1) + eps)
                w = w / w.sum()
                following = (w.unsqueeze(1) * u).sum(dim=0)
                if (following - y).norm() < 1e-6:
                    break
                y = following
            centre = y
    residuals = u - centre
    merged = centre
    if residuals.norm(dim=1).max() >= 1e-7:
        p, s, _ = torch.linalg.svd(residuals.T, full_matrices=False)
        energy = (s**2).sum()
        if energy >= 1e-16:
            m = min(count - 1, len(s)) if k_minus_one else len(s)
            gamma = min(1 / ((s[:m] ** 2).sum() / (energy + 1e-16) + 1e-16), 10.0) if k_minus_one else 1.0
            z = residuals @ p[:, :m]
            scale = (1.4826 * lowmed(z.abs())).clamp(min=1e-12)
            rho = z.norm(dim=1)
            global_scale = max(1.4826 * lowmed(rho), 1e-12)
            w = (1 - (z.abs() / (4.685 * scale + eps)) ** 2).clamp(min=0) ** 2
            g = (1 - (rho / (4.685 * global_scale + eps)) ** 2).clamp(min=0) ** 2
            weights = w * g.unsqueeze(1)
            z_star = (weights * z).sum(dim=0) / (weights.sum(dim=0) + eps)
            merged = centre + gamma * p[:, :m] @ z_star
    y = merged * rms.mean()
    y = y * norms.mean() / (y.norm() + eps)
    return y.reshape(models[0].shape)


# ---------------------------------------------------------------------------------------------------
# golden values (§3.8): the reference's float32 results, `lower` and `standard` columns

GOLDEN = [
    ([A, B, C], {}, [0.09182725, -0.1557413, 0.3133873, 0.368766, 0.1145393, -0.5169925], None),
    ([A, B, C], {"median": "geometric"},
     [0.07831495, -0.1554495, 0.3053395, 0.3607903, 0.09443922, -0.5335444], None),
    ([A, B, C], {"anchor": 2}, [0.08088213, -0.147692, 0.3031955, 0.3531553, 0.1055436, -0.539581], None),
    ([A, B, C], {"k_minus_one": False},
     [0.07525066, -0.1541741, 0.3064599, 0.3598232, 0.09904703, -0.5335307], None),
    ([A, B, C, D], {}, [0.1257769, -0.217825, 0.2420273, 0.3824762, 0.03735207, -0.546338],
     [0.1372794, -0.1844418, 0.2730558, 0.3937466, 0.07132067, -0.5295907]),
    ([A, B, C, D], {"median": "geometric"},
     [0.1254115, -0.1960646, 0.2635138, 0.397005, 0.0424186, -0.5338464], None),
    ([A, B], {}, [0.1017216, -0.2034433, 0.2492567, 0.2991081, 0.0, -0.5982162],
     [0.1512859, -0.1523002, 0.2785409, 0.354691, 0.05009054, -0.5560675]),
    ([torch.tensor([1.0]), torch.tensor([-3.0]), torch.tensor([2.0])], {}, [2.0], None),
    ([A, B], {"anchor": 1}, [0.1010125, -0.202025, 0.3030374, 0.4040499, 0.0, -0.5050623], None),
    ([torch.tensor(1.0), torch.tensor(-3.0)], {}, [-2.0], [0.0]),  # 0-D, computed as (1,) (§3.6)
]


@pytest.mark.parametrize("rule", ["lower", "standard"])
@pytest.mark.parametrize("models, options, lower, standard", GOLDEN)
def test_yoyo_matches_the_reference_golden_values(models, options, lower, standard, rule):
    out = yoyo(models, median_rule=rule, **options)
    assert out.shape == models[0].shape and out.dtype == torch.float32
    close(out, lower if rule == "lower" or standard is None else standard)


# ---------------------------------------------------------------------------------------------------
# the Gram form against the direct SVD form (§3.9.6)


def random_family(seed, count, shape=(24, 13), related=True):
    """Fine-tune-like models (one base plus noise of different sizes) or unrelated random ones."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    if not related:
        return [torch.randn(shape, generator=g) * (1 + k) for k in range(count)]
    return [base + torch.randn(shape, generator=g) * (0.05 + 0.1 * k) for k in range(count)]


COMBINATIONS = [
    (count, anchor, median, truncate, rule)
    for count in (2, 3, 4)
    for anchor in sorted({0, 1, count})
    for median in ("coordinate", "geometric")
    for truncate in (True, False)
    for rule in ("lower", "standard")
    if not anchor or (median, rule) == ("coordinate", "lower")  # the centre's options are unused with an anchor
]


@pytest.mark.parametrize("count, anchor, median, truncate, rule", COMBINATIONS)
def test_gram_form_equals_the_direct_svd_form(count, anchor, median, truncate, rule, monkeypatch):
    options = dict(anchor=anchor, median=median, k_minus_one=truncate, median_rule=rule)
    for seed, related in ((count, True), (10 + count, False)):
        models = random_family(seed, count, related=related)
        expected = reference_yoyo(models, **options)
        close(yoyo(models, **options), expected)
        # Many ragged chunks: every pass must add up the same quantities as one whole-tensor pass.
        monkeypatch.setattr(methods, "yoyo_chunk", lambda count, device: 7)
        close(yoyo(models, **options), expected)
        monkeypatch.undo()


def test_gram_form_equals_the_direct_form_when_there_are_more_models_than_elements():
    models = [torch.tensor([0.3, -1.0]), torch.tensor([0.5, -0.2]), torch.tensor([-0.4, 0.9]), torch.tensor([1.0, 1.1])]
    for median, truncate in itertools.product(("coordinate", "geometric"), (True, False)):
        options = dict(median=median, k_minus_one=truncate)
        close(yoyo(models, **options), reference_yoyo(models, **options))


def test_weiszfeld_stays_at_a_model_that_is_the_median_everywhere_as_the_reference_does():
    half = torch.linspace(0.05, 1.0, 40)
    x = torch.cat([half, -half])  # symmetric, so x - 0.5 and x + 0.5 have the same RMS
    models = [x - 0.5, x, x + 0.5]  # after unit-RMS scaling the middle one is the median of every element
    for rule in ("lower", "standard"):
        close(yoyo(models, median="geometric", median_rule=rule), reference_yoyo(models, median="geometric"))


# ---------------------------------------------------------------------------------------------------
# properties (§3.6, §3.9)


def test_identical_inputs_give_that_input():
    x = torch.randn(40, 9, generator=torch.Generator().manual_seed(1))
    for options in ({}, {"median": "geometric"}, {"anchor": 2}, {"k_minus_one": False}):
        assert torch.allclose(yoyo([x, x.clone(), x.clone()], **options), x, rtol=1e-6, atol=1e-7)


def test_multiples_of_one_tensor_give_the_middle_one():
    t = torch.randn(60, generator=torch.Generator().manual_seed(2))
    for options in ({}, {"median": "geometric"}, {"median_rule": "standard"}):
        assert torch.allclose(yoyo([t, 2 * t, 3 * t], **options), 2 * t, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"median": "geometric"}, {"anchor": 3}, {"k_minus_one": False},
                                     {"median_rule": "standard"}])
def test_output_norm_is_the_mean_input_norm(options):
    models = random_family(3, 4, related=False)
    out = yoyo(models, **options)
    mean_norm = sum(m.double().norm() for m in models) / len(models)
    assert abs(out.double().norm() - mean_norm) <= 1e-6 * mean_norm


@pytest.mark.parametrize("options", [{}, {"median": "geometric"}, {"median_rule": "standard"},
                                     {"median": "geometric", "median_rule": "standard"}, {"k_minus_one": False}])
def test_without_an_anchor_the_order_of_the_models_does_not_matter(options):
    models = random_family(4, 4)
    first = yoyo(models, **options)
    for order in itertools.permutations(range(4)):
        close(yoyo([models[i] for i in order], **options), first.flatten())


def test_with_an_anchor_only_the_anchor_position_matters():
    models = random_family(5, 4)
    first = yoyo(models, anchor=2)
    for order in itertools.permutations(range(4)):
        close(yoyo([models[i] for i in order], anchor=order.index(1) + 1), first.flatten())


def test_two_models_with_an_anchor_give_the_anchor_direction_at_the_mean_norm():
    x, y = random_family(6, 2, related=False)
    mean_norm = (x.double().norm() + y.double().norm()) / 2
    for anchor, kept in ((1, x), (2, y)):
        close(yoyo([x, y], anchor=anchor), (kept.double() * mean_norm / kept.double().norm()).flatten())


def test_odd_model_counts_give_the_same_bits_with_either_median_rule():
    for count in (3, 5):
        models = random_family(count, count)
        for median in ("coordinate", "geometric"):
            assert torch.equal(yoyo(models, median=median), yoyo(models, median=median, median_rule="standard"))


def test_two_models_with_the_standard_rule_are_the_equal_weight_karcher_mean():
    karcher = methods.karcher([A, B], weight=[1.0, 1.0], max_iter=10, tol=1e-5, compute="float32")
    close(yoyo([A, B], median_rule="standard"), karcher.flatten())


def test_two_models_with_the_lower_rule_are_still_order_free():
    x, y = random_family(7, 2)
    assert torch.equal(yoyo([x, y]), yoyo([y, x]))


def test_zero_models_give_zeros_and_a_zero_model_is_a_point_at_the_origin():
    z = torch.zeros(5, 3)
    assert torch.equal(yoyo([z, z.clone(), z.clone()]), z)
    assert torch.equal(yoyo([torch.zeros(4), torch.ones(4)]), torch.zeros(4))


def test_empty_tensors_give_an_empty_tensor():
    out = yoyo([torch.zeros(0, 4), torch.zeros(0, 4)])
    assert out.shape == (0, 4)


def test_results_are_deterministic():
    models = random_family(8, 3, shape=(300, 17))
    assert torch.equal(yoyo(models, median="geometric"), yoyo(models, median="geometric"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_agrees_with_cpu():
    models = random_family(9, 4, shape=(512, 300))
    for options in ({}, {"median": "geometric"}, {"anchor": 2}):
        gpu = yoyo([m.cuda() for m in models], **options)
        close(gpu.cpu(), yoyo(models, **options).flatten())


# ---------------------------------------------------------------------------------------------------
# the command line on Hugging Face folders


EXTRA_FILES = ("tokenizer.json", "tokenizer.model", "merges.txt", "generation_config.json")


def hf_family(tmp_path, count=3, dtype=torch.float32):
    """Sharded folders whose config, tokenizer files and integer tensors differ from model to model."""
    folders, states = [], []
    for i in range(count):
        state = llama_like(i, dtype)
        state["position_ids"] = state["position_ids"] + 100 * i
        state["mask"] = torch.tensor([i % 2 == 0, True, False])
        folder = save_sharded(tmp_path / f"model{i + 1}", state, config={"model_type": "llama", "name": f"m{i + 1}",
                                                                          "torch_dtype": str(dtype).split(".")[1]})
        for file_name in EXTRA_FILES:
            (folder / file_name).write_text(f"{file_name} of model {i + 1}")
        folders.append(folder)
        states.append(state)
    return folders, states


def test_cli_merges_sharded_folders_in_bfloat16_with_the_config_from_models_files(tmp_path, run):
    folders, states = hf_family(tmp_path)
    code, _, err = run("--method", "yoyo-fusion", "--models", *folders, "--config-from", "2", "--median", "geometric",
                       "--output", f"{tmp_path}/out/", "--shard-size", "1KB")
    assert code == 0, err
    out_folder = tmp_path / "out"
    out = load(out_folder)
    assert len(list(out_folder.glob("model-*.safetensors"))) > 1
    for name, value in states[1].items():
        if not value.is_floating_point():
            assert torch.equal(out[name], value), name  # copied from --config-from 2
            continue
        expected = yoyo([s[name] for s in states], median="geometric", config_from=2)
        assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected.to(torch.bfloat16)), name
    config = json.loads((out_folder / "config.json").read_text())
    assert config["name"] == "m2" and config["torch_dtype"] == "bfloat16"
    for file_name in EXTRA_FILES:
        assert (out_folder / file_name).read_text() == f"{file_name} of model 2"
    shard = next(out_folder.glob("model-*.safetensors"))
    recipe = json.loads(metadata(shard)["merge_recipe"])
    assert recipe["merge_method"] == "yoyo_fusion"
    assert recipe["parameters"] == {"anchor": 0, "median": "geometric", "k_minus_one": True, "config_from": 2,
                                    "median_rule": "lower"}


def test_cli_options_reach_the_method_and_dtype_float32_keeps_its_result(tmp_path, run):
    folders, states = hf_family(tmp_path, count=4)
    code, _, err = run("--method", "yoyo_fusion", "--models", *folders, "--median", "geometric", "--median-rule",
                       "standard", "--no-k-minus-one", "--dtype", "float32", "--output", tmp_path / "out.safetensors")
    assert code == 0, err
    out = load(tmp_path / "out.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    expected = yoyo([s[name] for s in states], median="geometric", median_rule="standard", k_minus_one=False)
    assert torch.equal(out[name], expected)
    assert torch.equal(out["position_ids"], states[0]["position_ids"])  # --config-from defaults to model 1


def test_float64_models_are_merged_in_float32_as_the_reference_does(tmp_path, run):
    folders, states = hf_family(tmp_path, count=3, dtype=torch.float64)
    code, _, err = run("--method", "yoyo_fusion", "--models", *folders, "--output", tmp_path / "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    name = "model.embed_tokens.weight"
    expected = yoyo([s[name].float() for s in states])
    assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected.to(torch.bfloat16))


def test_two_models_with_an_anchor_warn_once(tmp_path, run):
    folders, _ = hf_family(tmp_path, count=2)
    code, _, err = run("--method", "yoyo_fusion", "--models", *folders, "--anchor", "2", "--median", "geometric",
                       "--output", tmp_path / "o.safetensors", "--quiet")
    assert code == 0, err
    lines = err.splitlines()
    assert lines == [
        "warning: yoyo_fusion: --anchor 2 with 2 models merges nothing: the other model's residual gets weight 0, "
        "so the output is model 2's direction at the mean norm of the two",
        "warning: yoyo_fusion: --median and --median-rule are ignored with --anchor (the anchor model is the centre)",
    ]


@pytest.mark.parametrize("args, message", [
    (["--anchor", "4"], "yoyo_fusion: --anchor must be 0 (none) or 1..3 (got 4)"),
    (["--anchor", "-1"], "yoyo_fusion: --anchor must be 0 (none) or 1..3 (got -1)"),
    (["--config-from", "0"], "yoyo_fusion: --config-from must be 1..3 (got 0)"),
    (["--config-from", "4"], "yoyo_fusion: --config-from must be 1..3 (got 4)"),
    (["--base", "BASE"], "yoyo_fusion takes no --base; use --anchor to pick a reference model"),
    (["--weights", "1", "2", "3"], "--weights is not used by yoyo_fusion"),
])
def test_bad_options_exit_2_with_one_error_line(tmp_path, run, args, message):
    folders, _ = hf_family(tmp_path)
    args = [str(folders[0]) if a == "BASE" else a for a in args]
    code, out, err = run("--method", "yoyo_fusion", "--models", *folders, *args, "--output", f"{tmp_path}/o/")
    assert code == 2 and out == ""
    assert err.splitlines() == [f"error: {message}"]
    assert not (tmp_path / "o").exists()


def test_one_model_is_refused(tmp_path, run):
    folders, _ = hf_family(tmp_path, count=1)
    code, _, err = run("--method", "yoyo_fusion", "--models", *folders, "--output", f"{tmp_path}/o/")
    assert code == 2
    assert err.splitlines() == [f"error: yoyo_fusion needs at least 2 models, found 1 ({folders[0]}); "
                                "use --method passthrough to copy one"]
