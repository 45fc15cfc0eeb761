"""The command line end to end: input forms, output layouts, metadata, errors and atomicity."""

import json
import os
from pathlib import Path

import pytest
import torch

import io_utils
import merge
import methods
from conftest import (llama_like, load, metadata, save_bin, save_safetensors, save_sharded, tree_hash)

FLOAT_NAMES = [n for n, t in llama_like(0).items() if t.is_floating_point()]


def expected_linear(states, weights):
    """Σ w_i x_i / Σ w_i in float32, per tensor; non-float tensors come from the first model."""
    total = sum(weights)
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            acc = sum(w * s[name].float() for w, s in zip(weights, states)) / total
            out[name] = acc.to(first.dtype)
        else:
            out[name] = first
    return out


def assert_same_tensors(actual, expected, atol=1e-6):
    assert set(actual) == set(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert actual[name].shape == value.shape, name
        if value.is_floating_point():
            assert torch.allclose(actual[name].float(), value.float(), atol=atol), name
        else:
            assert torch.equal(actual[name], value), name


def test_linear_merge_of_three_files_matches_the_weighted_average(three_models, run, tmp_path):
    code, out, err = run("--method", "linear", "--models", *three_models, "--weights", "0.5", "0.3", "0.2",
                         "--output", "merged.safetensors")
    assert code == 0, err
    assert out == ""
    states = [llama_like(i) for i in range(3)]
    assert_same_tensors(load(tmp_path / "merged.safetensors"), expected_linear(states, [0.5, 0.3, 0.2]))
    assert f"linear: merged {len(llama_like(0))} tensors from 3 models" in err


def test_every_input_form_gives_the_same_output(tmp_path, run):
    states = [llama_like(i) for i in range(3)]
    forms = {
        "files": [save_safetensors(tmp_path / "f" / f"m{i}.safetensors", s) for i, s in enumerate(states)],
        "sharded": [save_sharded(tmp_path / "s" / f"m{i}", s, shards=3) for i, s in enumerate(states)],
        "bin": [save_bin(tmp_path / "b" / f"m{i}.bin", s, wrap=i == 1) for i, s in enumerate(states)],
        "series": [tmp_path / "f"],
        "glob": [str(tmp_path / "b" / "m*.bin")],
    }
    outputs = {}
    for form, paths in forms.items():
        code, _, err = run("--method", "wma", "--models", *paths, "--output", tmp_path / f"{form}.safetensors")
        assert code == 0, (form, err)
        outputs[form] = load(tmp_path / f"{form}.safetensors")
    for form, tensors in outputs.items():
        assert set(tensors) == set(outputs["files"]), form
        for name, value in outputs["files"].items():
            assert torch.equal(tensors[name], value), (form, name)


def test_a_folder_of_checkpoints_merges_in_code_point_order_and_skips_hidden_files(tmp_path, run):
    folder = tmp_path / "runs"
    for i, name in enumerate(["m_2", "m_10", "M_1", ".hidden"]):
        save_safetensors(folder / f"{name}.safetensors", {"w": torch.full((3,), float(i))})
    code, _, err = run("--method", "ema", "--alpha", "0.5", "--models", folder, "--output", "ema.safetensors")
    assert code == 0, err
    assert "M_1.safetensors, m_10.safetensors, m_2.safetensors" in err
    assert "different widths" in err  # m_2 vs m_10
    # order M_1 (2.0), m_10 (1.0), m_2 (0.0): EMA = 0.25*2 + 0.25*1 + 0.5*0
    assert torch.equal(load(tmp_path / "ema.safetensors")["w"], torch.full((3,), 0.75))
    assert json.loads(metadata(tmp_path / "ema.safetensors")["source_files"]) == [
        "M_1.safetensors", "m_10.safetensors", "m_2.safetensors"]


def test_natural_sort_orders_checkpoint_numbers_by_value(tmp_path, run):
    folder = tmp_path / "runs"
    for step in (500, 1000, 1500):
        save_sharded(folder / f"checkpoint-{step}", {"w": torch.full((2,), float(step))}, shards=1)
    code, _, err = run("--method", "ema", "--alpha", "1", "--models", folder, "--sort", "natural",
                       "--output", "last.safetensors")
    assert code == 0, err
    assert torch.equal(load(tmp_path / "last.safetensors")["w"], torch.full((2,), 1500.0))


def test_trainer_state_files_are_not_taken_for_checkpoints(tmp_path, run):
    folder = tmp_path / "ckpt"
    for i in range(2):
        save_bin(folder / f"weights_{i}.pt", {"w": torch.full((2,), float(i))})
    save_bin(folder / "optimizer.pt", {"state": torch.ones(2)})
    save_bin(folder / "rng_state_0.pth", {"rng": torch.ones(2)})
    code, _, err = run("--method", "sma", "--models", folder, "--output", "avg.safetensors")
    assert code == 0, err
    assert torch.equal(load(tmp_path / "avg.safetensors")["w"], torch.full((2,), 0.5))


def test_sharded_folder_output_matches_single_file_output(three_models, tmp_path, run):
    code, _, err = run("--method", "sma", "--models", *three_models, "--output", "one.safetensors")
    assert code == 0, err
    code, _, err = run("--method", "sma", "--models", *three_models, "--output", "hf/", "--shard-size", "1KB")
    assert code == 0, err
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 1
    assert shard_files == sorted(p.name for p in (tmp_path / "hf").glob("*.safetensors"))
    assert all(os.path.getsize(tmp_path / "hf" / f) < 1000 + 2048 for f in shard_files)  # 1 KB + header
    single = load(tmp_path / "one.safetensors")
    sharded = load(tmp_path / "hf")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in single.values())
    assert set(sharded) == set(single) == set(index["weight_map"])
    for name in single:
        assert torch.equal(single[name], sharded[name]), name


