"""How merge.py feeds declared methods: the base, per-tensor seeds, the matrix path and its fallback."""

import json

import pytest
import torch

import merge
import methods
from conftest import llama_like, load, metadata, save_safetensors


@pytest.fixture
def toy_methods(monkeypatch):
    """Three toy methods registered for one test only."""
    registry = dict(methods.REGISTRY)
    monkeypatch.setattr(methods, "REGISTRY", registry)

    @methods.method(name="toy_delta", summary="base + sum of deltas", paper="test", when="test",
                    base=methods.REQUIRED, output=methods.BASE)
    def toy_delta(models, *, base):
        return base + sum(m - base for m in models)

    @methods.method(name="toy_noise", summary="first model + noise", paper="test", when="test",
                    scope=methods.WHOLE, random=True)
    def toy_noise(models, *, generator):
        return models[0] + torch.rand(models[0].shape, generator=generator)

    def toy_fallback(models):
        return models[0] * 0

    @methods.method(name="toy_matrix", summary="transpose-sum on matrices", paper="test", when="test",
                    scope=methods.MATRIX, fallback=toy_fallback)
    def toy_matrix(models):
        return models[0] + 1

    return registry


def paths(tmp_path, count=3, dtype=torch.float32):
    return [save_safetensors(tmp_path / f"m{i}.safetensors", llama_like(i, dtype)) for i in range(count)]


def test_a_method_with_a_base_receives_it_and_the_base_donates_non_float_tensors(tmp_path, run, toy_methods):
    models = paths(tmp_path)
    base_state = llama_like(9, torch.bfloat16)
    base_state["position_ids"] = base_state["position_ids"] + 100
    base = save_safetensors(tmp_path / "base.safetensors", base_state)
    code, _, err = run("--method", "toy_delta", "--base", base, "--models", *models, "--output", "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    name = "model.layers.1.mlp.up_proj.weight"
    states = [llama_like(i) for i in range(3)]
    b = base_state[name].float()
    assert out[name].dtype == torch.bfloat16  # the output rule is the base's dtype
    assert torch.equal(out[name], (b + sum(s[name] - b for s in states)).to(torch.bfloat16))
    assert torch.equal(out["position_ids"], base_state["position_ids"])
    recipe = json.loads(metadata(tmp_path / "o.safetensors")["merge_recipe"])
    assert recipe["base_model"] == str(base)


def test_a_method_that_needs_a_base_refuses_to_run_without_one(tmp_path, run, toy_methods):
    code, _, err = run("--method", "toy_delta", "--models", *paths(tmp_path), "--output", "o.safetensors")
    assert code == 2 and "toy_delta needs a base model" in err


def test_a_base_also_listed_in_models_is_the_base_and_merged_once(tmp_path, run, toy_methods):
    models = paths(tmp_path)
    code, _, err = run("--method", "toy_delta", "--base", models[0], "--models", *models, "--output", "a.safetensors")
    assert code == 0, err
    code, _, err = run("--method", "toy_delta", "--base", models[0], "--models", *models[1:], "--output", "b.safetensors")
    assert code == 0, err
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_random_methods_repeat_under_a_seed_and_differ_across_seeds(tmp_path, run, toy_methods):
    models = paths(tmp_path, 1)
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        code, _, err = run("--method", "toy_noise", "--models", *models, "--seed", seed, "--output", f"{name}.safetensors")
        assert code == 0, err
    a, b, c = (load(tmp_path / f"{n}.safetensors") for n in "abc")
    name = "model.embed_tokens.weight"
    assert torch.equal(a[name], b[name]) and not torch.equal(a[name], c[name])
    assert json.loads(metadata(tmp_path / "a.safetensors")["merge_recipe"])["seed"] == 7
    # each tensor has its own stream: equal shapes do not get equal noise
    noise = [a[n] - llama_like(0)[n] for n in ("model.layers.0.self_attn.q_proj.weight",
                                                "model.layers.1.self_attn.q_proj.weight")]
    assert not torch.equal(noise[0], noise[1])


def test_an_unseeded_random_run_draws_a_seed_prints_and_stores_it(tmp_path, run, toy_methods):
    code, _, err = run("--method", "toy_noise", "--models", *paths(tmp_path, 1), "--output", "a.safetensors")
    assert code == 0, err
    seed = json.loads(metadata(tmp_path / "a.safetensors")["merge_recipe"])["seed"]
    assert f"seed: {seed}" in err
    code, _, err = run("--method", "toy_noise", "--models", *paths(tmp_path, 1), "--seed", seed, "--output", "b.safetensors")
    assert load(tmp_path / "a.safetensors")["lm_head.weight"].equal(load(tmp_path / "b.safetensors")["lm_head.weight"])


def test_a_seed_for_a_deterministic_method_is_ignored_with_a_warning(tmp_path, run):
    code, _, err = run("--method", "sma", "--models", *paths(tmp_path), "--seed", "3", "--output", "o.safetensors")
    assert code == 0 and "warning: --seed is ignored: sma is deterministic" in err
    assert "seed" not in json.loads(metadata(tmp_path / "o.safetensors")["merge_recipe"])


def test_tensor_seeds_depend_on_the_seed_and_the_name_only():
    assert merge.tensor_seed(1, "a") == merge.tensor_seed(1, "a")
    assert len({merge.tensor_seed(1, "a"), merge.tensor_seed(2, "a"), merge.tensor_seed(1, "b")}) == 3
    assert 0 <= merge.tensor_seed(12345, "x") < 2**63


def test_matrix_methods_take_2d_weights_and_fall_back_elsewhere(tmp_path, run, toy_methods):
    models = paths(tmp_path, 1)
    code, _, err = run("--method", "toy_matrix", "--models", *models, "--output", "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    state = llama_like(0)
    assert torch.equal(out["model.layers.0.mlp.up_proj.weight"], state["model.layers.0.mlp.up_proj.weight"] + 1)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "logit_scale"):
        assert torch.equal(out[name], torch.zeros_like(state[name])), name


def test_a_random_element_wise_method_is_refused_at_declaration():
    with pytest.raises(TypeError, match="chunking"):
        methods.method(name="bad", summary="", paper="", when="", random=True)(lambda models, *, generator: models[0])
