"""mergekit YAML recipes: keys, parameter settings (gradients, filters, levels), slices, reproduction."""

import json

import pytest
import torch
import yaml

import merge
from conftest import llama_like, load, metadata, save_safetensors, save_sharded, tree_hash


def write(tmp_path, recipe: dict | str, name="recipe.yml"):
    path = tmp_path / name
    path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


@pytest.fixture
def folders(tmp_path):
    """Three 4-layer Llama-shaped Hugging Face folders in the working directory."""
    return [save_sharded(tmp_path / f"m{i}", llama_like(i, layers=4),
                         config={"model_type": "llama", "num_hidden_layers": 4, "torch_dtype": "float32"})
            for i in range(3)]


def weighted(states, weights, name):
    return sum(w * s[name] for w, s in zip(weights, states)) / sum(weights)


def test_a_models_recipe_gives_the_same_bits_as_the_same_merge_on_the_command_line(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "linear", "models": [
        {"model": "m0", "parameters": {"weight": 0.5}}, {"model": "m1", "parameters": {"weight": 0.3}},
        {"model": "m2", "parameters": {"weight": 0.2}}], "dtype": "float32"})
    code, _, err = run("--config", recipe, "--output", "a.safetensors")
    assert code == 0, err
    code, _, err = run("--method", "linear", "--models", "m0", "m1", "m2", "--weights", "0.5", "0.3", "0.2",
                       "--compute-dtype", "float32", "--output", "b.safetensors")
    assert code == 0, err
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("setting, expected", [
    ([0, 0.5, 0.3, 0.7, 1], [0, 0.1818182, 0.3636364, 0.4818182, 0.4090909, 0.3363636, 0.3727273, 0.5181818,
                             0.6636364, 0.7818182, 0.8909091, 1]),
])
def test_numeric_gradients_interpolate_across_twelve_layers(setting, expected):
    values = [merge.evaluate(setting, f"model.layers.{k}.mlp.up_proj.weight", k / 11) for k in range(12)]
    assert values == pytest.approx(expected, abs=1e-7)


def test_filters_pick_the_first_matching_entry_and_off_layer_tensors_take_the_first_value():
    setting = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
               {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]}, {"value": 0.5}]
    t = 3 / 11
    assert merge.evaluate(setting, "model.layers.3.self_attn.o_proj.weight", t) == pytest.approx(0.4818182)
    assert merge.evaluate(setting, "model.layers.3.mlp.up_proj.weight", t) == pytest.approx(0.5181818)
    assert merge.evaluate(setting, "model.layers.3.input_layernorm.weight", t) == 0.5
    counts = merge.layer_counts([f"model.layers.{k}.x" for k in range(12)])
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert merge.layer_position(name, counts) == 0.0
        assert merge.evaluate([1.0, 0.0], name, 0.0) == 1.0
    assert merge.evaluate([True, False, True], "x", 0.6) is False
    assert merge.evaluate([0.2], "x", 0.7) == 0.2
    assert merge.evaluate([{"filter": "attn", "value": 1}], "mlp", 0.0) is merge.UNSET