def test_folder_output_under_the_limit_is_one_model_file_without_index(three_models, run, tmp_path):
    code, _, err = run("--method", "sma", "--models", *three_models, "--output", "hf/")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "model.safetensors"]


def test_folder_output_copies_the_donor_files_and_sets_the_output_dtype(tmp_path, run):
    models = [save_sharded(tmp_path / f"m{i}", llama_like(i), config={"model_type": "llama",
                                                                      "torch_dtype": "float32"}) for i in range(2)]
    (models[0] / "tokenizer.json").write_text("{}")
    (models[0] / "README.md").write_text("card of the input")
    (models[1] / "tokenizer.json").write_text('{"second": true}')
    code, _, err = run("--method", "linear", "--models", *models, "--output", "out/", "--dtype", "bfloat16")
    assert code == 0, err
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
    assert "card of the input" not in (tmp_path / "out" / "README.md").read_text()
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    assert all(t.dtype == torch.bfloat16 for n, t in load(tmp_path / "out").items() if n in FLOAT_NAMES)


def test_no_copy_extra_files_leaves_only_weights(tmp_path, run):
    models = [save_sharded(tmp_path / f"m{i}", llama_like(i)) for i in range(2)]
    code, _, err = run("--method", "linear", "--models", *models, "--output", "out/", "--no-copy-extra-files")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["README.md", "model.safetensors"]


def test_file_output_with_copy_extra_files_writes_them_beside_the_file(tmp_path, run):
    models = [save_sharded(tmp_path / f"m{i}", llama_like(i)) for i in range(2)]
    code, _, err = run("--method", "sma", "--models", *models, "--output", "dest/avg.safetensors", "--copy-extra-files")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "dest").iterdir()) == ["avg.safetensors", "config.json"]


