"""Everyday use: dry runs, disk space, model cards, batch work, JSON summaries, examples, packaging."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import io_utils
import merge
from conftest import ROOT, llama_like, load, save_safetensors, save_sharded


def test_a_dry_run_plans_what_the_real_run_writes_and_writes_nothing(three_models, run, tmp_path):
    code, out, err = run("--method", "linear", "--models", *three_models, "--output", "hf/", "--shard-size", "1KB",
                         "--dry-run", "--json")
    assert code == 0, err
    assert not (tmp_path / "hf").exists()
    report = json.loads(out)["dry_run"]
    assert "plan: linear" in err and "disk: needs" in err and "memory: about" in err
    code, _, err = run("--method", "linear", "--models", *three_models, "--output", "hf/", "--shard-size", "1KB")
    assert code == 0, err
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    planned = report["output"]["files"]
    assert [f["name"] for f in planned] == sorted(set(index["weight_map"].values()))
    assert sum(f["bytes"] for f in planned) == index["metadata"]["total_size"]
    assert report["tensors"]["merge"] + report["tensors"]["copy"] == len(index["weight_map"])
    assert report["tensors"]["copy"] == 2  # position_ids and mask
    assert [m["path"] for m in report["models"]] == [str(p) for p in three_models]
    assert report["disk"]["needed_bytes"] >= index["metadata"]["total_size"]


def test_a_dry_run_shows_each_models_own_parameters_and_which_input_is_the_base(three_models, run):
    code, _, err = run("--method", "ties", "--base", three_models[2], "--models", *three_models[:2],
                       "--weights", "0.7", "0.3", "--density", "0.4", "--dry-run")
    assert code == 0, err
    lines = err.splitlines()
    assert any(line.startswith(f"  input {three_models[0]}:") and line.endswith("; weight=0.7, density=0.4")
               for line in lines)
    assert any(line.startswith(f"  input {three_models[1]}:") and line.endswith("; weight=0.3, density=0.4")
               for line in lines)
    assert any(line.startswith(f"  base {three_models[2]}:") and line.endswith(" tensors") for line in lines)


def test_a_dry_run_fails_like_the_real_run_would(three_models, run):
    code, out, err = run("--method", "ema", "--alpha", "2", "--models", *three_models, "--dry-run")
    assert code == 2 and "--alpha must be" in err and out == ""


def test_a_run_the_disk_cannot_hold_is_refused_before_it_starts(three_models, run, tmp_path, monkeypatch):
    monkeypatch.setattr(merge, "free_space", lambda folder: (str(tmp_path), 100))
    code, _, err = run("--method", "sma", "--models", *three_models, "--output", "o.safetensors")
    assert code == 2 and "not enough free space for the output" in err
    assert not (tmp_path / "o.safetensors").exists()
    code, _, err = run("--method", "sma", "--models", *three_models, "--output", "o.safetensors", "--dry-run")
    assert code == 2 and "NOT ENOUGH" in err


def test_a_dry_run_reports_an_output_locked_by_another_run(three_models, run, tmp_path):
    with io_utils.OutputLock(io_utils.output_target(str(tmp_path / "o.safetensors"))):
        code, _, err = run("--method", "sma", "--models", *three_models, "--output", "o.safetensors", "--dry-run")
    assert code == 2 and "being written by another run" in err


def test_folder_outputs_get_a_model_card_with_the_recipe_that_repeats_them(tmp_path, run):
    models = [save_sharded(tmp_path / f"m{i}", llama_like(i)) for i in range(2)]
    code, _, err = run("--method", "karcher", "--models", *models, "--alphas", "0.3", "0.7", "--output", "k/")
    assert code == 0, err
    card = (tmp_path / "k" / "README.md").read_text()
    assert "karcher" in card and str(models[0]) in card and "weight: 0.3" in card
    recipe = re.search(r"```yaml\n(.*?)```", card, re.DOTALL).group(1)
    (tmp_path / "recipe.yml").write_text(recipe)
    assert run("--config", "recipe.yml", "--output", "again.safetensors")[0] == 0
    a, b = load(tmp_path / "k"), load(tmp_path / "again.safetensors")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_skip_existing_skips_a_complete_output_and_redoes_a_broken_one(three_models, run, tmp_path):
    assert run("--method", "sma", "--models", *three_models, "--output", "o.safetensors")[0] == 0
    before = (tmp_path / "o.safetensors").stat().st_mtime_ns
    code, out, err = run("--method", "sma", "--models", *three_models, "--output", "o.safetensors",
                         "--skip-existing", "--json")
    assert code == 0 and "skipped: o.safetensors exists and is complete" in err
    assert json.loads(out)["skipped"] is True
    assert (tmp_path / "o.safetensors").stat().st_mtime_ns == before
    data = (tmp_path / "o.safetensors").read_bytes()
    (tmp_path / "o.safetensors").write_bytes(data[:-10])  # truncated: not complete
    code, _, err = run("--method", "sma", "--models", *three_models, "--output", "o.safetensors", "--skip-existing",
                       "--overwrite")
    assert code == 0 and "skipped" not in err
    assert (tmp_path / "o.safetensors").read_bytes() == data


def test_skip_existing_checks_every_shard_of_a_folder(three_models, run, tmp_path):
    assert run("--method", "sma", "--models", *three_models, "--output", "hf/", "--shard-size", "1KB")[0] == 0
    assert io_utils.complete_output(str(tmp_path / "hf")).startswith("an index and its")
    shard = sorted((tmp_path / "hf").glob("model-*.safetensors"))[-1]
    shard.unlink()
    assert io_utils.complete_output(str(tmp_path / "hf")) is None


def test_jobs_run_every_line_report_failures_and_go_on(three_models, run, tmp_path):
    jobs = tmp_path / "jobs.txt"
    jobs.write_text("# one merge per line\n"
                    f"--method sma --models {three_models[0]} {three_models[1]} --output a.safetensors\n\n"
                    f"--method sma --models {three_models[0]} missing.safetensors --output b.safetensors\n"
                    f"--method ema --models {' '.join(map(str, three_models))} --output c.safetensors\n")
    code, out, err = run("--jobs", jobs, "--quiet", "--json")
    assert code == 2
    assert "jobs: 2 done, 0 skipped, 1 failed (lines 4)" in err
    results = [json.loads(line) for line in out.strip().splitlines()]
    assert [r["ok"] for r in results] == [True, False, True]
    assert "missing.safetensors: no such file" in results[1]["error"]
    assert (tmp_path / "a.safetensors").exists() and (tmp_path / "c.safetensors").exists()
    code, out, err = run("--jobs", jobs, "--quiet", "--skip-existing")
    assert "jobs: 0 done, 2 skipped, 1 failed" in err


def test_json_summarises_a_run_on_stdout_only(three_models, run):
    code, out, err = run("--method", "wma", "--models", *three_models, "--output", "w.safetensors", "--json", "--quiet")
    assert code == 0 and err == ""
    summary = json.loads(out)
    assert summary["ok"] and summary["method"] == "wma" and summary["tensors"] == len(llama_like(0))
    assert summary["files"] == ["w.safetensors"] and summary["bytes"] > 0


def test_json_reports_errors_with_their_exit_code(run):
    code, out, err = run("--method", "nope", "--models", "x", "--json")
    summary = json.loads(out)
    assert code == 2 and summary["ok"] is False and summary["exit_code"] == 2
    assert summary["error"].startswith("unknown method 'nope'") and err.startswith("error: unknown method")


@pytest.mark.parametrize("script", ["quickstart.py", "ema_snapshots.py", "mergekit_recipe.py", "frankenmerge.py",
                                    "batch_loop.sh"])
def test_examples_run(script):
    command = ["bash"] if script.endswith(".sh") else [sys.executable]
    done = subprocess.run(command + [str(ROOT / "examples" / script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "merge", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == f"merge-models {merge.__version__}"


def test_the_package_declares_the_merge_models_command_and_the_version():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'merge-models = "merge:main"' in text
    assert f'version = "{merge.__version__}"' in text
    for module in ("merge", "methods", "io_utils"):
        assert f'"{module}"' in text
    requirements = {re.split(r"[<>=]", line)[0].lower() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line and not line.startswith("#")}
    declared = {re.split(r"[<>=]", d.strip('" ,'))[0].lower() for d in
                re.search(r"dependencies = \[(.*?)\]", text, re.DOTALL).group(1).split("\n") if d.strip()}
    assert requirements == declared


def test_a_dry_run_of_a_matrix_method_lists_the_svd_shapes(tmp_path, run):
    g = torch.Generator().manual_seed(0)
    for i in range(3):
        save_safetensors(tmp_path / f"s{i}.safetensors", {"layers.0.w": torch.randn(8, 6, generator=g),
                                                          "layers.1.w": torch.randn(8, 6, generator=g),
                                                          "norm": torch.ones(6)})
    code, out, err = run("--method", "iso_c", "--base", "s0.safetensors", "--models", "s1.safetensors",
                         "s2.safetensors", "--dry-run", "--json", "--output", "x.safetensors")
    assert code == 0, err
    assert json.loads(out)["dry_run"]["matrix_path"] == {"8 x 6": 2}
    assert "matrix path (SVDs): 2 x [8 x 6]" in err
