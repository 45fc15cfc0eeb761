"""Bad inputs and faults: every one gives one `error:` line naming the culprit and exit 2 (130/143 for
signals), leaves no output and no temporary file, keeps a previous output intact and the inputs
byte-identical. Cases that need another process (permissions, a file-size limit, signals, a concurrent
run) run the CLI in a child started from this file; everything else runs in-process.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import signal
import stat
import struct
import subprocess
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

import io_utils
import merge
import methods
from conftest import ROOT, llama_like, load, save_bin, save_safetensors, save_sharded

M0, M1 = "in/m0.safetensors", "in/m1.safetensors"


# ---------------------------------------------------------------------------------------------------
# helpers


def snapshot(root: Path, skip: tuple[str, ...] = ()) -> dict[str, tuple]:
    """Every entry under root: kind, mode and content digest (links by target; pipes never opened)."""
    state = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(folder, name)
            relative = os.path.relpath(path, root)
            if relative.split(os.sep)[0] in skip:
                continue
            info = os.lstat(path)
            if stat.S_ISREG(info.st_mode):
                with open(path, "rb") as handle:
                    state[relative] = ("file", info.st_mode, hashlib.sha256(handle.read()).hexdigest())
            elif stat.S_ISLNK(info.st_mode):
                state[relative] = ("link", os.readlink(path))
            else:
                state[relative] = ("other", info.st_mode)
    return state


def one_error(err: str, *culprits: str) -> str:
    """stderr is exactly one `error:` line, no traceback, naming every culprit given."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    for culprit in culprits:
        assert culprit in lines[0], (culprit, lines[0])
    return lines[0]


def temporary_files(root: Path) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.name.endswith((".tmp", ".lock")))


def safetensors_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file by hand: 8-byte header length, header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def entry(dtype: object, shape: object, offsets: object) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


def f32(count: int, begin: int = 0) -> dict:
    return entry("F32", [count], [begin, begin + 4 * count])


def write(path: str, content: bytes) -> str:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(content)
    return path


class RunsCode:
    """Pickled as a call to os.system: loading it with a plain unpickler would create the marker file."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


MARKER = "in/PWNED"


def zip_with(path: str, change: Callable[[str, bytes], bytes | None]) -> str:
    """A torch.save'd zip of one 1000-element tensor, each record passed through `change` (None drops it)."""
    source = path + ".source"
    torch.save({"w": torch.zeros(1000)}, source)
    with zipfile.ZipFile(source) as original, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as forged:
        for item in original.infolist():
            data = change(item.filename, original.read(item.filename))
            if data is not None:
                forged.writestr(item, data)
    os.unlink(source)
    return path


def declared_elements(count: int):
    """Rewrite the pickle so the storage and the tensor both declare `count` elements (BININT2 1000 twice)."""

    def change(name: str, data: bytes) -> bytes:
        if name.endswith("data.pkl"):
            return data.replace(b"M\xe8\x03", b"M" + count.to_bytes(2, "little"))
        return data

    return change


def index_folder(folder: str, index: bytes | dict) -> str:
    """A model folder with one real shard and the given index text."""
    save_safetensors(Path(folder) / "model-00001-of-00001.safetensors", {"w": torch.ones(4)})
    raw = index if isinstance(index, bytes) else json.dumps(index).encode()
    write(f"{folder}/model.safetensors.index.json", raw)
    return folder


# ---------------------------------------------------------------------------------------------------
# in-process cases: each builds its bad input under in/ and gives the command line


@dataclass
class Case:
    id: str
    make: Callable[[], list[str]]  # builds the input, returns the arguments (a default --output is added)
    culprits: tuple[str, ...]  # strings the one error line must hold: the file, tensor or flag


def sma_with(bad: str) -> list[str]:
    return ["--method", "sma", "--models", M0, bad]


def bad_safetensors(name: str, content: bytes) -> Callable[[], list[str]]:
    return lambda: sma_with(write(f"in/{name}.safetensors", content))


def bad_bin(name: str, build: Callable[[str], object]) -> Callable[[], list[str]]:
    def make():
        path = f"in/{name}.bin"
        build(path)
        return sma_with(path)

    return make


def bad_index(name: str, index: bytes | dict) -> Callable[[], list[str]]:
    return lambda: sma_with(index_folder(f"in/{name}", index))


def state_with(**changes) -> Callable[[], list[str]]:
    """m0's layout with some tensors replaced (a value) or removed (None)."""

    def make():
        state = llama_like(5)
        for name, value in changes.items():
            name = name.replace("__", ".")
            if value is None:
                del state[name]
            else:
                state[name] = value
        return sma_with(str(save_safetensors(Path("in/other.safetensors"), state)))

    return make


def flag(method: str, *extra: str, models: int = 2) -> Callable[[], list[str]]:
    return lambda: ["--method", method, "--models", *[M0, M1][:models], *extra]