def test_metadata_holds_format_tool_recipe_and_the_seed_keys(tmp_path, three_models, run):
    code, _, err = run("--method", "wma", "--models", *three_models, "--output", "w.safetensors")
    assert code == 0, err
    meta = metadata(tmp_path / "w.safetensors")
    assert meta["format"] == "pt"
    assert meta["merge_tool"] == f"merge-models {merge.__version__}"
    assert meta["merge_method"] == "WMA"
    assert meta["merged_models_count"] == "3"
    assert meta["source_files"] == '["m0.safetensors", "m1.safetensors", "m2.safetensors"]'
    assert meta["weights"] == "[3, 2, 1]"
    assert meta["normalized_weights"] == "[0.5, 0.333333, 0.166667]"
    recipe = json.loads(meta["merge_recipe"])
    assert recipe["merge_method"] == "wma"
    assert [m["model"] for m in recipe["models"]] == [str(p) for p in three_models]
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [3, 2, 1]


def test_user_wma_weights_are_stored_as_floats_and_ema_alpha_as_text(tmp_path, three_models, run):
    run("--method", "wma", "--models", *three_models, "--weights", "2,1,1", "--output", "w.safetensors")
    assert metadata(tmp_path / "w.safetensors")["weights"] == "[2.0, 1.0, 1.0]"
    run("--method", "ema", "--models", *three_models, "--alpha", "1e-5", "--output", "e.safetensors")
    meta = metadata(tmp_path / "e.safetensors")
    assert meta["alpha"] == "1e-05" and meta["merge_method"] == "EMA"


def test_non_float_tensors_are_copied_from_the_first_model(tmp_path, run):
    first = llama_like(0)
    second = llama_like(1)
    second["position_ids"] = second["position_ids"] * 7
    paths = [save_safetensors(tmp_path / f"m{i}.safetensors", s) for i, s in enumerate([first, second])]
    code, _, err = run("--method", "sma", "--models", *paths, "--output", "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    assert torch.equal(out["position_ids"], first["position_ids"])
    assert torch.equal(out["mask"], first["mask"])
    assert "non-float dtypes differ" not in err


def test_scalars_and_empty_tensors_survive_the_round_trip(tmp_path, three_models, run):
    code, _, err = run("--method", "karcher", "--models", *three_models, "--output", "k.safetensors")
    assert code == 0, err
    out = load(tmp_path / "k.safetensors")
    assert out["logit_scale"].shape == () and out["empty"].shape == (0, 8)
    scalars = [llama_like(i)["logit_scale"].item() for i in range(3)]
    signs = sum(1 if s > 0 else -1 for s in scalars)
    expected = (1 if signs > 0 else -1) * sum(abs(s) for s in scalars) / 3
    assert out["logit_scale"].item() == pytest.approx(expected, rel=1e-6)


def test_mixed_input_dtypes_compute_in_float32_and_write_the_first_models_dtype(tmp_path, run):
    states = [llama_like(0, torch.bfloat16), llama_like(1, torch.float16), llama_like(2)]
    paths = [save_safetensors(tmp_path / f"m{i}.safetensors", s) for i, s in enumerate(states)]
    code, _, err = run("--method", "sma", "--models", *paths, "--output", "o.safetensors")
    assert code == 0, err
    out = load(tmp_path / "o.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    expected = (sum(s[name].float() for s in states) / 3).to(torch.bfloat16)
    assert out[name].dtype == torch.bfloat16 and torch.equal(out[name], expected)


def test_dtype_flag_sets_every_float_output(tmp_path, three_models, run):
    code, _, err = run("--method", "linear", "--models", *three_models, "--dtype", "float16", "--output", "h.safetensors")
    assert code == 0, err
    out = load(tmp_path / "h.safetensors")
    assert {out[n].dtype for n in FLOAT_NAMES} == {torch.float16}
    assert out["position_ids"].dtype == torch.int64


def test_passthrough_converts_a_bin_to_safetensors_bit_for_bit(tmp_path, run):
    state = llama_like(5, torch.bfloat16)
    path = save_bin(tmp_path / "pytorch_model.bin", state)
    code, _, err = run("--method", "passthrough", "--models", path, "--output", "conv.safetensors")
    assert code == 0, err
    out = load(tmp_path / "conv.safetensors")
    assert set(out) == set(state)
    for name in state:
        assert torch.equal(out[name], state[name]), name


def test_output_tensors_are_aligned_to_their_element_size(tmp_path, run):
    state = {"a_byte": torch.ones(3, dtype=torch.uint8), "b_half": torch.ones(3, dtype=torch.float16),
             "c_double": torch.ones(3, dtype=torch.float64), "d_float": torch.ones(5)}
    path = save_safetensors(tmp_path / "m.safetensors", state)
    code, _, err = run("--method", "passthrough", "--models", path, "--output", "p.safetensors")
    assert code == 0, err
    header = io_utils.SafetensorsFile(str(tmp_path / "p.safetensors"))
    for name, (begin, _) in header.offsets.items():
        assert begin % io_utils.ITEMSIZE[header.infos[name].dtype] == 0, name
    header.close()


def test_tensors_larger_than_a_read_block_merge_identically_to_the_whole_tensor_math(tmp_path, run, monkeypatch):
    monkeypatch.setattr(merge, "BLOCK", 1 << 10)
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5000, generator=g), "v": torch.randn(33, 70, generator=g)} for _ in range(3)]
    paths = [save_safetensors(tmp_path / f"m{i}.safetensors", s) for i, s in enumerate(states)]
    for method, call in [("ema", lambda xs: methods.ema(xs, alpha=0.3)),
                         ("linear", lambda xs: methods.linear(xs, weight=[0.2, 0.3, 0.5], normalize=True))]:
        extra = ["--alpha", "0.3"] if method == "ema" else ["--weights", "0.2", "0.3", "0.5"]
        code, _, err = run("--method", method, "--models", *paths, *extra, "--output", f"{method}.safetensors")
        assert code == 0, err
        out = load(tmp_path / f"{method}.safetensors")
        for name in ("w", "v"):
            assert torch.equal(out[name], call([s[name] for s in states])), (method, name)