def test_per_model_filters_and_top_level_weights_reach_the_right_tensors(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "linear", "parameters": {"weight": 1.0, "normalize": False},
                              "models": [{"model": "m0"},
                                         {"model": "m1", "parameters": {"weight": [{"filter": "mlp", "value": 0.0},
                                                                                   {"value": 2.0}]}}]})
    code, _, err = run("--config", recipe, "--output", "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    s0, s1 = llama_like(0, layers=4), llama_like(1, layers=4)
    mlp = "model.layers.2.mlp.up_proj.weight"
    attn = "model.layers.2.self_attn.q_proj.weight"
    assert torch.equal(out[mlp], s0[mlp])
    assert torch.allclose(out[attn], s0[attn] + 2 * s1[attn], atol=1e-6)


def test_a_gradient_on_the_command_line_varies_by_layer(tmp_path, folders, run):
    code, _, err = run("--method", "ema", "--models", "m0", "m1", "--alpha", "0", "1", "--output", "g.safetensors")
    assert code == 2 and "--alpha must be > 0" in err  # every anchor is checked
    code, _, err = run("--method", "ema", "--models", "m0", "m1", "--alpha", "0.25", "1", "--output", "g.safetensors")
    assert code == 0, err
    out = load(tmp_path / "g.safetensors")
    s0, s1 = llama_like(0, layers=4), llama_like(1, layers=4)
    for k, alpha in enumerate([0.25, 0.5, 0.75, 1.0]):
        name = f"model.layers.{k}.mlp.up_proj.weight"
        assert torch.allclose(out[name], (1 - alpha) * s0[name] + alpha * s1[name], atol=1e-6), k
    assert torch.allclose(out["model.norm.weight"], 0.75 * s0["model.norm.weight"] + 0.25 * s1["model.norm.weight"])


def test_scientific_notation_strings_are_numbers_as_mergekit_reads_them(tmp_path, folders, run):
    recipe = write(tmp_path, "merge_method: karcher\nmodels:\n  - model: m0\n  - model: m1\n"
                             "parameters:\n  tol: 1e-5\n  max_iter: 3\n")
    code, _, err = run("--config", recipe, "--output", "k.safetensors")
    assert code == 0, err
    assert json.loads(metadata(tmp_path / "k.safetensors")["merge_recipe"])["parameters"]["tol"] == 1e-5


def test_recipe_problems_are_all_reported_before_anything_is_read(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "linear", "models": [
        {"model": "m0", "parameters": {"weight": 1, "normalize": True}},
        {"model": "missing_folder", "parameters": {"wieght": 1}},
        {"model": "org/hub-model"}], "parameters": {"density": 0.5}, "foo": 1})
    code, out, err = run("--config", recipe, "--output", "o.safetensors")
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert all(line.startswith("error: ") for line in lines)
    text = "\n".join(lines)
    assert "unknown recipe key foo" in text
    assert "normalize is shared by all models; move it to parameters:" in text
    assert "unknown parameter wieght (did you mean weight?)" in text
    assert "unknown parameter density" in text and "linear takes normalize, weight" in text
    assert "org/hub-model: not found here" in text and "never downloads" in text
    assert not (tmp_path / "o.safetensors").exists()


def test_allow_unknown_keys_turns_unknown_keys_into_warnings(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "sma", "models": [{"model": "m0"}, {"model": "m1"}], "notes": "x"})
    code, _, err = run("--config", recipe, "--output", "o.safetensors", "--allow-unknown-keys")
    assert code == 0 and "warning: recipe key notes is not used" in err


@pytest.mark.parametrize("recipe, message", [
    ({"models": [{"model": "m0"}]}, "the recipe needs merge_method"),
    ({"merge_method": "lineer", "models": [{"model": "m0"}]}, "did you mean 'linear'?"),
    ({"merge_method": "sma", "models": [{"model": "m0"}], "slices": []}, "exactly one of models: and slices:"),
    ({"merge_method": "sma", "models": [{"model": "m0"}, {"model": "m1"}], "dtype": "float8"}, "dtype: 'float8'"),
    ({"merge_method": "sma", "models": [{"model": "m0"}, {"model": "m0"}]}, "the same model is given twice"),
    ({"merge_method": "linear", "models": [{"model": "m0"}, {"model": "m1", "parameters": {"weight": 1}}]},
     "linear: missing required parameter weight for m0"),
    ({"merge_method": "ema", "models": [{"model": "m0"}, {"model": "m1"}], "parameters": {"alpha": "high"}},
     "alpha: must be a number (got 'high')"),
    ({"merge_method": "ema", "models": [{"model": "m0"}, {"model": "m1"}], "parameters": {"alpha": 2}},
     "ema: alpha must be > 0 and <= 1 (got 2)"),
    ({"merge_method": "sma", "models": [{"model": "m0"}, {"model": "m1"}], "modules": {}},
     "recipe key modules is not supported"),
    ({"merge_method": "sma", "models": [{"model": "m0"}, {"model": "m1"}], "tokenizer_source": "union",
      "tokenizer": {"source": "base"}}, "give tokenizer_source: or tokenizer:, not both"),
    ({"merge_method": "sma", "models": [{"model": "m0"}, {"model": "m1"}], "tokenizer": {"pad_to_multiple_of": 0}},
     "pad_to_multiple_of must be a positive integer"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m0", "layer_range": [0, 9]}]}]},
     "past the depth of m0 (4 layers)"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "m0", "layer_range": [2, 1]}]}]},
     "layer_range must be [start, end)"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "m0", "layer_range": [0, 2]},
                                                        {"model": "m1", "layer_range": [0, 3]}]}],
      "parameters": {"weight": 1}}, "every source must span the same number of layers"),
    ({"merge_method": "sma", "models": [{"model": "m0@main"}, {"model": "m1"}]}, "revisions (@)"),
])
def test_bad_recipes_exit_2_naming_the_problem(tmp_path, folders, run, recipe, message):
    before = tree_hash(*folders)
    code, _, err = run("--config", write(tmp_path, recipe), "--output", "o.safetensors")
    assert code == 2
    assert message in err, err
    assert all(line.startswith("error: ") for line in err.strip().splitlines())
    assert not (tmp_path / "o.safetensors").exists()
    assert tree_hash(*folders) == before


