"""mergekit's geometric methods: slerp, nuslerp, multislerp, karcher (mergekit's variant), model_stock,
nearswap and arcee_fusion.

The spec's golden values (mergekit-methods.md §4) and properties, the command line end to end on tiny
Llama-, Mistral- and Qwen2-shaped models, and mergekit 0.1.5 itself, run in a subprocess with its own
interpreter (MERGEKIT_PYTHON, default /work/mkvenv/bin/python; those tests skip when it is absent).
"""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import methods
from conftest import load, metadata, save_bin, save_sharded

A = torch.tensor([1.0, 2, 3, 4])
B = torch.tensor([2.0, -1, 0.5, 3])
C = torch.tensor([-1.0, 1, 2, -2])
D = torch.tensor([0.4, 0.45, -0.5, 1.1])
Z = torch.zeros(4)
X = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
Y = torch.tensor([[3.0, -1, 2], [0, 1, -2]])
W = [0.5, 0.3, 0.2]


def slerp(base, other, t):
    return methods.slerp([other], t=t, base=base)


def nuslerp(models, weights, base=None, flatten=True, row_wise=False):
    return methods.nuslerp(models, weight=weights, nuslerp_flatten=flatten, nuslerp_row_wise=row_wise, base=base)


def multislerp(models, weights, base=None, normalize=True, eps=1e-8):
    return methods.multislerp(models, weight=weights, normalize_weights=normalize, eps=eps, base=base)


def karcher(inputs, max_iter=10, tol=1e-5):
    """mergekit's variant, over every input (the CLI appends the base last)."""
    return methods.karcher_mergekit(inputs, max_iter=max_iter, tol=tol)


def model_stock(base, models, filter_wise=False):
    return methods.model_stock(models, filter_wise=filter_wise, base=base)


def arcee(base, other, seed=0):
    return methods.arcee_fusion([other], base=base, generator=torch.Generator().manual_seed(seed))


def close(actual, expected, atol=1e-6):
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(actual.double().flatten(), expected.flatten(), atol=atol, rtol=0), actual.flatten().tolist()


# ---------------------------------------------------------------------------------------------------
# golden values: mergekit 0.1.5's outputs from the spec, float32, atol 1e-6


ROWS = [-0.052611362, -0.052611362, -0.14468125, -0.13152839]
GOLDEN = [
    ("slerp A B t0.3", lambda: slerp(A, B, 0.3), [1.4203972, 1.1577160, 2.4098053, 3.9985104]),
    ("slerp X Y t0.6", lambda: slerp(X, Y, 0.6), [3.0148363, 0.36655343, 3.3813899, 2.351141, 3.7479434, 1.9086773]),
    ("slerp lerp parallel", lambda: slerp(A, 2 * A, 0.3), [1.3, 2.6, 3.9, 5.2]),
    ("slerp lerp antipodal", lambda: slerp(A, -A, 0.3), [0.4, 0.8, 1.2, 1.6]),
    ("nuslerp X Y = slerp", lambda: nuslerp([X, Y], [0.4, 0.6]),
     [3.0148363, 0.36655343, 3.3813899, 2.351141, 3.7479434, 1.9086773]),
    ("nuslerp A B", lambda: nuslerp([A, B], [0.3, 0.7]), [1.8309473, -0.07393454, 1.3834299, 3.58796]),
    ("nuslerp base D", lambda: nuslerp([A, B], [0.3, 0.7], base=D), [1.8415157, -0.11635607, 1.505451, 3.5849524]),
    ("nuslerp orthogonal", lambda: nuslerp([torch.tensor([1.0, 0]), torch.tensor([0.0, 1])], [1, 1]),
     [0.70710677, 0.70710677]),
    ("nuslerp weights sum 0", lambda: nuslerp([A, B], [1, -1]), [1.6499821, 0.54999405, 1.9249791, 3.8499582]),
    ("nuslerp rows", lambda: nuslerp([X, Y], [0.4, 0.6], flatten=False),
     [2.5058069, 0.26060212, 2.7664092, 2.9936626, 4.7240343, 2.526582]),
    ("nuslerp columns", lambda: nuslerp([X, Y], [0.4, 0.6], flatten=False, row_wise=True),
     [2.7299461, 0.27787924, 4.0833292, 2.0855308, 3.1464741, 2.4318235]),
    ("multislerp equal = karcher", lambda: multislerp([A, B], [1, 1]), [1.8125347, 0.25504661, 1.730579, 3.8801165]),
    ("multislerp W", lambda: multislerp([A, B, C], W), [1.2105398, 1.0769323, 2.8491228, 3.0885615]),
    ("multislerp W base Z", lambda: multislerp([A, B, C], W, base=Z), [1.2105398, 1.0769323, 2.8491228, 3.0885615]),
    ("multislerp W base D", lambda: multislerp([A, B, C], W, base=D), [1.3336504, 0.71168733, 3.0050983, 3.1703711]),
    ("multislerp unnormalised", lambda: multislerp([A, B, C], [5, 3, 2], normalize=False),
     [12.105386, 10.769315, 28.491215, 30.885605]),
    ("multislerp one model", lambda: multislerp([A], [0.3], base=D), [1, 2, 3, 4]),
    ("karcher A B C", lambda: karcher([A, B, C]), [0.86419171, 1.0566931, 3.4394462, 1.852294]),
    ("karcher base A", lambda: karcher([B, C, A]), [0.86419171, 1.0566931, 3.4394462, 1.852294]),
    ("karcher max_iter 0", lambda: karcher([A, B, C], max_iter=0), [0.97106546, 1.0208502, 3.217521, 2.187844]),
    ("karcher zero input", lambda: karcher([torch.zeros(3), torch.full((3,), 2.0)]), [1, 1, 1]),
    ("karcher scalars", lambda: karcher([torch.tensor(1.0), torch.tensor(-3.0)]), [2.0]),
    ("model_stock base D", lambda: model_stock(D, [A, B, C]), [0.40451896, 0.45367163, -0.46045902, 1.1096028]),
    ("model_stock base Z", lambda: model_stock(Z, [A, B, C]), ROWS),
    ("model_stock singular", lambda: model_stock(torch.zeros(3), [torch.tensor([1.0, 2, 3]), -torch.tensor([1.0, 2, 3])]),
     [0, 0, 0]),
    ("model_stock filter_wise", lambda: model_stock(torch.zeros(2, 4), [torch.stack([A, B]), torch.stack([C, D]),
                                                                        torch.stack([B, A])], filter_wise=True),
     ROWS + [0.94736773, 0.40402448, 0.8359127, 2.2569644]),
    ("nearswap t1", lambda: methods.nearswap([B], t=1.0, base=A), [2, 0.99999988, 2, 3]),
    ("nearswap t0.5", lambda: methods.nearswap([B], t=0.5, base=A), [1.5, 1.5, 2.5, 3.5]),
    ("arcee nothing passes", lambda: arcee(A, B), [1, 2, 3, 4]),
    ("arcee rows", lambda: arcee(torch.zeros(2, 4), torch.tensor([[0.1, 0.2, 0.1, 3], [0.1, 0, 0.2, 0.1]])),
     [0, 0.2, 0, 3, 0, 0, 0, 0]),
]