def test_an_existing_output_is_refused_without_overwrite_and_replaced_with_it(tmp_path, three_models, run):
    assert run("--method", "sma", "--models", *three_models, "--output", "o.safetensors")[0] == 0
    before = tree_hash(tmp_path / "o.safetensors")
    code, _, err = run("--method", "ema", "--models", *three_models, "--output", "o.safetensors")
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert tree_hash(tmp_path / "o.safetensors") == before
    assert run("--method", "ema", "--models", *three_models, "--output", "o.safetensors", "--overwrite")[0] == 0
    assert metadata(tmp_path / "o.safetensors")["merge_method"] == "EMA"


def test_overwriting_a_sharded_folder_removes_its_stale_shards_after_success(tmp_path, three_models, run):
    assert run("--method", "sma", "--models", *three_models, "--output", "hf/", "--shard-size", "500B")[0] == 0
    assert len(list((tmp_path / "hf").glob("model-*"))) > 2
    code, _, err = run("--method", "sma", "--models", *three_models, "--output", "hf/", "--overwrite")
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["README.md", "model.safetensors"]
    assert "removed" in err


def test_a_failure_mid_merge_leaves_no_output_and_keeps_the_previous_one(tmp_path, run):
    states = [llama_like(i) for i in range(3)]
    states[2]["model.norm.weight"] = torch.zeros(8)  # its weight leaves only +1 and -1 on the non-zero inputs
    paths = [save_safetensors(tmp_path / f"m{i}.safetensors", s) for i, s in enumerate(states)]
    code, _, err = run("--method", "karcher", "--models", *paths, "--alphas", "1", "-1", "1", "--output", "k/")
    assert code == 2
    assert err.strip().splitlines() == [
        "error: tensor model.norm.weight: karcher: the weights of the non-zero inputs sum to 0"]
    assert not (tmp_path / "k").exists()
    assert run("--method", "sma", "--models", *paths, "--output", "k.safetensors")[0] == 0
    before = tree_hash(tmp_path / "k.safetensors")
    code, _, _ = run("--method", "karcher", "--models", *paths, "--alphas", "1", "-1", "1",
                     "--output", "k.safetensors", "--overwrite")
    assert code == 2
    assert tree_hash(tmp_path / "k.safetensors") == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_an_interrupt_mid_write_removes_the_temporary_files(tmp_path, three_models, run, monkeypatch):
    calls = []
    original = io_utils.StreamingWriter.write

    def interrupted(self, name, data):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(self, name, data)

    monkeypatch.setattr(io_utils.StreamingWriter, "write", interrupted)
    code, _, err = run("--method", "sma", "--models", *three_models, "--output", "out/sub/")
    assert code == 130
    assert err.strip().splitlines() == ["error: interrupted; no output was written"]
    assert not (tmp_path / "out").exists()