def test_config_cannot_be_combined_with_method_models_or_base(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "sma", "models": [{"model": "m0"}, {"model": "m1"}]})
    code, _, err = run("--config", recipe, "--method", "ema", "--output", "o.safetensors")
    assert code == 2 and "--method cannot be combined with --config" in err


def test_a_flag_replaces_every_setting_of_its_parameter_in_the_recipe(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "linear", "parameters": {"weight": [{"filter": "mlp", "value": 5}]},
                              "models": [{"model": "m0", "parameters": {"weight": 9}}, {"model": "m1"}]})
    code, _, err = run("--config", recipe, "--weights", "0.25", "0.75", "--output", "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    states = [llama_like(i, layers=4) for i in range(2)]
    for name in ("model.layers.1.mlp.up_proj.weight", "model.norm.weight"):
        assert torch.allclose(out[name], weighted(states, [0.25, 0.75], name), atol=1e-6)


def test_print_config_writes_the_resolved_recipe_and_it_reproduces_the_merge(tmp_path, folders, run):
    code, out, err = run("--method", "wma", "--models", "m0", "m1", "m2", "--print-config", "--output", "w.safetensors")
    assert code == 0, err
    assert not (tmp_path / "w.safetensors").exists()
    recipe = yaml.safe_load(out)
    assert recipe["merge_method"] == "wma"
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [3, 2, 1]
    (tmp_path / "resolved.yml").write_text(out)
    assert run("--config", "resolved.yml", "--output", "a.safetensors")[0] == 0
    assert run("--method", "wma", "--models", "m0", "m1", "m2", "--output", "b.safetensors")[0] == 0
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_config_on_an_output_repeats_its_merge(tmp_path, folders, run):
    assert run("--method", "karcher", "--models", "m0", "m1", "--alphas", "0.3", "0.7", "--output", "k/")[0] == 0
    code, _, err = run("--config", "k/", "--output", "again.safetensors")
    assert code == 0, err
    a, b = load(tmp_path / "k"), load(tmp_path / "again.safetensors")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


def qwen2_folder(path, seed, layers=4):
    state = llama_like(seed, layers=layers)
    config = {"model_type": "qwen2", "num_hidden_layers": layers, "torch_dtype": "float32",
              "layer_types": [f"attention_{k}" for k in range(layers)], "max_window_layers": layers}
    return save_sharded(path, state, config=config)


def test_passthrough_slices_stack_layers_renumbered_with_the_config_made_consistent(tmp_path, run):
    qwen2_folder(tmp_path / "a", 0)
    qwen2_folder(tmp_path / "b", 1)
    recipe = write(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 3]}]},
        {"sources": [{"model": "b", "layer_range": [1, 4],
                      "parameters": {"scale": [{"filter": "q_proj", "value": 0.5}]}}]}]})
    code, _, err = run("--config", recipe, "--output", "frank/")
    assert code == 0, err
    out = load(tmp_path / "frank")
    a, b = llama_like(0, layers=4), llama_like(1, layers=4)
    layer_names = sorted({n.split(".", 3)[3] for n in a if n.startswith("model.layers.0.")})
    sources = [(a, 0), (a, 1), (a, 2), (b, 1), (b, 2), (b, 3)]
    for k, (state, source) in enumerate(sources):
        for suffix in layer_names:
            expected = state[f"model.layers.{source}.{suffix}"]
            if state is b and "q_proj" in suffix:
                expected = expected * 0.5
            assert torch.equal(out[f"model.layers.{k}.{suffix}"], expected), (k, suffix)
    assert not any(n.startswith("model.layers.6.") for n in out)
    assert torch.equal(out["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(out["model.norm.weight"], b["model.norm.weight"])
    assert torch.equal(out["lm_head.weight"], b["lm_head.weight"])
    config = json.loads((tmp_path / "frank" / "config.json").read_text())
    assert config["num_hidden_layers"] == 6
    assert config["layer_types"] == [f"attention_{k}" for k in (0, 1, 2, 1, 2, 3)]
    recipe_back = json.loads(metadata(tmp_path / "frank" / "model.safetensors")["merge_recipe"])
    assert recipe_back["slices"][1]["sources"][0]["layer_range"] == [1, 4]


def test_repeated_layers_are_written_as_separate_tensors(tmp_path, run):
    qwen2_folder(tmp_path / "a", 0)
    recipe = write(tmp_path, {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "a", "layer_range": [0, 2]}]}, {"sources": [{"model": "a", "layer_range": [1, 3]}]}]})
    code, _, err = run("--config", recipe, "--output", "rep.safetensors")
    assert code == 0, err
    out = load(tmp_path / "rep.safetensors")
    assert torch.equal(out["model.layers.1.mlp.up_proj.weight"], out["model.layers.2.mlp.up_proj.weight"])