HEADER_OK = {"a": f32(2)}
FILE_CASES = [
    Case("missing path", lambda: sma_with("in/nowhere.safetensors"), ("in/nowhere.safetensors", "no such file")),
    Case("missing folder", lambda: sma_with("in/nowhere/"), ("in/nowhere/", "no such file")),
    Case("folder with no weights", lambda: (write("in/cfg/config.json", b"{}"), sma_with("in/cfg"))[1],
         ("in/cfg", "no checkpoints")),
    Case("empty folder", lambda: (os.makedirs("in/void"), sma_with("in/void"))[1], ("in/void", "no checkpoints")),
    Case("not a checkpoint name", lambda: sma_with(write("in/notes.txt", b"hi")), ("in/notes.txt", "not a checkpoint")),
    Case("empty safetensors", bad_safetensors("empty", b""), ("in/empty.safetensors", "only 0 bytes")),
    Case("random bytes safetensors", bad_safetensors("random", os.urandom(4096)), ("in/random.safetensors",)),
    Case("truncated inside the length", bad_safetensors("short", b"\x10\x00\x00"), ("in/short.safetensors",)),
    Case("truncated inside the header",
         bad_safetensors("cut_header", safetensors_bytes(HEADER_OK, b"\0" * 8)[:20]),
         ("in/cut_header.safetensors", "exceeds the file size")),
    Case("truncated inside the data",
         bad_safetensors("cut_data", safetensors_bytes({"a": f32(4)}, b"\0" * 10)),
         ("in/cut_data.safetensors", "tensor a", "past the end")),
    Case("header length larger than the file",
         bad_safetensors("long", safetensors_bytes(HEADER_OK, b"\0" * 8, length=10**6)),
         ("in/long.safetensors", "header length 1000000")),
    Case("header length 2**64 - 1",
         bad_safetensors("huge_len", safetensors_bytes(HEADER_OK, b"\0" * 8, length=2**64 - 1)),
         ("in/huge_len.safetensors",)),
    Case("header not JSON", bad_safetensors("not_json", safetensors_bytes(b"{'a': 1}")),
         ("in/not_json.safetensors", "not valid JSON")),
    Case("header not UTF-8", bad_safetensors("latin", safetensors_bytes(b'{"\xe9": 1}')),
         ("in/latin.safetensors", "not valid JSON")),
    Case("header a JSON list", bad_safetensors("list", safetensors_bytes([1, 2])), ("in/list.safetensors", "not a JSON object")),
    Case("header a JSON number", bad_safetensors("number", safetensors_bytes(b"42")), ("in/number.safetensors", "not a JSON object")),
    Case("header with a 5000-digit integer",
         bad_safetensors("digits", safetensors_bytes(b'{"a": {"shape": [' + b"9" * 5000 + b"]}}")),
         ("in/digits.safetensors", "not valid JSON")),
    Case("header nested 100000 deep", bad_safetensors("deep", safetensors_bytes(b"[" * 100000 + b"]" * 100000)),
         ("in/deep.safetensors", "not valid JSON")),
    Case("header entry not an object", bad_safetensors("entry", safetensors_bytes({"a": [1, 2]}, b"\0" * 8)),
         ("in/entry.safetensors", "tensor a", "not an object")),
    Case("overlapping data_offsets",
         bad_safetensors("overlap", safetensors_bytes({"a": f32(4), "b": f32(4, begin=8)}, b"\0" * 24)),
         ("in/overlap.safetensors", "tensors a and b overlap")),
    Case("data_offsets past the end",
         bad_safetensors("past", safetensors_bytes({"a": f32(4, begin=4)}, b"\0" * 16)),
         ("in/past.safetensors", "tensor a", "past the end")),
    Case("data_offsets reversed", bad_safetensors("reversed", safetensors_bytes({"a": entry("F32", [0], [8, 0])}, b"\0" * 8)),
         ("in/reversed.safetensors", "tensor a", "invalid data_offsets")),
    Case("data_offsets not integers",
         bad_safetensors("floats", safetensors_bytes({"a": entry("F32", [2], [0.0, 8.0])}, b"\0" * 8)),
         ("in/floats.safetensors", "tensor a", "invalid data_offsets")),
    Case("unknown dtype", bad_safetensors("dtype", safetensors_bytes({"a": entry("F128", [1], [0, 16])}, b"\0" * 16)),
         ("in/dtype.safetensors", "tensor a", "unsupported dtype 'F128'")),
    Case("shape bytes disagree with offsets",
         bad_safetensors("shape", safetensors_bytes({"a": entry("F32", [3], [0, 8])}, b"\0" * 8)),
         ("in/shape.safetensors", "tensor a", "needs 12")),
    Case("negative shape", bad_safetensors("negative", safetensors_bytes({"a": entry("F32", [-2], [0, 0])})),
         ("in/negative.safetensors", "tensor a", "invalid shape")),
    Case("metadata that is not strings",
         bad_safetensors("meta", safetensors_bytes({"__metadata__": {"k": 1}, **HEADER_OK}, b"\0" * 8)),
         ("in/meta.safetensors", "__metadata__")),
    Case("empty .bin", bad_bin("empty", lambda p: write(p, b"")), ("in/empty.bin", "the file is empty")),
    Case(".bin of text", bad_bin("text", lambda p: write(p, b"hello, not a checkpoint")),
         ("in/text.bin", "neither a zip archive nor a pickle")),
    Case(".bin of random bytes", bad_bin("random", lambda p: write(p, b"\x01" + os.urandom(4096))),
         ("in/random.bin", "neither a zip archive nor a pickle")),
    Case(".bin zip without its data record", bad_bin("no_record", lambda p: zip_with(
        p, lambda name, data: None if name.endswith("data/0") else data)), ("in/no_record.bin", "not a PyTorch checkpoint")),
    Case(".bin zip cut short", bad_bin("cut_zip", lambda p: (torch.save({"w": torch.ones(64)}, p),
                                                         os.truncate(p, os.path.getsize(p) // 2))),
         ("in/cut_zip.bin", "not a PyTorch checkpoint")),
    Case(".bin forged to declare more elements than the file holds",
         bad_bin("forged", lambda p: zip_with(p, declared_elements(60000))), ("in/forged.bin", "not a PyTorch checkpoint")),
    Case(".bin forged to declare fewer elements than its record",
         bad_bin("forged_small", lambda p: zip_with(p, lambda n, d: d.replace(b"M\xe8\x03", b"M\x84\x03", 1)
                                                    if n.endswith("data.pkl") else d)),
         ("in/forged_small.bin", "not a PyTorch checkpoint")),
    Case(".bin that is a list, not a dict", bad_bin("list", lambda p: torch.save([torch.ones(2)], p)),
         ("in/list.bin", "holds a list")),
    Case(".bin with a complex tensor", bad_bin("complex", lambda p: torch.save({"c": torch.ones(2, dtype=torch.complex64)}, p)),
         ("in/complex.bin", "tensor c", "unsupported dtype complex64")),
    Case(".bin zip whose pickle calls a function",
         bad_bin("calls_zip", lambda p: torch.save({"w": torch.ones(2), "x": RunsCode(MARKER)}, p)),
         ("in/calls_zip.bin", "not a plain weights file", "would call posix.system")),
    Case(".bin legacy pickle that calls a function",
         bad_bin("calls_legacy", lambda p: torch.save({"x": RunsCode(MARKER)}, p, _use_new_zipfile_serialization=False)),
         ("in/calls_legacy.bin", "not a plain weights file", "would call posix.system")),
    Case(".bin raw protocol-4 pickle that calls a function",
         bad_bin("calls_raw", lambda p: write(p, pickle.dumps({"x": RunsCode(MARKER)}, protocol=4))),
         ("in/calls_raw.bin", "not a plain weights file")),
    Case("index naming a missing shard",
         bad_index("gone", {"weight_map": {"w": "model-00002-of-00002.safetensors"}}),
         ("in/gone/model.safetensors.index.json", "model-00002-of-00002.safetensors", "does not exist")),
    Case("index naming a tensor not in its shard",
         bad_index("ghost", {"weight_map": {"w": "model-00001-of-00001.safetensors",
                                            "v": "model-00001-of-00001.safetensors"}}),
         ("in/ghost/model.safetensors.index.json", "tensor v", "not in its shard")),
    Case("index not JSON", bad_index("garbled", b"{weight_map: 1"), ("in/garbled/model.safetensors.index.json", "not a shard index")),
    Case("index without weight_map", bad_index("bare", {"metadata": {}}), ("in/bare/model.safetensors.index.json", "weight_map")),
    Case("index that is a JSON list", bad_index("listed", [1]), ("in/listed/model.safetensors.index.json", "weight_map")),
    Case("index mapping to numbers", bad_index("numbers", {"weight_map": {"w": 1}}),
         ("in/numbers/model.safetensors.index.json", "weight_map")),
    Case("index shard outside its folder", bad_index("escape", {"weight_map": {"w": "../m1.safetensors"}}),
         ("in/escape/model.safetensors.index.json", "'../m1.safetensors' does not exist")),
    Case("index shard that is not a checkpoint", bad_index("self", {"weight_map": {"w": "model.safetensors.index.json"}}),
         ("in/self/model.safetensors.index.json", "not a PyTorch checkpoint")),
    Case("symlink loop", lambda: (os.symlink("loop_b", "in/loop_a"), os.symlink("loop_a", "in/loop_b"),
                                  sma_with("in/loop_a"))[2], ("in/loop_a", "symbolic link loop")),
    Case("path through a symlink loop", lambda: (os.symlink("loop_b", "in/loop_a"), os.symlink("loop_a", "in/loop_b"),
                                                 sma_with("in/loop_a/m.safetensors"))[2],
         ("in/loop_a/m.safetensors", "symbolic link loop")),
    Case("broken symlink", lambda: (os.symlink("gone.safetensors", "in/dangling.safetensors"),
                                    sma_with("in/dangling.safetensors"))[1], ("in/dangling.safetensors", "broken symbolic link")),
    Case("named pipe", lambda: (os.mkfifo("in/pipe.safetensors"), sma_with("in/pipe.safetensors"))[1],
         ("in/pipe.safetensors", "not a regular file")),
    Case("path through a file", lambda: sma_with(M1 + "/x.safetensors"), (M1 + "/x.safetensors", "no such file")),
    Case("bad file inside a series folder", lambda: (save_safetensors(Path("in/runs/a.safetensors"), llama_like(3)),
                                                     write("in/runs/b.safetensors", b"junk" * 4), sma_with("in/runs"))[2],
         ("in/runs/b.safetensors",)),
    Case("a model given twice", lambda: sma_with(M0), ("in/m0.safetensors", "given twice")),
]

MODEL_CASES = [
    Case("different key sets", state_with(model__norm__weight=None), ("model.norm.weight", "in/other.safetensors")),
    Case("extra key", state_with(extra__weight=torch.ones(2)), ("extra.weight", "not in every model")),
    Case("different shapes", state_with(lm_head__weight=torch.ones(16, 9)),
         ("lm_head.weight", "different shapes", "in/other.safetensors [16, 9]")),
    Case("different layer counts", lambda: sma_with(str(save_safetensors(Path("in/deeper.safetensors"), llama_like(5, layers=3)))),
         ("different numbers of layers in model.layers", "in/m0.safetensors 2, in/deeper.safetensors 3")),
    Case("float in one model, integer in another", state_with(model__norm__weight=torch.ones(8, dtype=torch.int32)),
         ("model.norm.weight", "floating point in some models only")),
]

FLAG_CASES = [
    Case("ema --alpha negative", flag("ema", "--alpha", "-0.5"), ("--alpha", "-0.5")),
    Case("ema --alpha zero", flag("ema", "--alpha", "0"), ("--alpha", "must be > 0")),
    Case("ema --alpha above 1", flag("ema", "--alpha", "2"), ("--alpha", "<= 1")),
    Case("ema --alpha NaN", flag("ema", "--alpha", "nan"), ("--alpha", "'nan' is not a finite number")),
    Case("ema --alpha inf", flag("ema", "--alpha", "inf"), ("--alpha", "'inf' is not a finite number")),
    Case("ema --alpha overflows a double", flag("ema", "--alpha", "1e400"), ("--alpha", "not a finite number")),
    Case("ema --alpha not a number", flag("ema", "--alpha", "abc"), ("--alpha", "'abc' is not a number")),
    Case("wma --weights negative", flag("wma", "--weights", "1", "-1"), ("--weights", ">= 0", "model 2")),
    Case("wma --weights NaN", flag("wma", "--weights", "nan", "1"), ("--weights", "'nan'")),
    Case("wma --weights not a number", flag("wma", "--weights", "1", "x"), ("--weights", "'x' is not a number")),
    Case("wma --weights all zero", flag("wma", "--weights", "0,0"), ("--weights", "sum to 0")),
    Case("wma --weights whose sum overflows", flag("wma", "--weights", "1e308", "1e308"), ("--weights", "overflows")),
    Case("wma too many --weights", flag("wma", "--weights", "1", "2", "3"), ("--weights has 3 values for 2 models",)),
    Case("linear --alphas too few", flag("linear", "--alphas", "1", "2", "3", "4"), ("--alphas has 4 values for 2 models",)),
    Case("linear --weights summing to 0", flag("linear", "--weights", "1", "-1"), ("--weights", "sum to 0")),
    Case("linear --weights inf", flag("linear", "--weights", "inf", "1"), ("--weights", "'inf'")),
    Case("linear --weights whose sum overflows", flag("linear", "--weights", "1e308", "1e308"), ("--weights", "overflows")),
    Case("karcher --karcher-iter negative", flag("karcher", "--karcher-iter", "-1"), ("--karcher-iter", ">= 0")),
    Case("karcher --karcher-iter fractional", flag("karcher", "--karcher-iter", "2.5"), ("--karcher-iter", "integer")),
    Case("karcher --karcher-iter NaN", flag("karcher", "--karcher-iter", "nan"), ("--karcher-iter", "finite")),
    Case("karcher --karcher-iter not a number", flag("karcher", "--karcher-iter", "ten"), ("--karcher-iter", "'ten'")),
    Case("karcher --karcher-tol zero", flag("karcher", "--karcher-tol", "0"), ("--karcher-tol", "> 0")),
    Case("karcher --karcher-tol negative", flag("karcher", "--karcher-tol", "-1e-5"), ("--karcher-tol", "> 0")),
    Case("karcher --karcher-tol 1", flag("karcher", "--karcher-tol", "1"), ("--karcher-tol", "< 1")),
    Case("karcher --karcher-tol huge", flag("karcher", "--karcher-tol", "1e300"), ("--karcher-tol", "< 1")),
    Case("karcher --karcher-tol NaN", flag("karcher", "--karcher-tol", "NaN"), ("--karcher-tol", "finite")),
    Case("karcher --weights summing to 0", flag("karcher", "--weights", "2", "-2"), ("--weights", "sum to 0")),
    Case("karcher --karcher-compute unknown", flag("karcher", "--karcher-compute", "fp8"), ("--karcher-compute",)),
    Case("passthrough --scale NaN", flag("passthrough", "--scale", "nan", models=1), ("--scale", "'nan'")),
    Case("passthrough --scale -inf", flag("passthrough", "--scale", "-inf", models=1), ("--scale", "'-inf'")),
    Case("passthrough --scale not a number", flag("passthrough", "--scale", "big", models=1), ("--scale", "'big'")),
    Case("--shard-size zero", flag("sma", "--shard-size", "0", "--output", "o/"), ("--shard-size 0",)),
    Case("--shard-size negative", flag("sma", "--shard-size=-5GB", "--output", "o/"), ("--shard-size -5GB",)),
    Case("--shard-size below a byte", flag("sma", "--shard-size", "0.1B", "--output", "o/"), ("--shard-size 0.1B",)),
    Case("--shard-size NaN", flag("sma", "--shard-size", "nan", "--output", "o/"), ("--shard-size nan",)),
    Case("--shard-size unknown unit", flag("sma", "--shard-size", "5PB", "--output", "o/"), ("--shard-size 5PB",)),
    Case("--seed negative", flag("sma", "--seed", "-1"), ("--seed", "-1")),
    Case("--seed too large", flag("sma", "--seed", str(2**64)), ("--seed", str(2**64))),
    Case("--seed not a number", flag("sma", "--seed", "x"), ("--seed", "'x'")),
    Case("--dtype unknown", flag("sma", "--dtype", "float8"), ("--dtype", "float8")),
    Case("--compute-dtype unknown", flag("sma", "--compute-dtype", "int8"), ("--compute-dtype", "int8")),
    Case("--device unknown", flag("sma", "--device", "tpu"), ("--device tpu",)),
    Case("--device CUDA index absent", flag("sma", "--device", "cuda:99"), ("--device cuda:99",)),
    Case("unknown method", flag("linera"), ("unknown method 'linera'", "did you mean 'linear'?")),
    Case("unknown flag", flag("sma", "--weigths", "1"), ("--weigths", "did you mean --weights?")),
    Case("flag of another method", flag("sma", "--alpha", "0.5"), ("--alpha is not used by sma",)),
    Case("no --method", lambda: ["--models", M0, M1], ("--method is required",)),
    Case("no --models", lambda: ["--method", "sma"], ("--models is required",)),
    Case("too few models", flag("sma", models=1), ("sma needs at least 2 models, found 1",)),
    Case("too many models", flag("passthrough"), ("passthrough needs exactly 1 models, found 2",)),
    Case("too many model paths", lambda: ["--method", "sma", "--models", *[M0] * 101], ("--models takes at most 100",)),
]

OUTPUT_CASES = [
    Case("output equal to an input", flag("sma", "--output", M1, "--overwrite"), ("--output in/m1.safetensors", "overwrite the input")),
    Case("output equal to an input through a symlink", lambda: (os.symlink("in/m1.safetensors", "alias.safetensors"),
                                                                flag("sma", "--output", "alias.safetensors", "--overwrite")())[1],
         ("alias.safetensors", "overwrite the input")),
    Case("output folder that is an input model folder",
         lambda: ["--method", "sma", "--models", str(save_sharded(Path("in/hf"), llama_like(3))), M0, "--output", "in/hf/",
                  "--overwrite"], ("--output in/hf/", "overwrite the input")),
    Case("output inside an input series folder",
         lambda: (save_safetensors(Path("in/series/a.safetensors"), llama_like(3)),
                  save_safetensors(Path("in/series/b.safetensors"), llama_like(4)),
                  ["--method", "sma", "--models", "in/series", "--output", "in/series/avg.safetensors"])[2],
         ("in/series/avg.safetensors", "inside the input folder")),
    Case("existing output file without --overwrite",
         lambda: (write("out.safetensors", b"earlier"), flag("sma", "--output", "out.safetensors")())[1],
         ("--output out.safetensors already exists", "--overwrite")),
    Case("existing output folder without --overwrite",
         lambda: (save_sharded(Path("prev"), llama_like(7)), flag("sma", "--output", "prev/")())[1],
         ("--output prev/ already holds a model", "--overwrite")),
    Case("output with an unknown extension", flag("sma", "--output", "merged.bin"), ("--output merged.bin", ".safetensors")),
    Case("output folder where a file is", lambda: (write("block", b"x"), flag("sma", "--output", "block/")())[1],
         ("--output block/", "a file is in the way")),
    Case("output below a file", lambda: (write("plain", b"x"), flag("sma", "--output", "plain/sub/o.safetensors")())[1],
         ("plain",)),
]

ALL_CASES = FILE_CASES + MODEL_CASES + FLAG_CASES + OUTPUT_CASES


@pytest.fixture
def workspace(tmp_path):
    """in/m0 and in/m1: two good models of the same layout; the test's cwd is tmp_path."""
    for i in range(2):
        save_safetensors(tmp_path / "in" / f"m{i}.safetensors", llama_like(i))
    return tmp_path


@pytest.mark.parametrize("case", ALL_CASES, ids=[c.id for c in ALL_CASES])
def test_bad_input_gives_one_error_line_and_changes_nothing(workspace, run, case):
    argv = case.make()
    if "--output" not in argv:
        argv += ["--output", "out/merged.safetensors"]
    before = snapshot(workspace)
    code, out, err = run(*argv)
    assert code == 2, err
    assert out == ""
    one_error(err, *case.culprits)
    assert snapshot(workspace) == before  # no output, no temporary or lock file, inputs and old outputs intact
    assert not os.path.exists(MARKER)  # nothing in a pickle ran


def test_the_pickle_payload_would_run_if_unpickled_plainly(tmp_path):
    """So that the marker's absence above means something."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCode(str(marker))))
    assert marker.exists()


def test_the_suite_covers_at_least_forty_distinct_cases():
    assert len({c.id for c in ALL_CASES}) == len(ALL_CASES) >= 40


# ---------------------------------------------------------------------------------------------------
# inputs that are odd but valid: they merge, and what deserves a word gets one warning line


def float_names(state):
    return [n for n, t in state.items() if t.is_floating_point()]


def test_mixed_dtypes_zero_dim_empty_int_and_bool_tensors_merge(workspace, run):
    states = [llama_like(0, torch.float32), llama_like(1, torch.bfloat16), llama_like(2, torch.float16)]
    paths = [save_safetensors(workspace / "in" / f"mixed{i}.safetensors", s) for i, s in enumerate(states)]
    before = snapshot(workspace / "in")
    code, out, err = run("--method", "sma", "--models", *paths, "--output", "mixed.safetensors", "--quiet")
    assert code == 0, err
    assert err == "" and out == ""
    merged = load(workspace / "mixed.safetensors")
    for name in float_names(states[0]):
        expected = sum(s[name].float() for s in states) / 3
        assert merged[name].dtype == torch.float32 and merged[name].shape == states[0][name].shape, name
        assert torch.equal(merged[name], expected), name
    assert merged["logit_scale"].dim() == 0 and merged["empty"].numel() == 0
    assert torch.equal(merged["position_ids"], states[0]["position_ids"])
    assert torch.equal(merged["mask"], states[0]["mask"])
    assert snapshot(workspace / "in") == before


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_inf_in_a_model_warns_once_naming_the_tensor_and_the_model(workspace, run, value):
    state = llama_like(2)
    state["model.norm.weight"][3] = value
    state["lm_head.weight"][0, 0] = value
    save_safetensors(workspace / "in" / "bad.safetensors", state)
    code, _, err = run("--method", "sma", "--models", M0, "in/bad.safetensors", "--output", "o.safetensors", "--quiet")
    assert code == 0, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: tensor "), lines
    assert "in/bad.safetensors holds NaN or Inf values" in lines[0] and "(and 1 more like it)" in lines[0]
    assert any(name in lines[0] for name in ("model.norm.weight", "lm_head.weight"))
    assert not torch.isfinite(load(workspace / "o.safetensors")["model.norm.weight"][3])


def test_strict_makes_nan_an_error_and_leaves_no_output(workspace, run):
    state = llama_like(2)
    state["model.layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_safetensors(workspace / "in" / "bad.safetensors", state)
    before = snapshot(workspace)
    code, _, err = run("--method", "sma", "--models", M0, "in/bad.safetensors", "--output", "o/", "--strict")
    assert code == 2
    one_error(err, "tensor model.layers.1.mlp.up_proj.weight", "in/bad.safetensors", "NaN or Inf", "--strict")
    assert snapshot(workspace) == before


def test_merged_values_that_overflow_the_output_dtype_warn_and_strict_refuses(workspace, run):
    state = {"w": torch.full((4,), 1e6)}
    paths = [save_safetensors(workspace / "in" / f"big{i}.safetensors", state) for i in range(2)]
    code, _, err = run("--method", "sma", "--models", *paths, "--dtype", "float16", "--output", "h.safetensors", "--quiet")
    assert code == 0
    assert err.strip() == ("warning: tensor w: the merged values are NaN or Inf (overflow in float32 or float16); "
                           "written as they are (--strict makes this an error)")
    code, _, err = run("--method", "sma", "--models", *paths, "--dtype", "float16", "--output", "s.safetensors", "--strict")
    assert code == 2 and "tensor w: the merged values are NaN or Inf" in one_error(err)
    assert not (workspace / "s.safetensors").exists()


def test_all_finite_sees_nan_and_inf_in_every_float_dtype():
    assert merge.all_finite(torch.full((8,), 3e38))  # a sum would overflow; the elements are finite
    assert merge.all_finite(torch.zeros(0))
    assert merge.all_finite(torch.full((8,), 448.0).to(torch.float8_e4m3fn))
    for bad in (float("nan"), float("inf"), float("-inf")):
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e5m2):
            x = torch.ones(1000, dtype=dtype)
            x[777] = bad
            assert not merge.all_finite(x), (bad, dtype)


@pytest.mark.parametrize("argv", [
    ["--method", "linear", "--weights", "1", "-0.5"],  # mergekit allows negative weights (task negation)
    ["--method", "linear", "--weights", "0", "1"],
    ["--method", "linear", "--weights", "1e30", "1e30"],  # finite, and normalised away
    ["--method", "wma", "--weights", "0", "1"],
    ["--method", "ema", "--alpha", "1"],
    ["--method", "karcher", "--weights", "3", "-1"],
    ["--method", "karcher", "--karcher-iter", "0"],
    ["--method", "karcher", "--karcher-iter", "1e30"],  # an upper bound: the iteration stops when it converges
    ["--method", "karcher", "--karcher-tol", "0.999"],
    ["--method", "sma", "--shard-size", "1B", "--output", "tiny/"],  # one tensor per shard
    ["--method", "sma", "--shard-size", "1000000TB", "--output", "huge/"],
    ["--method", "sma", "--seed", str(2**63 - 1)],  # warned: sma is deterministic
], ids=lambda a: " ".join(a[1:]))
def test_edge_values_that_mean_something_are_accepted(workspace, run, argv):
    models = ["--models", M0, M1]
    output = [] if "--output" in argv else ["--output", "o.safetensors"]
    code, _, err = run(*argv, *models, *output, "--quiet")
    assert code == 0, err
    assert all(line.startswith("warning: ") for line in err.strip().splitlines() if line)


def test_passthrough_scale_zero_and_negative_are_accepted(workspace, run):
    for value in ("0", "-2"):
        code, _, err = run("--method", "passthrough", "--models", M0, f"--scale={value}", "--output",
                           f"p{value}.safetensors", "--quiet")
        assert code == 0, err
        merged = load(workspace / f"p{value}.safetensors")
        assert torch.equal(merged["lm_head.weight"], llama_like(0)["lm_head.weight"] * float(value))


def test_huge_linear_weights_that_overflow_float32_give_a_non_finite_warning(workspace, run):
    code, _, err = run("--method", "linear", "--weights", "1e39", "1", "--models", M0, M1, "--output", "o.safetensors",
                       "--quiet")
    assert code == 0
    assert "the merged values are NaN or Inf" in err and len(err.strip().splitlines()) == 1


@pytest.fixture
def toy_base_method(monkeypatch):
    """A method that needs a base, registered for this test only."""
    monkeypatch.setattr(methods, "REGISTRY", dict(methods.REGISTRY))

    @methods.method(name="toy_delta", summary="base + the mean task vector", paper="test", when="test",
                    base=methods.REQUIRED, min_models=1)
    def toy_delta(models, *, base):
        return base + sum(m - base for m in models) / len(models)

    return toy_delta


def test_a_method_that_needs_a_base_refuses_to_run_without_one(workspace, run, toy_base_method):
    before = snapshot(workspace)
    code, _, err = run("--method", "toy_delta", "--models", M0, M1, "--output", "t.safetensors")
    assert code == 2
    one_error(err, "toy_delta needs a base model", "--base")
    assert snapshot(workspace) == before
    code, _, err = run("--method", "toy_delta", "--models", M0, "--base", M1, "--output", "t.safetensors", "--quiet")
    assert code == 0, err
    assert torch.allclose(load(workspace / "t.safetensors")["lm_head.weight"], llama_like(0)["lm_head.weight"], atol=1e-6)


def test_a_base_the_method_does_not_use_is_one_warning(workspace, run):
    save_safetensors(workspace / "in" / "b.safetensors", llama_like(9))
    code, _, err = run("--method", "sma", "--models", M0, M1, "--base", "in/b.safetensors", "--output", "o.safetensors",
                       "--quiet")
    assert code == 0
    assert err.strip().splitlines() == [
        "warning: --base in/b.safetensors is ignored: sma does not use a base model"]


def test_check_storage_refuses_a_tensor_larger_than_its_storage():
    """torch 2.13 refuses such a tensor itself; the check guards versions that do not."""

    class Storage:
        def nbytes(self):
            return 12

    class Forged:  # what a tensor over a 12-byte storage would report
        shape, dtype = (4,), torch.float32

        def numel(self):
            return 4

        def storage_offset(self):
            return 0

        def stride(self):
            return (1,)

        def element_size(self):
            return 4

        def untyped_storage(self):
            return Storage()

    with pytest.raises(io_utils.MergeError, match="x.bin: tensor w needs more bytes than its storage holds"):
        io_utils._check_storage("x.bin", "w", Forged())
    io_utils._check_storage("x.bin", "w", torch.zeros(4)[1:])


def test_overwriting_a_folder_removes_the_old_models_files_but_not_its_neighbours(workspace, run):
    old = save_sharded(workspace / "hf", llama_like(7), shards=3)
    save_bin(old / "pytorch_model.bin", llama_like(7))
    save_safetensors(old / "adapter_model.safetensors", {"lora": torch.ones(2)})
    code, _, err = run("--method", "sma", "--models", M0, M1, "--output", "hf/", "--overwrite", "--quiet")
    assert code == 0, err
    assert sorted(p.name for p in old.iterdir()) == ["README.md", "adapter_model.safetensors", "config.json",
                                                    "model.safetensors"]


# ---------------------------------------------------------------------------------------------------
# faults while running: in-process where a hook suffices


def test_an_input_truncated_after_planning_is_one_error_naming_it(workspace, run, monkeypatch):
    big = {"w": torch.arange(1 << 16, dtype=torch.float32)}
    paths = [save_safetensors(workspace / "in" / f"t{i}.safetensors", big) for i in range(2)]
    planned = merge.plan_merge

    def plan_then_truncate(args, reporter):
        plan = planned(args, reporter)
        os.truncate(paths[1], 1000)
        return plan

    monkeypatch.setattr(merge, "plan_merge", plan_then_truncate)
    code, _, err = run("--method", "sma", "--models", *paths, "--output", "o/")
    assert code == 2
    one_error(err, "in/t1.safetensors", "file ended early")
    assert not (workspace / "o").exists() and temporary_files(workspace) == []


@pytest.mark.parametrize("errno_name", ["ENOSPC", "EIO"])
def test_a_write_error_mid_merge_is_one_error_naming_the_output(workspace, run, monkeypatch, errno_name):
    import errno as errnos

    code_number = getattr(errnos, errno_name)
    calls = []

    def failing_write(self, data):
        calls.append(len(data))
        if len(calls) == 4:
            raise OSError(code_number, os.strerror(code_number))
        os.write(self.fd, data)

    monkeypatch.setattr(io_utils.StreamingWriter, "_write", failing_write)
    code, _, err = run("--method", "sma", "--models", M0, M1, "--output", "deep/er/o.safetensors")
    assert code == 2
    one_error(err, "deep/er/o.safetensors: cannot write the output", os.strerror(code_number))
    assert not (workspace / "deep").exists()


def test_a_failure_while_writing_the_index_keeps_the_previous_folder_output(workspace, run, monkeypatch):
    assert run("--method", "sma", "--models", M0, M1, "--output", "hf/", "--shard-size", "1KB")[0] == 0
    before = snapshot(workspace)

    def no_space(path, content):
        raise OSError(28, os.strerror(28))

    monkeypatch.setattr(io_utils, "_write_synced", no_space)
    code, _, err = run("--method", "wma", "--models", M0, M1, "--output", "hf/", "--shard-size", "1KB", "--overwrite")
    assert code == 2
    one_error(err, "hf/: cannot write the output (No space left on device)")
    assert snapshot(workspace) == before


# ---------------------------------------------------------------------------------------------------
# faults that need a process of their own: one child runs them all, in order, while this process
# watches it (signals, a concurrent run); the tests below then read its results


CHILD = r"""
import contextlib, ctypes, io, json, os, resource, signal, sys, time

spec = json.loads(sys.argv[1])
sys.path.insert(0, spec["root"])


def drop_permission_override():
    # Root with CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH ignores file modes; without them it obeys them.
    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()
    if libc.capget(ctypes.byref(header), data) == 0:
        keep = ~((1 << 1) | (1 << 2)) & 0xFFFFFFFF
        data[0].effective &= keep
        data[0].permitted &= keep
        data[0].inheritable &= keep
        libc.capset(ctypes.byref(header), data)
    try:
        open(spec["probe"], "rb").close()
        return False  # modes do not bite here
    except PermissionError:
        return True


modes_bite = drop_permission_override()
signal.signal(signal.SIGINT, signal.default_int_handler)
import io_utils, merge

current = [0]
original_put = merge.WriteBehind.put
paused = set()


def write_then_pause(self, name, data):
    # Test-only hook: after a pausing run's first block, say so and wait (for a signal, or for "go").
    original_put(self, name, data)
    if spec["runs"][current[0]].get("pause") and current[0] not in paused:
        paused.add(current[0])
        open(os.path.join(spec["control"], f"started-{current[0]}"), "w").close()
        deadline = time.monotonic() + 60
        while not os.path.exists(os.path.join(spec["control"], f"go-{current[0]}")) and time.monotonic() < deadline:
            time.sleep(0.01)


merge.WriteBehind.put = write_then_pause
results = []
for current[0], run in enumerate(spec["runs"]):
    if run.get("unprivileged") and not modes_bite:
        results.append(None)
        continue
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if run.get("fsize"):
        # Ignored SIGXFSZ turns writing past the limit into EFBIG, as a full disk gives ENOSPC.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (run["fsize"], hard))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = merge.main(run["argv"])
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def big_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layers.{k}.weight": torch.randn(256, 256, generator=g) for k in range(4)}  # 1 MiB in all


BIG = ["in/big0.safetensors", "in/big1.safetensors"]
# Files and folders the unprivileged runs find unreadable or unwritable, with those modes.
LOCKED = {"in/m1.safetensors": 0, "in/locked.bin": 0, "in/hf": 0, "in/hf_index/model.safetensors.index.json": 0,
          "in/hf_shard/model-00002-of-00002.safetensors": 0, "in/donor/tokenizer.json": 0, "ro": 0o555, "wo": 0o333}
PERMISSION_RUNS = {
    "unreadable safetensors": (["--models", M0, M1, "--output", "a.safetensors"], ("in/m1.safetensors", "Permission denied")),
    "unreadable .bin": (["--models", M0, "in/locked.bin", "--output", "b.safetensors"],
                        ("in/locked.bin", "cannot read (Permission denied)")),
    "unreadable model folder": (["--models", M0, "in/hf", "--output", "c.safetensors"], ("in/hf", "Permission denied")),
    "unreadable index": (["--models", M0, "in/hf_index", "--output", "d.safetensors"],
                         ("in/hf_index/model.safetensors.index.json", "cannot read (Permission denied)")),
    "unreadable shard": (["--models", M0, "in/hf_shard", "--output", "e.safetensors"],
                         ("in/hf_shard/model-00002-of-00002.safetensors", "Permission denied")),
    "unreadable donor file": (["--models", "in/donor", M0, "--output", "f/"],
                              ("in/donor/tokenizer.json", "cannot copy it into the output (Permission denied)")),
    "read-only output folder, file output": (["--models", M0, "in/donor", "--output", "ro/g.safetensors"],
                                             ("ro", "cannot write the output here (Permission denied)")),
    "read-only output folder, folder output": (["--models", M0, "in/donor", "--output", "ro/"], ("ro", "Permission denied")),
    "missing folders under a read-only one": (["--models", M0, "in/donor", "--output", "ro/new/deeper/h.safetensors"],
                                              ("ro/new/deeper", "Permission denied")),
    "output folder that cannot be listed": (["--models", M0, "in/donor", "--output", "wo/"],
                                            ("wo", "cannot list the output folder")),
}
FULL_DISK_RUNS = {  # 300 KiB may be written per file; each output is 1 MiB
    "overwriting a file": (["--output", "kept.safetensors", "--overwrite"], "kept.safetensors: cannot write the output"),
    "a new nested folder": (["--output", "new/sub/"], "new/sub/: cannot write the output"),
    "a new file": (["--output", "fresh.safetensors"], "fresh.safetensors: cannot write the output"),
}


@dataclass
class ChildSession:
    workspace: Path
    results: dict  # run name -> [exit code, stderr], or None where file modes could not be made to bite
    concurrent: tuple[int, str]  # the in-process run that met the child's lock
    before: dict
    after: dict


def prepare_child_workspace() -> None:
    for i in range(2):
        save_safetensors(Path(f"in/m{i}.safetensors"), llama_like(i))
        save_safetensors(Path(BIG[i]), big_model(i))
    save_bin(Path("in/locked.bin"), llama_like(1))
    for name in ("hf", "hf_index", "hf_shard", "donor"):
        save_sharded(Path("in") / name, llama_like(1))
    write("in/donor/tokenizer.json", b"{}")
    write("probe", b"x")
    os.makedirs("ro")
    os.makedirs("wo")
    assert merge.main(["--method", "sma", "--models", *BIG, "--output", "kept.safetensors", "--quiet"]) == 0


def run_in_process(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        return merge.main(argv), err.getvalue()


@pytest.fixture(scope="module")
def child_session(tmp_path_factory) -> ChildSession:
    workspace, control = tmp_path_factory.mktemp("child"), tmp_path_factory.mktemp("control")
    runs = {f"permission: {name}": {"argv": ["--method", "sma", *argv], "unprivileged": True}
            for name, (argv, _) in PERMISSION_RUNS.items()}
    runs.update({f"full disk: {name}": {"argv": ["--method", "wma", "--models", *BIG, *argv], "fsize": 300 * 1024}
                 for name, (argv, _) in FULL_DISK_RUNS.items()})
    runs["sigint"] = {"argv": ["--method", "sma", "--models", *BIG, "--output", "int/sub/"], "pause": True}
    runs["sigterm"] = {"argv": ["--method", "wma", "--models", *BIG, "--output", "kept.safetensors", "--overwrite"],
                       "pause": True}
    runs["first of two"] = {"argv": ["--method", "sma", "--models", *BIG, "--output", "shared/", "--quiet"],
                            "pause": True}
    names = list(runs)
    cwd = os.getcwd()
    os.chdir(workspace)
    try:
        prepare_child_workspace()
        before = snapshot(workspace)
        for path, mode in LOCKED.items():
            os.chmod(path, mode)
        os.chmod("probe", 0)
        spec = {"root": str(ROOT), "runs": list(runs.values()), "probe": "probe", "control": str(control)}
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        try:
            wait_for(control / f"started-{names.index('sigint')}", child)
            assert temporary_files(workspace)  # caught mid-write: a temporary file and the lock exist
            child.send_signal(signal.SIGINT)
            wait_for(control / f"started-{names.index('sigterm')}", child)
            child.send_signal(signal.SIGTERM)
            first = names.index("first of two")
            wait_for(control / f"started-{first}", child)
            concurrent = run_in_process(["--method", "wma", "--models", *BIG, "--output", "shared/", "--overwrite"])
            (control / f"go-{first}").touch()
            out, err = child.communicate(timeout=120)
        finally:
            if child.poll() is None:
                child.kill()
        assert child.returncode == 0, err
        for path in LOCKED:
            os.chmod(path, before[path][1])
        os.chmod("probe", before["probe"][1])
    finally:
        os.chdir(cwd)
    return ChildSession(workspace, dict(zip(names, json.loads(out))), concurrent, before, snapshot(workspace))


def wait_for(path: Path, child: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, f"the child never wrote {path.name}"
        time.sleep(0.01)


@pytest.mark.parametrize("name", list(PERMISSION_RUNS))
def test_unreadable_inputs_and_unwritable_outputs_are_one_error(child_session, name):
    result = child_session.results[f"permission: {name}"]
    if result is None:
        pytest.skip("file modes do not bite for this user, even without CAP_DAC_OVERRIDE")
    code, err = result
    assert code == 2, err
    one_error(err, *PERMISSION_RUNS[name][1])


@pytest.mark.parametrize("name", list(FULL_DISK_RUNS))
def test_a_full_disk_mid_write_is_one_error_naming_the_output(child_session, name):
    code, err = child_session.results[f"full disk: {name}"]
    assert code == 2, err
    one_error(err, FULL_DISK_RUNS[name][1], "File too large")


def test_sigint_mid_write_exits_130_with_one_line(child_session):
    assert child_session.results["sigint"] == [130, "error: interrupted; no output was written\n"]


def test_sigterm_mid_write_exits_143_with_one_line(child_session):
    assert child_session.results["sigterm"] == [143, "error: interrupted by SIGTERM; no output was written\n"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_completes(child_session):
    code, err = child_session.concurrent
    assert code == 2
    one_error(err, "shared/.merge.lock", "being written by another run")
    assert child_session.results["first of two"] == [0, ""]
    merged = load(child_session.workspace / "shared")
    for name, value in big_model(0).items():
        assert torch.equal(merged[name], (value + big_model(1)[name]) / 2), name


def test_the_child_faults_leave_inputs_and_earlier_outputs_intact_and_no_temporary_file(child_session):
    """Only the completed run's output is new; kept.safetensors survived a full disk and a SIGTERM."""
    new = {k: v for k, v in child_session.after.items() if k not in child_session.before}
    assert sorted(new) == ["shared", "shared/README.md", "shared/model.safetensors"]
    assert {k: child_session.after[k] for k in child_session.before} == child_session.before