def test_inputs_are_byte_identical_after_runs_that_succeed_and_fail(tmp_path, run):
    paths = [save_sharded(tmp_path / f"m{i}", llama_like(i)) for i in range(2)]
    before = tree_hash(*paths)
    run("--method", "linear", "--models", *paths, "--output", "a/")
    run("--method", "linear", "--models", *paths, "--output", paths[0] / "x.safetensors")
    run("--method", "karcher", "--models", *paths, "--karcher-tol", "2", "--output", "b/")
    assert tree_hash(*paths) == before


def test_a_second_run_on_a_locked_output_is_refused(tmp_path, three_models, run):
    target = io_utils.output_target(str(tmp_path / "o.safetensors"))
    with io_utils.OutputLock(target):
        code, _, err = run("--method", "sma", "--models", *three_models, "--output", "o.safetensors")
    assert code == 2 and "being written by another run" in err
    assert not (tmp_path / "o.safetensors").exists()


def one_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: ") and "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["--method", "sma", "--models", "missing.safetensors", "m1.safetensors"], "missing.safetensors: no such file or folder"),
    (["--method", "sma", "--models", "notes.txt", "m1.safetensors"], "notes.txt: not a checkpoint"),
    (["--method", "sma", "--models", "junk.safetensors", "m1.safetensors"], "junk.safetensors: not a safetensors file"),
    (["--method", "karcher", "--models", "m0.safetensors", "m1.safetensors", "--alphas", "1", "2", "3"],
     "karcher: --alphas has 3 values for 2 models"),
    (["--method", "ema", "--models", "m0.safetensors", "m1.safetensors", "--alpha", "0"],
     "ema: --alpha must be > 0 and <= 1 (got 0)"),
    (["--method", "ema", "--models", "m0.safetensors", "m1.safetensors", "--alpha", "nan"],
     "ema: --alpha value 'nan' is not a finite number"),
    (["--method", "ema", "--models", "m0.safetensors", "m1.safetensors", "--alpha", "x"],
     "ema: --alpha value 'x' is not a number"),
    (["--method", "ema", "--models", "m0.safetensors", "m1.safetensors", "--weights", "1", "2"],
     "ema takes --alpha (one number), not --weights; did you mean --method wma?"),
    (["--method", "sma", "--models", "m0.safetensors", "m1.safetensors", "--alpha", "0.5"],
     "--alpha is not used by sma; did you mean --method ema?"),
    (["--method", "wma", "--models", "m0.safetensors", "m1.safetensors", "--weights", "1", "-1"],
     "wma: --weights must be >= 0 (got -1) for model 2"),
    (["--method", "wma", "--models", "m0.safetensors", "m1.safetensors", "--weights", "0", "0"],
     "wma: --weights sum to 0"),
    (["--method", "karcher", "--models", "m0.safetensors", "m1.safetensors", "--karcher-iter", "-1"],
     "karcher: --karcher-iter must be an integer >= 0 (got -1)"),
    (["--method", "karcher", "--models", "m0.safetensors", "m1.safetensors", "--karcher-tol", "0"],
     "karcher: --karcher-tol must be > 0 and < 1 (got 0)"),
    (["--method", "sma", "--models", "m0.safetensors"],
     "sma needs at least 2 models, found 1 (m0.safetensors); use --method passthrough to copy one"),
    (["--method", "passthrough", "--models", "m0.safetensors", "m1.safetensors"], "passthrough needs exactly 1 models"),
    (["--method", "isoc", "--models", "m0.safetensors", "m1.safetensors"], "unknown method 'isoc'"),
    (["--method", "emma", "--models", "m0.safetensors", "m1.safetensors"], "did you mean 'ema'?"),
    (["--method", "sma", "--models", "m0.safetensors", "m1.safetensors", "--output", "out.bin"],
     "--output out.bin: name a .safetensors file"),
    (["--method", "sma", "--models", "m0.safetensors", "m1.safetensors", "--output", "m0.safetensors", "--overwrite"],
     "would overwrite the input m0.safetensors"),
    (["--method", "sma", "--models", "m0.safetensors", "m0.safetensors"], "the same model is given twice"),
    (["--method", "sma", "--models", "m0.safetensors", "short.safetensors"], "tensor model.layers.0.mlp.up_proj.weight has different shapes"),
    (["--method", "sma", "--models", "m0.safetensors", "fewer.safetensors"], "tensors are not in every model"),
    (["--method", "sma", "--models", "m0.safetensors", "m1.safetensors", "--device", "cuda:7"], "--device cuda:7"),
    (["--method", "sma", "--models", "m0.safetensors", "m1.safetensors", "--shard-size", "lots"], "--shard-size lots"),
    (["--method", "sma", "--models", "m0.safetensors", "m1.safetensors", "--alphs", "1"], "did you mean --alphas?"),
    (["--models", "m0.safetensors"], "--method is required"),
    (["--method", "sma", "--models", "empty_dir"], "empty_dir: no checkpoints in this folder"),
    (["--method", "sma", "--models", "m0.safetensors", "code.bin"], "code.bin: not a plain weights file"),
])
def test_bad_input_exits_2_with_one_error_line(tmp_path, run, args, message):
    for i in range(2):
        save_safetensors(tmp_path / f"m{i}.safetensors", llama_like(i))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "junk.safetensors").write_bytes(os.urandom(64))
    (tmp_path / "empty_dir").mkdir()
    short = llama_like(2)
    short["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 8)
    save_safetensors(tmp_path / "short.safetensors", short)
    fewer = llama_like(3)
    del fewer["model.norm.weight"]
    save_safetensors(tmp_path / "fewer.safetensors", fewer)
    torch.save({"w": torch.ones(2), "f": os.system}, tmp_path / "code.bin")
    before = tree_hash(*[p for p in tmp_path.iterdir()])
    code, out, err = run(*args)
    assert code == 2
    assert out == ""
    assert message in one_error(err)
    assert not (tmp_path / "merged.safetensors").exists()
    assert tree_hash(*[p for p in tmp_path.iterdir()]) == before


def test_skip_missing_merges_the_shared_tensors_and_warns(tmp_path, run):
    full = llama_like(0)
    partial = llama_like(1)
    del partial["model.norm.weight"]
    paths = [save_safetensors(tmp_path / "a.safetensors", full), save_safetensors(tmp_path / "b.safetensors", partial)]
    code, _, err = run("--method", "sma", "--models", *paths, "--skip-missing", "--output", "o.safetensors")
    assert code == 0, err
    assert "warning: skipped 1 tensors that are not in every model: model.norm.weight (missing in" in err
    assert "model.norm.weight" not in load(tmp_path / "o.safetensors")


def test_a_base_is_ignored_with_a_warning_by_methods_that_use_none(tmp_path, three_models, run):
    code, _, err = run("--method", "sma", "--models", *three_models[:2], "--base", three_models[2], "--output", "o.safetensors")
    assert code == 0, err
    assert "warning: --base" in err and "does not use a base model" in err
    expected = {n: (llama_like(0)[n] + llama_like(1)[n]) / 2 for n in FLOAT_NAMES}
    out = load(tmp_path / "o.safetensors")
    for name, value in expected.items():
        assert torch.allclose(out[name], value, atol=1e-6), name


def test_quiet_keeps_warnings_and_drops_the_summary(tmp_path, three_models, run):
    code, _, err = run("--method", "sma", "--models", *three_models[:2], "--base", three_models[2], "--quiet",
                       "--output", "o.safetensors")
    assert code == 0
    assert err.strip().splitlines() == [line for line in err.strip().splitlines() if line.startswith("warning:")]
    assert "warning: --base" in err


def test_help_lists_every_method_and_exits_0(run):
    code, out, _ = run("--help")
    assert code == 0
    for name in methods.REGISTRY:
        assert name in out


def test_method_names_accept_dashes_and_any_case(three_models, run):
    assert run("--method", "SMA", "--models", *three_models, "--output", "o.safetensors")[0] == 0


def test_an_output_inside_an_input_series_folder_is_refused(tmp_path, run):
    folder = tmp_path / "runs"
    for i in range(2):
        save_safetensors(folder / f"s{i}.safetensors", llama_like(i))
    code, _, err = run("--method", "sma", "--models", folder, "--output", folder / "avg.safetensors")
    assert code == 2 and "inside the input folder" in one_error(err)


def test_main_runs_as_a_script(tmp_path, three_models):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(Path(merge.__file__)), "--method", "sma", "--models",
                           *map(str, three_models), "--output", str(tmp_path / "s.safetensors"), "--quiet"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert (tmp_path / "s.safetensors").exists()


def test_help_does_not_import_torch():
    """`--help` must start in a fraction of a second; importing torch takes seconds."""
    import subprocess
    import sys

    probe = ("import runpy, sys; sys.argv = ['merge.py', '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "sys.stderr.write('torch._C' in sys.modules and 'imported' or 'deferred')")
    done = subprocess.run([sys.executable, "-c", probe], cwd=Path(merge.__file__).parent,
                          capture_output=True, text=True)
    assert "usage:" in done.stdout
    assert done.stderr.endswith("deferred"), done.stderr


ELEMENTWISE = [m for m in methods.REGISTRY.values() if m.scope == methods.ELEMENTWISE]


@pytest.mark.parametrize("method", ELEMENTWISE, ids=lambda m: m.name)
def test_every_element_wise_method_gives_the_same_bits_in_small_blocks_as_in_one_piece(tmp_path, run, monkeypatch,
                                                                                      method):
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(5000, generator=g), "v": torch.randn(33, 70, generator=g).to(torch.bfloat16)}
    states = [{k: (v.float() + 0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in base.items()}
              for _ in range(3)]
    paths = [save_safetensors(tmp_path / f"m{i}.safetensors", s) for i, s in enumerate(states)]
    count = min(len(paths), method.max_models or len(paths))
    if count < method.min_models:
        pytest.skip(f"{method.name} needs more models")
    argv = ["--method", method.name, "--models", *paths[:count]]
    if method.uses_base:
        argv += ["--base", save_safetensors(tmp_path / "base.safetensors", base)]
    argv += [a for p in method.params if p.required for a in (p.cli_flag, "0.05")]
    assert run(*argv, "--output", "whole.safetensors")[0] == 0  # 5000 elements: one chunk, one block
    monkeypatch.setattr(merge, "BLOCK", 1 << 10)
    monkeypatch.setattr(methods, "CHUNK", 1 << 8)
    code, _, err = run(*argv, "--output", "blocks.safetensors")
    assert code == 0, err
    whole, blocks = load(tmp_path / "whole.safetensors"), load(tmp_path / "blocks.safetensors")
    assert whole.keys() == blocks.keys()
    assert all(torch.equal(whole[k], blocks[k]) for k in whole)