def test_slices_merge_their_sources_with_the_method_and_restart_t_in_each_slice(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "ema", "parameters": {"alpha": [0.2, 0.8]}, "slices": [
        {"sources": [{"model": "m0", "layer_range": [0, 2]}, {"model": "m1", "layer_range": [0, 2]}]},
        {"sources": [{"model": "m0", "layer_range": [2, 4]}, {"model": "m1", "layer_range": [2, 4]}]}]})
    code, _, err = run("--config", recipe, "--output", "s.safetensors")
    assert code == 0, err
    out = load(tmp_path / "s.safetensors")
    s0, s1 = llama_like(0, layers=4), llama_like(1, layers=4)
    for k, alpha in enumerate([0.2, 0.8, 0.2, 0.8]):
        name = f"model.layers.{k}.self_attn.q_proj.weight"
        assert torch.allclose(out[name], (1 - alpha) * s0[name] + alpha * s1[name], atol=1e-6), k


def test_a_tied_model_lends_its_embedding_to_the_head_the_others_have(tmp_path, run):
    untied = llama_like(0)
    tied = llama_like(1)
    del tied["lm_head.weight"]
    save_safetensors(tmp_path / "u.safetensors", untied)
    save_safetensors(tmp_path / "t.safetensors", tied)
    code, _, err = run("--method", "sma", "--models", "u.safetensors", "t.safetensors", "--output", "o.safetensors")
    assert code == 0, err
    assert "has no lm_head.weight (tied embeddings)" in err
    out = load(tmp_path / "o.safetensors")
    expected = (untied["lm_head.weight"] + tied["model.embed_tokens.weight"]) / 2
    assert torch.allclose(out["lm_head.weight"], expected, atol=1e-7)
    del untied["lm_head.weight"]
    save_safetensors(tmp_path / "u2.safetensors", untied)
    code, _, err = run("--method", "sma", "--models", "u2.safetensors", "t.safetensors", "--output", "tied.safetensors")
    assert code == 0 and "lm_head.weight" not in load(tmp_path / "tied.safetensors")


def test_different_vocabulary_sizes_are_an_error_unless_truncation_is_asked_for(tmp_path, run):
    small = llama_like(0, vocab=16)
    large = llama_like(1, vocab=20)
    save_sharded(tmp_path / "s", small, config={"model_type": "llama", "vocab_size": 16})
    save_sharded(tmp_path / "l", large, config={"model_type": "llama", "vocab_size": 20})
    code, _, err = run("--method", "sma", "--models", "l", "s", "--output", "o/")
    assert code == 2
    assert "tensor model.embed_tokens.weight has different vocabulary sizes" in err
    assert "--unsafe-truncate-embeddings" in err
    code, _, err = run("--method", "sma", "--models", "l", "s", "--output", "o/", "--unsafe-truncate-embeddings")
    assert code == 0, err
    assert "vocabulary truncated to the first 16 rows" in err
    out = load(tmp_path / "o")
    assert out["model.embed_tokens.weight"].shape == (16, 8)
    expected = (large["model.embed_tokens.weight"][:16] + small["model.embed_tokens.weight"]) / 2
    assert torch.allclose(out["model.embed_tokens.weight"], expected, atol=1e-7)
    assert json.loads((tmp_path / "o" / "config.json").read_text())["vocab_size"] == 16


