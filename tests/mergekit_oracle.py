"""mergekit 0.1.5 on what tests/test_geometric.py asks; run by mergekit's own interpreter.

    /work/mkvenv/bin/python tests/mergekit_oracle.py cases.pt results.pt [recipe.yml out_dir]...

Each case is {"method", "tensors", "base_index", "parameters"} for mergekit's `merge_tensors`; the results
are {"torch": its torch version, "results": one tensor per case, or the error mergekit raised, as text}. Each recipe then runs through the
`mergekit-yaml` command (its click entry point, in this process, to pay mergekit's import once). Our
code never imports mergekit: this script runs in a process of its own.
"""

import sys

import torch
from mergekit.merge_methods import merge_tensors
from mergekit.scripts.run_yaml import main as mergekit_yaml

# mergekit's whole-tensor sums round differently with each thread count; one thread adds them up in the
# order ours always uses.
torch.set_num_threads(1)

cases_path, results_path, *recipes = sys.argv[1:]
results = []
for case in torch.load(cases_path):
    try:
        results.append(merge_tensors(case["tensors"], case["method"], parameters=case["parameters"],
                                     base_index=case["base_index"]))
    except Exception as err:  # reported to the test, which expects some errors
        results.append(f"{type(err).__name__}: {err}")
torch.save({"torch": str(torch.__version__), "results": results}, results_path)
for recipe, out in zip(recipes[::2], recipes[1::2]):
    mergekit_yaml([recipe, out, "--no-copy-tokenizer", "--quiet"], standalone_mode=False)