@pytest.mark.parametrize("call, expected", [pytest.param(c, e, id=i) for i, c, e in GOLDEN])
def test_golden_values_match_mergekit_0_1_5(call, expected):
    out = call()
    assert out.dtype == torch.float32
    close(out, expected)


def test_arcee_threshold_is_median_plus_one_and_a_half_iqr_of_unsorted_quartiles():
    generator = torch.Generator()
    assert methods.outlier_threshold(torch.arange(12.0).flip(0), generator).item() == 14.0  # quartiles 2, 5, 8
    # The spec's worked case: |x - B| times each row's KL divergence, from the formula written out here.
    x, base = torch.tensor([[0.1, 0.2, 0.1, 3], [0.1, 0, 0.2, 0.1]]), torch.zeros(2, 4)
    p, q = x.softmax(-1) + 1e-8, base.softmax(-1) + 1e-8
    kl = (p * (p / q).log()).sum(-1, keepdim=True)
    close(kl, [0.81057191, 0.0024969343])
    close(methods.outlier_threshold((x - base).abs() * kl, generator), [0.12171063])


# ---------------------------------------------------------------------------------------------------
# properties


def random(*shape, seed=0, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def test_slerp_t0_gives_the_base_and_t1_the_other_model_exactly():
    base, other = random(30, 7, seed=1), random(30, 7, seed=2)
    assert torch.equal(slerp(base, other, 0.0), base)
    assert torch.equal(slerp(base, other, 1.0), other)


def test_slerp_warns_once_per_tensor_when_t_extrapolates():
    base, other = random(5, seed=1), random(5, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slerp(base, other, 1.0)
        slerp(base, other, 1.5)
    assert [w.message.kind for w in caught] == ["extrapolate"]


def test_nuslerp_swapping_the_models_with_their_weights_changes_nothing():
    a, b, base = random(8, 5, seed=1), random(8, 5, seed=2), random(8, 5, seed=3)
    for flatten in (True, False):
        assert torch.allclose(nuslerp([a, b], [0.2, 0.8], base, flatten), nuslerp([b, a], [0.8, 0.2], base, flatten),
                              atol=1e-6)


def test_nuslerp_row_wise_while_flattening_is_a_note_and_changes_nothing():
    a, b = random(8, 5, seed=1), random(8, 5, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert torch.equal(nuslerp([a, b], [1, 1], row_wise=True), nuslerp([a, b], [1, 1]))
    assert [w.message.kind for w in caught] == ["row-wise"]


def test_multislerp_with_two_equal_weights_is_karcher_of_the_two():
    a, b = random(40, seed=1), random(40, seed=2)
    assert torch.allclose(multislerp([a, b], [1, 1]), karcher([a, b]), atol=1e-6)


def test_multislerp_of_opposite_models_falls_back_to_the_line_for_two_and_fails_for_more():
    close(multislerp([A, -A], [1, 1]), [0, 0, 0, 0])
    base = torch.tensor([0.5, 0.25, -0.5, 1.0])  # exact in binary, so the task vectors are exactly opposite
    assert torch.equal(multislerp([base + A, base - A], [1, 1], base=base), base)
    with pytest.raises(ValueError, match="cancel out"):
        multislerp([A, -A, torch.zeros(4)], [1, 1, 1])


def test_karcher_with_a_base_equals_the_seed_variant_over_models_and_base_without_weights():
    a, b, c = random(6, 9, seed=1), random(6, 9, seed=2), random(6, 9, seed=3)
    seed_variant = methods.karcher([a, b, c], weight=[1.0, 1.0, 1.0], max_iter=10, tol=1e-5, compute="float32")
    assert torch.allclose(karcher([a, b, c]), seed_variant, atol=1e-6)


def test_model_stock_filter_wise_of_a_vector_is_the_plain_method():
    base, models = random(9, seed=1), [random(9, seed=s) for s in (2, 3, 4)]
    assert torch.equal(model_stock(base, models, filter_wise=True), model_stock(base, models))


def test_model_stock_of_identical_fine_tunes_is_that_fine_tune():
    base, tune = random(5, 4, seed=1), random(5, 4, seed=2)
    assert torch.allclose(model_stock(base, [tune, tune.clone(), tune.clone()]), tune, atol=1e-6)


def test_nearswap_takes_the_model_within_t_and_the_base_at_t_0():
    base, other = A, A + torch.tensor([0.05, -0.2, 3.0, 0.0])
    assert torch.equal(methods.nearswap([other], t=0.0, base=base), base)
    out = methods.nearswap([other], t=0.1, base=base)
    assert out[0] == other[0] and out[3] == other[3]
    close(out[1:3], [2.0 - 0.2 * 0.5, 3 + 3 * 0.1 / 3])


def test_arcee_of_identical_inputs_is_that_input_and_keeps_float32_for_bf16():
    x = random(6, 10, seed=3)
    assert torch.equal(arcee(x, x.clone()), x)
    out = arcee(random(6, 10, seed=4).bfloat16(), x.bfloat16())
    assert out.dtype == torch.float32  # mergekit's float32 mask promotes the sum; the CLI casts it


def test_arcee_samples_quartiles_beyond_a_million_elements_from_the_tensor_generator():
    base, other = random(1001, 1000, seed=1), random(1001, 1000, seed=2, scale=2)
    first = arcee(base, other, seed=5)
    assert torch.equal(first, arcee(base, other, seed=5))
    assert not torch.equal(first, arcee(base, other, seed=6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_results_do_not_depend_on_the_thread_count(dtype):
    base = random(300, 400, seed=1).to(dtype)
    tunes = [(base.float() + random(300, 400, seed=s, scale=0.1)).to(dtype) for s in (2, 3, 4)]
    calls = [
        lambda: slerp(base.float(), tunes[0].float(), 0.4),
        lambda: nuslerp(tunes[:2], [0.3, 0.7], base),
        lambda: multislerp(tunes, W, base),
        lambda: model_stock(base, tunes),
        lambda: arcee(base, tunes[0]),
    ]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [call() for call in calls]
        torch.set_num_threads(4)
        together = [call() for call in calls]
    finally:
        torch.set_num_threads(threads)
    for one, many in zip(alone, together):
        assert torch.equal(one, many)


# ---------------------------------------------------------------------------------------------------
# tiny model families: Llama (untied head), Mistral (grouped-query attention), Qwen2 (q/k/v biases, tied
# embeddings). base, a, b, c per family; a is sharded, b a .bin, the others single safetensors files.


LAYERS = 3
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
FAMILIES = [("llama", torch.float32), ("mistral", torch.bfloat16), ("qwen2", torch.bfloat16)]
EXTRA = "model.extra_scale"  # in no architecture table: mergekit drops it, we merge it like any shared tensor


def family_state(kind: str, seed: int, base: dict | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A model's tensors: the base's plus a small change, or, for the base, new ones."""
    hidden, inter, vocab, heads = 16, 32, 64, 4
    kv = 2 if kind == "mistral" else heads
    kv_width = kv * hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for k in range(LAYERS):
        p = f"model.layers.{k}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (hidden, hidden), f"{p}.self_attn.k_proj.weight": (kv_width, hidden),
                       f"{p}.self_attn.v_proj.weight": (kv_width, hidden), f"{p}.self_attn.o_proj.weight": (hidden, hidden),
                       f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
                       f"{p}.mlp.down_proj.weight": (hidden, inter), f"{p}.input_layernorm.weight": (hidden,),
                       f"{p}.post_attention_layernorm.weight": (hidden,)})
        if kind == "qwen2":
            shapes.update({f"{p}.self_attn.q_proj.bias": (hidden,), f"{p}.self_attn.k_proj.bias": (kv_width,),
                           f"{p}.self_attn.v_proj.bias": (kv_width,)})
    shapes["model.norm.weight"] = (hidden,)
    shapes[EXTRA] = (2,)
    if kind != "qwen2":
        shapes["lm_head.weight"] = (vocab, hidden)
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=g)
        state[name] = (noise * 0.1 if base is None else base[name].float() + noise * 0.02).to(dtype)
    return state


def family_config(kind: str, dtype: torch.dtype) -> dict:
    return {"architectures": [ARCHITECTURES[kind]], "model_type": kind, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": LAYERS, "num_attention_heads": 4, "num_key_value_heads": 2 if kind == "mistral" else 4,
            "vocab_size": 64, "rms_norm_eps": 1e-6, "max_position_embeddings": 128,
            "tie_word_embeddings": kind == "qwen2", "torch_dtype": str(dtype).removeprefix("torch.")}


def save_model(folder: Path, name: str, state: dict[str, torch.Tensor], config: dict) -> None:
    """a as two shards, b as a .bin, the others as one safetensors file; each with its config.json."""
    if name == "a":
        save_sharded(folder, state, shards=2, config=config)
        return
    folder.mkdir(parents=True)
    if name == "b":
        save_bin(folder / "pytorch_model.bin", state)
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{(kind, dtype): {"base": folder, "a": ..., "b": ..., "c": ...}}, and every model's tensors."""
    root = tmp_path_factory.mktemp("families")
    folders, states = {}, {}
    for kind, dtype in FAMILIES:
        config = family_config(kind, dtype)
        base = family_state(kind, 0, None, dtype)
        models = {"base": base, **{name: family_state(kind, i + 1, base, dtype) for i, name in enumerate("abc")}}
        folders[(kind, dtype)] = {name: root / kind / name for name in models}
        for name, state in models.items():
            save_model(root / kind / name, name, state, config)
            states[(kind, dtype, name)] = state
    return folders, states


def layer_t(name: str, gradient: list[float]) -> float:
    """The gradient's value for a tensor (spec §1.4): layer k of n at k / (n - 1), every other tensor at 0."""
    parts = name.split(".")
    t = int(parts[2]) / (LAYERS - 1) if parts[1] == "layers" else 0.0
    position = t * (len(gradient) - 1)
    low = int(position)
    high = min(low + 1, len(gradient) - 1)
    return (1 - (position - low)) * gradient[low] + (position - low) * gradient[high]


# method: (its flags, the models it takes besides the base, the expected tensor from name, base and models)
CLI_CASES = {
    "slerp": (["--t", "0", "0.3", "1"], "a",
              lambda name, base, ms: slerp(base.float(), ms[0].float(), layer_t(name, [0, 0.3, 1]))),
    "nuslerp": (["--weights", "0.3", "0.7", "--no-nuslerp-flatten"], "ab",
                lambda name, base, ms: nuslerp(ms, [0.3, 0.7], base, flatten=False)),
    "multislerp": (["--weights", "0.5", "0.3", "0.2"], "abc", lambda name, base, ms: multislerp(ms, W, base)),
    "karcher": ([], "ab", lambda name, base, ms: karcher([*ms, base])),
    "model_stock": (["--filter-wise"], "abc", lambda name, base, ms: model_stock(base, ms, filter_wise=True)),
    "nearswap": (["--t", "0.01"], "a", lambda name, base, ms: methods.nearswap(ms, t=0.01, base=base)),
    "arcee_fusion": (["--seed", "3"], "a", lambda name, base, ms: arcee(base, ms[0])),
}


@pytest.mark.parametrize("kind, dtype", FAMILIES, ids=[kind for kind, _ in FAMILIES])
@pytest.mark.parametrize("method", list(CLI_CASES))
def test_cli_merges_tiny_families_with_a_base_as_the_method_functions_do(families, run, tmp_path, method, kind, dtype):
    folders, states = families
    flags, names, expected_of = CLI_CASES[method]
    places = folders[(kind, dtype)]
    code, _, err = run("--method", method, "--base", places["base"], "--models", *(places[n] for n in names),
                       "--output", f"{tmp_path}/out/", "--quiet", *flags)
    assert code == 0, err
    out = load(tmp_path / "out")
    base = states[(kind, dtype, "base")]
    assert set(out) == set(base)
    for name, tensor in out.items():
        expected = expected_of(name, base[name], [states[(kind, dtype, n)][name] for n in names])
        assert tensor.dtype == dtype, name
        assert torch.equal(tensor, expected.to(dtype)), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["torch_dtype"] == str(dtype).removeprefix("torch.")
    recipe = json.loads(metadata(tmp_path / "out" / "model.safetensors")["merge_recipe"])
    assert recipe["merge_method"] == method
    assert recipe["base_model"] == str(places["base"])  # mergekit's karcher appends it as one more input
    assert [m["model"] for m in recipe["models"]] == [str(places[n]) for n in names]


def test_slerp_gradient_gives_the_base_off_layer_and_interpolates_by_layer(families, run, tmp_path):
    folders, states = families
    places = folders[("llama", torch.float32)]
    code, _, err = run("--method", "slerp", "--base", places["base"], "--models", places["a"], "--t", "0", "1",
                       "--output", tmp_path / "o.safetensors", "--quiet")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    base, other = states[("llama", torch.float32, "base")], states[("llama", torch.float32, "a")]
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "model.layers.0.mlp.up_proj.weight"):
        assert torch.equal(out[name], base[name]), name
    assert torch.equal(out["model.layers.2.mlp.up_proj.weight"], other["model.layers.2.mlp.up_proj.weight"])
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], slerp(base["model.layers.1.mlp.up_proj.weight"],
                                                                       other["model.layers.1.mlp.up_proj.weight"], 0.5))


def test_arcee_writes_the_input_dtype_by_default_and_float32_on_request(families, run, tmp_path):
    folders, states = families
    places = folders[("qwen2", torch.bfloat16)]
    for flags, dtype in (([], torch.bfloat16), (["--dtype", "float32"], torch.float32)):
        out_path = tmp_path / f"{dtype}.safetensors"
        code, _, err = run("--method", "arcee_fusion", "--base", places["base"], "--models", places["a"], "--seed", "1",
                           "--output", out_path, "--quiet", *flags)
        assert code == 0, err
        name = "model.layers.1.self_attn.q_proj.bias"
        expected = arcee(states[("qwen2", torch.bfloat16, "base")][name], states[("qwen2", torch.bfloat16, "a")][name])
        assert torch.equal(load(out_path)[name], expected.to(dtype))


# ---------------------------------------------------------------------------------------------------
# the command line: base policies, model counts, flags and the two karcher variants


@pytest.fixture
def llama(families):
    return families[0][("llama", torch.float32)]


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("method, models, flags, message", [
    ("slerp", "a", [], "slerp: --t is required"),
    ("nearswap", "a", [], "nearswap: --t is required"),
    ("nearswap", "a", ["--t", "-0.5"], "nearswap: --t must be >= 0 (got -0.5)"),
    ("slerp", "ab", ["--t", "0.5"], "slerp needs exactly 1 models, found 2"),
    ("arcee_fusion", "ab", [], "arcee_fusion needs exactly 1 models, found 2"),
    ("nuslerp", "abc", [], "nuslerp needs exactly 2 models, found 3"),
    ("model_stock", "a", [], "model_stock needs at least 2 models, found 1"),
    ("multislerp", "ab", ["--weights", "1", "-1"], "multislerp: --weights sum to 0 (use --no-normalize-weights"),
    ("multislerp", "ab", ["--eps", "0"], "multislerp: --eps must be > 0 (got 0)"),
    ("karcher", "ab", ["--alphas", "1", "2"],
     "karcher: --alphas cannot be combined with --base (list the base in --models to give it a weight)"),
    ("karcher", "ab", ["--karcher-compute", "native"], "karcher: --karcher-compute cannot be combined with --base"),
    ("slerp", "a", ["--t", "0.5", "--filter-wise"], "--filter-wise is not used by slerp"),
])
def test_cli_refuses_bad_parameters_and_counts_before_reading(llama, run, tmp_path, method, models, flags, message):
    code, _, err = run("--method", method, "--base", llama["base"], "--models", *(llama[n] for n in models),
                       "--output", tmp_path / "o.safetensors", *flags)
    assert code == 2
    assert message in one_error(err)
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.parametrize("method", ["slerp", "model_stock", "nearswap", "arcee_fusion"])
def test_methods_that_need_a_base_refuse_to_run_without_one(llama, run, tmp_path, method):
    code, _, err = run("--method", method, "--models", llama["a"], llama["b"], "--output", tmp_path / "o.safetensors")
    assert code == 2 and f"{method} needs a base model" in one_error(err)


def test_nuslerp_base_must_be_a_third_distinct_model(llama, run, tmp_path):
    code, _, err = run("--method", "nuslerp", "--base", llama["a"], "--models", llama["a"], llama["b"],
                       "--output", tmp_path / "o.safetensors")
    # the base listed among the models is the base, so one model is left to slerp
    assert code == 2 and "nuslerp needs exactly 2 models, found 1" in one_error(err)


def test_nuslerp_and_multislerp_run_without_a_base(families, run, tmp_path):
    folders, states = families
    places = folders[("mistral", torch.bfloat16)]
    code, _, err = run("--method", "nuslerp", "--models", places["a"], places["b"], "--output", tmp_path / "n.safetensors",
                       "--quiet")
    assert code == 0, err
    code, _, err = run("--method", "multislerp", "--models", places["a"], places["b"], places["c"],
                       "--output", tmp_path / "m.safetensors", "--quiet")
    assert code == 0, err
    name = "model.layers.2.self_attn.k_proj.weight"
    ms = [states[("mistral", torch.bfloat16, n)][name] for n in "abc"]
    assert torch.equal(load(tmp_path / "n.safetensors")[name], nuslerp(ms[:2], [0.5, 0.5]))
    assert torch.equal(load(tmp_path / "m.safetensors")[name], multislerp(ms, [1 / 3] * 3))


def test_karcher_without_base_keeps_the_seed_variant_and_with_base_takes_mergekits(families, run, tmp_path):
    folders, states = families
    places = folders[("mistral", torch.bfloat16)]
    name = "model.layers.0.self_attn.o_proj.weight"
    x = [states[("mistral", torch.bfloat16, n)][name] for n in ("a", "b", "base")]
    code, _, err = run("--method", "karcher", "--models", places["a"], places["b"], places["base"],
                       "--output", tmp_path / "seed.safetensors", "--quiet")
    assert code == 0, err
    seed = methods.karcher([t.float() for t in x], weight=[1.0] * 3, max_iter=10, tol=1e-5, compute="float32")
    assert torch.equal(load(tmp_path / "seed.safetensors")[name], seed.to(torch.bfloat16))
    code, _, err = run("--method", "karcher", "--base", places["base"], "--models", places["a"], places["b"],
                       "--karcher-tol", "0", "--output", tmp_path / "mk.safetensors", "--quiet")
    assert code == 0, err
    assert torch.equal(load(tmp_path / "mk.safetensors")[name], karcher(x, tol=0.0))
    # The base listed in --models as well is the same merge: it is one input either way.
    code, _, err = run("--method", "karcher", "--base", places["base"], "--models", places["a"], places["b"],
                       places["base"], "--karcher-tol", "0", "--output", tmp_path / "twice.safetensors", "--quiet")
    assert code == 0, err
    assert torch.equal(load(tmp_path / "twice.safetensors")[name], karcher(x, tol=0.0))


def test_slerp_outside_unit_interval_warns_once_for_the_whole_run(llama, run, tmp_path):
    code, _, err = run("--method", "slerp", "--base", llama["base"], "--models", llama["a"], "--t", "1.5",
                       "--output", tmp_path / "o.safetensors", "--quiet")
    assert code == 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "slerp extrapolates" in lines[0] and "more like it" in lines[0]


# ---------------------------------------------------------------------------------------------------
# mergekit 0.1.5 itself, in a subprocess


MERGEKIT_PYTHON = os.environ.get("MERGEKIT_PYTHON", "/work/mkvenv/bin/python")
ORACLE = Path(__file__).with_name("mergekit_oracle.py")


def differential_cases() -> list[tuple[str, dict, object]]:
    """(label, mergekit case, our result) on random tensors of both dtypes and several shapes, edge cases too."""
    cases = []

    def add(label, method, tensors, base_index, parameters, ours):
        cases.append((label, {"method": method, "tensors": tensors, "base_index": base_index, "parameters": parameters},
                      ours))

    for dtype in (torch.float32, torch.bfloat16):
        # (1100, 1000) has more than 2^20 elements (slerp's norm chunks), spans several of the 2^18-element
        # chunks the other methods build whole vectors with, and every one-output sum is split among
        # threads; the others are small, odd and 3-D.
        for seed, shape in enumerate([(7,), (33, 40), (4, 6, 5), (1100, 1000)]):
            large = len(shape) > 1 and shape[0] > 1000
            base = random(*shape, seed=10 * seed).to(dtype)
            a, b, c = ((base.float() + random(*shape, seed=10 * seed + i, scale=0.3)).to(dtype) for i in (1, 2, 3))
            tag = f"{str(dtype).removeprefix('torch.')} {shape}"
            # bf16 inputs as --compute-dtype bfloat16 gives them: slerp still computes in float32
            add(f"slerp {tag}", "slerp", [base, a], 0, {"t": 0.3}, slerp(base, a, 0.3).to(dtype))
            for flatten, row_wise in ((True, False), (False, False), (False, True)):
                parameters = {"weight": [0.3, 0.9], "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
                add(f"nuslerp {tag} {flatten} {row_wise}", "nuslerp", [a, b], None, parameters,
                    nuslerp([a, b], [0.3, 0.9], None, flatten, row_wise))
                add(f"nuslerp base {tag} {flatten} {row_wise}", "nuslerp", [base, a, b], 0, parameters,
                    nuslerp([a, b], [0.3, 0.9], base, flatten, row_wise))
            add(f"multislerp {tag}", "multislerp", [a, b, c], None, {"weight": W}, multislerp([a, b, c], W))
            add(f"multislerp base {tag}", "multislerp", [base, a, b, c], 0, {"weight": W, "normalize_weights": False},
                multislerp([a, b, c], W, base, normalize=False))
            for filter_wise in (False, True):
                add(f"model_stock {tag} {filter_wise}", "model_stock", [base, a, b, c], 0, {"filter_wise": filter_wise},
                    model_stock(base, [a, b, c], filter_wise))
            if large:  # the rest on the smaller shapes (beyond 10^6 elements arcee_fusion samples its quartiles,
                continue   # and mergekit draws from another generator)
            add(f"karcher {tag}", "karcher", [a, b, base], 2, {}, karcher([a, b, base]))
            add(f"nearswap {tag}", "nearswap", [base, a], 0, {"t": 0.2}, methods.nearswap([a], t=0.2, base=base))
            add(f"arcee_fusion {tag}", "arcee_fusion", [base, a], 0, {}, arcee(base, a))
    add("slerp parallel", "slerp", [A, 2 * A], 0, {"t": 0.7}, slerp(A, 2 * A, 0.7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", methods.MethodWarning)
        add("slerp extrapolates", "slerp", [A, B], 0, {"t": 1.5}, slerp(A, B, 1.5))
    add("nuslerp weights sum 0", "nuslerp", [A, B], None, {"weight": [1, -1]}, nuslerp([A, B], [1, -1]))
    add("multislerp opposite pair", "multislerp", [D, A, -A], 0, {"weight": [1, 1]}, multislerp([A, -A], [1, 1], D))
    try:
        multislerp([A, -A, Z], [1, 1, 1])
    except ValueError as err:
        add("multislerp cancels", "multislerp", [A, -A, Z], None, {"weight": [1, 1, 1]}, err)
    add("model_stock singular", "model_stock", [Z, A, -A], 0, {}, model_stock(Z, [A, -A]))
    add("arcee identical", "arcee_fusion", [A, A.clone()], 0, {}, arcee(A, A.clone()))
    return cases


def ulps(x: torch.Tensor, y: torch.Tensor) -> int:
    """Largest distance in units in the last place between two bf16 tensors of the same signs."""
    return int((x.view(torch.int16).int() - y.view(torch.int16).int()).abs().max()) if x.numel() else 0


RECIPES = {
    # name: (family, recipe, our CLI arguments); models are named as in the families fixture
    "slerp-llama": (("llama", torch.float32), {"merge_method": "slerp", "base_model": "base", "models": ["a"],
                                               "parameters": {"t": [0, 0.3, 1]}},
                    ["--method", "slerp", "--base", "base", "--models", "a", "--t", "0", "0.3", "1"]),
    "slerp-llama-dtype-bf16": (("llama", torch.float32),
                               {"merge_method": "slerp", "base_model": "base", "models": ["a"],
                                "parameters": {"t": [0, 0.3, 1]}, "dtype": "bfloat16"},
                               ["--method", "slerp", "--base", "base", "--models", "a", "--t", "0", "0.3", "1",
                                "--compute-dtype", "bfloat16"]),
    "nearswap-llama": (("llama", torch.float32), {"merge_method": "nearswap", "base_model": "base", "models": ["a"],
                                                  "parameters": {"t": 0.01}},
                       ["--method", "nearswap", "--base", "base", "--models", "a", "--t", "0.01"]),
    "arcee-llama": (("llama", torch.float32), {"merge_method": "arcee_fusion", "base_model": "base", "models": ["a"]},
                    ["--method", "arcee_fusion", "--base", "base", "--models", "a", "--seed", "1"]),
    "multislerp-mistral": (("mistral", torch.bfloat16),
                           {"merge_method": "multislerp", "base_model": "base", "models": ["a", "b"],
                            "weights": [0.6, 0.4]},
                           ["--method", "multislerp", "--base", "base", "--models", "a", "b", "--weights", "0.6", "0.4"]),
    "model_stock-mistral": (("mistral", torch.bfloat16),
                            {"merge_method": "model_stock", "base_model": "base", "models": ["a", "b", "c"]},
                            ["--method", "model_stock", "--base", "base", "--models", "a", "b", "c"]),
    "nuslerp-mistral": (("mistral", torch.bfloat16),
                        {"merge_method": "nuslerp", "base_model": "base", "models": ["a", "b"], "weights": [0.3, 0.7],
                         "parameters": {"nuslerp_flatten": False}},
                        ["--method", "nuslerp", "--base", "base", "--models", "a", "b", "--weights", "0.3", "0.7",
                         "--no-nuslerp-flatten"]),
    "karcher-qwen2": (("qwen2", torch.bfloat16), {"merge_method": "karcher", "base_model": "base", "models": ["a", "b"]},
                      ["--method", "karcher", "--base", "base", "--models", "a", "b"]),
    "slerp-qwen2": (("qwen2", torch.bfloat16), {"merge_method": "slerp", "base_model": "base", "models": ["a"],
                                                "parameters": {"t": [1, 0]}},
                    ["--method", "slerp", "--base", "base", "--models", "a", "--t", "1", "0"]),
}


def mergekit_recipe(recipe: dict, places: dict) -> dict:
    """A mergekit YAML document (JSON is YAML) with the families' folders for model names."""
    weights = recipe.get("weights")
    models = [{"model": str(places[n]), **({"parameters": {"weight": weights[i]}} if weights else {})}
              for i, n in enumerate(recipe["models"])]
    document = {"merge_method": recipe["merge_method"], "base_model": str(places[recipe["base_model"]]), "models": models}
    for key in ("parameters", "dtype"):
        if key in recipe:
            document[key] = recipe[key]
    return document


@pytest.fixture(scope="module")
def mergekit_runs(families, tmp_path_factory):
    """mergekit's results for differential_cases() and the recipes, from one subprocess (one import)."""
    if not Path(MERGEKIT_PYTHON).exists():
        pytest.skip(f"mergekit's interpreter {MERGEKIT_PYTHON} is absent (set MERGEKIT_PYTHON)")
    folders, _ = families
    work = tmp_path_factory.mktemp("mergekit")
    cases = differential_cases()
    torch.save([case for _, case, _ in cases], work / "cases.pt")
    jobs = []
    for name, (family, recipe, _) in RECIPES.items():
        (work / f"{name}.yml").write_text(json.dumps(mergekit_recipe(recipe, folders[family])))
        jobs += [str(work / f"{name}.yml"), str(work / name)]
    done = subprocess.run([MERGEKIT_PYTHON, str(ORACLE), str(work / "cases.pt"), str(work / "results.pt"), *jobs],
                          capture_output=True, text=True, cwd=work, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert done.returncode == 0, done.stderr[-3000:]
    return cases, torch.load(work / "results.pt"), work


def matches(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    """The spec's tolerance: float32 atol 1e-6, bf16 equal bits or 1 ulp."""
    if ours.dtype == torch.bfloat16:
        return ulps(ours, theirs) <= 1
    return torch.allclose(ours, theirs, atol=1e-6, rtol=0)


def test_methods_match_mergekit_on_fp32_and_bf16_tensors(mergekit_runs):
    cases, mergekit, _ = mergekit_runs
    # With the same torch, every kernel is the same and mergekit sums on one thread as we always do, so
    # the bits are equal. Karcher in float32 iterates in coefficient space (float64 scalars, thread-count
    # independent), so it meets the spec's float32 tolerance rather than mergekit's bits.
    same_torch = mergekit["torch"] == str(torch.__version__)
    for (label, _, ours), theirs in zip(cases, mergekit["results"]):
        if isinstance(ours, ValueError):
            assert isinstance(theirs, str) and theirs.startswith("ValueError"), label
            continue
        assert not isinstance(theirs, str), f"{label}: {theirs}"
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, label
        bits = same_torch and not (label.startswith("karcher") and ours.dtype in (torch.float32, torch.float64))
        assert torch.equal(ours, theirs) if bits else matches(ours, theirs), label


@pytest.mark.parametrize("name", list(RECIPES))
def test_cli_matches_mergekit_yaml_tensor_by_tensor(mergekit_runs, families, run, tmp_path, name):
    _, _, work = mergekit_runs
    folders, _ = families
    family, _, arguments = RECIPES[name]
    places = folders[family]
    arguments = [str(places[a]) if a in places else a for a in arguments]
    code, _, err = run(*arguments, "--output", f"{tmp_path}/ours/", "--quiet")
    assert code == 0, err
    ours, theirs = load(tmp_path / "ours"), load(work / name)
    # mergekit writes its architecture's tensors only (no lm_head for tied Qwen2, as we do).
    assert set(ours) - set(theirs) == {EXTRA}
    for key, tensor in theirs.items():
        assert tensor.dtype == ours[key].dtype and matches(ours[key], tensor), key