def test_other_shape_mismatches_stay_errors_even_with_truncation(tmp_path, run):
    a = llama_like(0)
    b = llama_like(1)
    b["model.layers.0.mlp.up_proj.weight"] = torch.zeros(4, 8)
    save_safetensors(tmp_path / "a.safetensors", a)
    save_safetensors(tmp_path / "b.safetensors", b)
    code, _, err = run("--method", "sma", "--models", "a.safetensors", "b.safetensors", "--unsafe-truncate-embeddings",
                       "--output", "o.safetensors")
    assert code == 2 and "tensor model.layers.0.mlp.up_proj.weight has different shapes" in err


def test_an_unlisted_base_of_a_method_without_base_becomes_an_input_as_in_mergekit(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "linear", "base_model": "m2", "parameters": {"weight": 1.0},
                              "models": [{"model": "m0"}, {"model": "m1"}]})
    code, _, err = run("--config", recipe, "--output", "o.safetensors")
    assert code == 0, err
    assert "base_model m2 is merged as one more input" in err
    out = load(tmp_path / "o.safetensors")
    states = [llama_like(i, layers=4) for i in range(3)]
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.allclose(out[name], weighted(states, [1, 1, 1], name), atol=1e-6)


def test_recipe_dtypes_set_the_compute_and_output_dtypes(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "sma", "models": [{"model": "m0"}, {"model": "m1"}],
                              "dtype": "bfloat16", "out_dtype": "float16"})
    code, _, err = run("--config", recipe, "--output", "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    s0, s1 = llama_like(0, layers=4), llama_like(1, layers=4)
    name = "model.norm.weight"
    expected = ((s0[name].bfloat16().float() + s1[name].bfloat16().float()).bfloat16().float() / 2)
    assert out[name].dtype == torch.float16
    assert torch.allclose(out[name].float(), expected, atol=2e-3)


def test_a_karcher_recipe_means_mergekits_karcher_and_its_weights_are_ignored_with_a_warning(tmp_path, folders, run):
    recipe = write(tmp_path, {"merge_method": "karcher", "base_model": "m2",
                              "models": [{"model": "m0", "parameters": {"weight": 0.9}}, {"model": "m1"}]})
    code, _, err = run("--config", recipe, "--output", "a.safetensors")
    assert code == 0, err
    assert "weight is ignored: mergekit's karcher weighs every input equally" in err
    code, _, err = run("--method", "karcher", "--models", "m0", "m1", "m2", "--output", "b.safetensors")
    assert code == 0, err
    a, b = load(tmp_path / "a.safetensors"), load(tmp_path / "b.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)  # equal weights over the models and the base
    assert json.loads(metadata(tmp_path / "a.safetensors")["merge_recipe"])["base_model"] == "m2"


def test_recipe_dtype_is_a_load_cast_so_linear_still_accumulates_in_float32(tmp_path, run):
    """mergekit's `dtype: bfloat16` rounds every input to bfloat16, then linear sums in float32 (§1.6)."""
    g = torch.Generator().manual_seed(5)
    states = [{"w": torch.randn(64, generator=g)} for _ in range(3)]
    for i, s in enumerate(states):
        save_safetensors(tmp_path / f"x{i}.safetensors", s)
    recipe = write(tmp_path, {"merge_method": "linear", "dtype": "bfloat16", "parameters": {"weight": 1.0},
                              "models": [{"model": f"x{i}.safetensors"} for i in range(3)]})
    code, _, err = run("--config", recipe, "--output", "o.safetensors")
    assert code == 0, err
    rounded = [s["w"].bfloat16().float() for s in states]
    expected = (sum(rounded) / 3).bfloat16()
    assert torch.equal(load(tmp_path / "o.safetensors")["w"], expected)
