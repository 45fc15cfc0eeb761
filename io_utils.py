"""Checkpoint formats: input resolution, lazy readers, the shard planner and the atomic streaming writer.

This module knows files, headers, bytes and dtypes; it knows nothing of merge math. Every problem a
user can cause is raised as `MergeError` with a one-line message that names the file or tensor.
"""

from __future__ import annotations

import errno
import fcntl
import glob
import json
import math
import os
import re
import secrets
import shutil
import struct
import warnings
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch

Warn = Callable[[str, str], None]  # (kind, message): merge.py collects and prints them once per kind


class MergeError(Exception):
    """A problem the user can fix. Each argument is one message line, printed as `error: <line>`."""

    def __init__(self, *lines: str):
        super().__init__(*lines)
        self.lines = list(lines)

    def __str__(self) -> str:
        return "; ".join(self.lines)


# ---------------------------------------------------------------------------------------------------
# dtypes

SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
}
DTYPE_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
}
FLOAT_DTYPES = frozenset({"float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"})
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# Files the Trainer writes beside checkpoints; they are pickles of optimiser state, not weights.
TRAINER_STATE = re.compile(r"^(optimizer|scheduler|scaler|training_args|rng_state.*)\.(pt|pth|bin)$")
# Never copied with the extra files: weights in any format, shard indexes, and the model card.
NOT_EXTRA = re.compile(
    r"(\.(safetensors|bin|pt|pth|ckpt|h5|msgpack|gguf)|\.index\.json)$|^README\.md$", re.IGNORECASE
)


def torch_dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorInfo:
    """What a header says of one tensor: enough to plan a merge without reading data."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES


# ---------------------------------------------------------------------------------------------------
# readers: one class per file format, each with `infos` (name -> TensorInfo) and `read(name, start, stop)`
# returning the flat element range [start, stop) as a tensor that owns its memory (or maps the file).

MAX_HEADER_BYTES = 100 * 1000 * 1000  # safetensors' own limit


def _pread_exact(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    done = 0
    while done < len(buffer):
        # Linux caps one read at about 2 GiB, so a large tensor takes several.
        try:
            count = os.preadv(fd, [buffer[done:done + (1 << 30)]], offset + done)
        except OSError as err:
            raise MergeError(f"{path}: cannot read ({err.strerror})") from None
        if count == 0:
            raise MergeError(f"{path}: file ended early (truncated or changed while reading)")
        done += count


class SafetensorsFile:
    """A .safetensors file, read with pread into fresh buffers.

    Reading through our own buffers instead of a memory map keeps resident memory at the tensors in
    use: pages of a held map stay counted in RSS until the map is closed.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as err:
            raise MergeError(f"{path}: cannot open ({err.strerror})") from None
        try:
            self.metadata, self.infos, self.offsets = self._parse_header()
        except BaseException:
            os.close(self.fd)
            raise

    def _parse_header(self):
        path = self.path
        size = os.fstat(self.fd).st_size
        if size < 8:
            raise MergeError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        if header_len > size - 8:
            raise MergeError(f"{path}: not a safetensors file or truncated "
                             f"(header length {header_len} exceeds the file size {size})")
        if header_len > MAX_HEADER_BYTES:
            raise MergeError(f"{path}: safetensors header of {header_len} bytes is over the 100 MB limit")
        raw = bytearray(header_len)
        _pread_exact(self.fd, memoryview(raw), 8, path)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):  # also bad UTF-8 and integers too long to convert
            raise MergeError(f"{path}: not a safetensors file (its header is not valid JSON)") from None
        if not isinstance(header, dict):
            raise MergeError(f"{path}: safetensors header is not a JSON object")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise MergeError(f"{path}: safetensors __metadata__ must map names to strings")
        data_start = 8 + header_len
        data_len = size - data_start
        self.size, self.data_start = size, data_start
        infos, offsets = {}, {}
        for name, entry in header.items():
            info, (begin, end) = _header_entry(path, name, entry)
            if end > data_len:
                raise MergeError(f"{path}: tensor {name} lies past the end of the file (truncated?)")
            infos[name] = info
            offsets[name] = (data_start + begin, data_start + end)
        spans = sorted((span, name) for name, span in offsets.items() if span[0] != span[1])
        for (first, first_name), (second, second_name) in zip(spans, spans[1:]):
            if second[0] < first[1]:
                raise MergeError(f"{path}: tensors {first_name} and {second_name} overlap in the file")
        return metadata, infos, offsets

    def storage_order(self) -> list[str]:
        return sorted(self.infos, key=lambda name: self.offsets[name])

    def read(self, name: str, start: int = 0, stop: int | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """Elements [start, stop) of a tensor, read into `into` (a uint8 buffer of their size) or a new buffer."""
        info = self.infos[name]
        stop = info.numel if stop is None else stop
        itemsize = ITEMSIZE[info.dtype]
        buffer = torch.empty((stop - start) * itemsize, dtype=torch.uint8) if into is None else into
        _pread_exact(self.fd, memoryview(buffer.numpy()), self.offsets[name][0] + start * itemsize, self.path)
        return buffer.view(torch_dtype(info.dtype))

    def close(self) -> None:
        os.close(self.fd)


def _header_entry(path: str, name: str, entry) -> tuple[TensorInfo, tuple[int, int]]:
    def bad(what: str) -> MergeError:
        return MergeError(f"{path}: tensor {name}: {what}")

    if not isinstance(entry, dict):
        raise bad("header entry is not an object")
    code, shape, span = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPES:
        raise bad(f"unsupported dtype {code!r}")
    if not isinstance(shape, list) or not all(type(n) is int and n >= 0 for n in shape):
        raise bad(f"invalid shape {shape!r}")
    if (not isinstance(span, list) or len(span) != 2 or not all(type(n) is int for n in span)
            or not 0 <= span[0] <= span[1]):
        raise bad(f"invalid data_offsets {span!r}")
    info = TensorInfo(SAFETENSORS_DTYPES[code], tuple(shape))
    if span[1] - span[0] != info.nbytes:
        raise bad(f"data_offsets span {span[1] - span[0]} bytes, but shape {shape} of {code} needs {info.nbytes}")
    return info, (span[0], span[1])


class TorchFile:
    """A PyTorch pickle (.bin/.pt/.pth/.ckpt), loaded with weights_only=True so that nothing in it runs."""

    def __init__(self, path: str, warn: Warn):
        self.path = path
        state = _torch_load(path)
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise MergeError(f"{path}: not a weights file (it holds a {type(state).__name__}, not a dict of tensors)")
        self.tensors: dict[str, torch.Tensor] = {}
        skipped = []
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                _check_storage(path, name, value)
                self.tensors[str(name)] = value
            else:
                skipped.append(str(name))
        if skipped:
            warn("non-tensor", f"{path}: skipped {len(skipped)} entries that are not tensors ({', '.join(skipped[:3])})")
        self.infos = {}
        for name, tensor in self.tensors.items():
            dtype = dtype_name(tensor.dtype)
            if dtype not in ITEMSIZE:
                raise MergeError(f"{path}: tensor {name}: unsupported dtype {dtype}")
            self.infos[name] = TensorInfo(dtype, tuple(tensor.shape))

    def storage_order(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str, start: int = 0, stop: int | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        """A view of the mapped file (`into` is not used: mapped pages need no buffer)."""
        return self.tensors[name].reshape(-1)[start:stop]

    def close(self) -> None:
        self.tensors.clear()


def _torch_load(path: str):
    import pickle

    _check_container(path)
    # torch warns about pickle protocols it did not write; a file we refuse or accept needs no second line.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
            # Legacy (pre-zip) files cannot be mapped; they load without it.
            return torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        except pickle.UnpicklingError as err:
            raise MergeError(f"{path}: not a plain weights file, so it was not loaded: "
                             f"{_refusal(err)}") from None
        except OSError as err:
            if err.errno is None:  # torch's own complaints about the archive
                raise MergeError(f"{path}: not a PyTorch checkpoint ({_first_line(err)})") from None
            raise MergeError(f"{path}: cannot read ({err.strerror})") from None
        except (RuntimeError, EOFError, ValueError, KeyError, TypeError, AttributeError, IndexError,
                struct.error, zipfile.BadZipFile) as err:
            raise MergeError(f"{path}: not a PyTorch checkpoint ({_first_line(err)})") from None


ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80  # the first opcode of every pickle of protocol 2 or later, as torch.save writes


def _check_container(path: str) -> None:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle); anything else is refused unread."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
    except OSError as err:
        raise MergeError(f"{path}: cannot read ({err.strerror})") from None
    if not head:
        raise MergeError(f"{path}: not a PyTorch checkpoint (the file is empty)")
    if head != ZIP_MAGIC and head[0] != PICKLE_PROTO:
        raise MergeError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")


def _refusal(err: BaseException) -> str:
    """What the weights-only unpickler refused, from its long advice text."""
    text = str(err)
    called = re.search(r"GLOBAL (\S+?)\.? ", text)
    if called:
        return f"loading it would call {called.group(1)}"
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    return f"its pickle does what a weights file does not need ({detail.group(1).strip() if detail else _first_line(err)})"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


def _check_storage(path: str, name: str, tensor: torch.Tensor) -> None:
    """A forged zip can declare a storage smaller than its tensors; reading past it must not happen."""
    if tensor.numel() == 0:
        return
    last = tensor.storage_offset() + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride()))
    if (last + 1) * tensor.element_size() > tensor.untyped_storage().nbytes():
        raise MergeError(f"{path}: tensor {name} needs more bytes than its storage holds (corrupt file)")


# ---------------------------------------------------------------------------------------------------
# models: one or more files seen as one name -> tensor map


class Model:
    """One checkpoint: a single file, or a folder of shards joined by an index."""

    def __init__(self, label: str, files: list, index: dict[str, int], folder: str | None):
        self.label = label  # the path as the user wrote it (or as a folder expanded it)
        self.files = files
        self.index = index  # tensor name -> position in files
        self.folder = folder  # where config.json and tokenizer files live, if anywhere
        self.infos: dict[str, TensorInfo] = {name: files[i].infos[name] for name, i in index.items()}

    @property
    def paths(self) -> list[str]:
        return [f.path for f in self.files]

    def storage_order(self) -> list[str]:
        """Tensor names in the order their bytes lie on disk, so that reads run sequentially."""
        return [name for f in self.files for name in f.storage_order() if name in self.index]

    def read(self, name: str, start: int = 0, stop: int | None = None, into: torch.Tensor | None = None) -> torch.Tensor:
        return self.files[self.index[name]].read(name, start, stop, into)

    def buffered(self, name: str) -> bool:
        """Whether `read` fills a buffer of ours (safetensors) rather than returning a view of a mapping."""
        return isinstance(self.files[self.index[name]], SafetensorsFile)

    @property
    def nbytes(self) -> int:
        return sum(info.nbytes for info in self.infos.values())

    def close(self) -> None:
        for f in self.files:
            f.close()


def open_file(path: str, warn: Warn):
    if path.endswith(".safetensors"):
        return SafetensorsFile(path)
    return TorchFile(path, warn)


def open_model(path: str, label: str, warn: Warn) -> Model:
    """A weight file, or a folder holding one model (single file or index + shards)."""
    if os.path.isfile(path):
        f = open_file(path, warn)
        return Model(label, [f], dict.fromkeys(f.infos, 0), os.path.dirname(path) or ".")
    for name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.isfile(os.path.join(path, name)):
            return _open_sharded(os.path.join(path, name), label, warn)
    for name in ("model.safetensors", "pytorch_model.bin"):
        if os.path.isfile(os.path.join(path, name)):
            f = open_file(os.path.join(path, name), warn)
            return Model(label, [f], dict.fromkeys(f.infos, 0), path)
    indexes = sorted(glob.glob(os.path.join(glob.escape(path), "*.index.json")))
    if indexes:
        return _open_sharded(indexes[0], label, warn)
    raise MergeError(f"{label}: no model weights in this folder")


def _open_sharded(index_path: str, label: str, warn: Warn) -> Model:
    folder = os.path.dirname(index_path)
    try:
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle)["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError
    except OSError as err:
        raise MergeError(f"{index_path}: cannot read ({err.strerror})") from None
    except (ValueError, KeyError, TypeError, RecursionError):
        raise MergeError(f"{index_path}: not a shard index (needs a \"weight_map\" of tensor names to files)") from None
    shard_names = sorted(set(weight_map.values()))
    files, position = [], {}
    try:
        for shard in shard_names:
            shard_path = os.path.join(folder, shard)
            if os.path.basename(shard) != shard or not os.path.isfile(shard_path):
                raise MergeError(f"{index_path}: shard {shard!r} does not exist")
            position[shard] = len(files)
            files.append(open_file(shard_path, warn))
        index = {}
        for name, shard in weight_map.items():
            if name not in files[position[shard]].infos:
                raise MergeError(f"{index_path}: tensor {name} is not in its shard {shard}")
            index[name] = position[shard]
    except BaseException:
        for f in files:
            f.close()
        raise
    return Model(label, files, index, folder)


# ---------------------------------------------------------------------------------------------------
# input resolution: paths, folders of checkpoints and globs become a list of model paths in merge order


def is_model_folder(path: str) -> bool:
    names = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any(os.path.isfile(os.path.join(path, n)) for n in names) or bool(
        glob.glob(os.path.join(glob.escape(path), "*.index.json")))


def natural_key(name: str):
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name)]


def sort_names(names: Iterable[str], natural: bool) -> list[str]:
    return sorted(names, key=natural_key) if natural else sorted(names)


def expand_series(folder: str, natural: bool) -> list[str]:
    """The checkpoints of a folder that holds several: weight files, or subfolders holding one model each."""
    try:
        entries = [e for e in os.listdir(folder) if not e.startswith(".")]
    except OSError as err:
        raise MergeError(f"{folder}: cannot list this folder ({err.strerror})") from None
    files = [e for e in entries if os.path.isfile(os.path.join(folder, e))]
    found = [e for e in files if e.endswith(".safetensors")]
    if not found:
        found = [e for e in files if e.endswith(WEIGHT_SUFFIXES) and not TRAINER_STATE.match(e)]
    if not found:
        found = [e for e in entries
                 if os.path.isdir(os.path.join(folder, e)) and is_model_folder(os.path.join(folder, e))]
    return [os.path.join(folder, name) for name in sort_names(found, natural)]


def has_glob(path: str) -> bool:
    return any(ch in path for ch in "*?[")


def resolve_input(path: str, natural: bool) -> list[str] | None:
    """The model paths one argument stands for, in merge order; None when it is a single model."""
    if os.path.isdir(path):
        return None if is_model_folder(path) else expand_series(path, natural)
    if os.path.exists(path):
        if not path.endswith(WEIGHT_SUFFIXES):
            raise MergeError(f"{path}: not a checkpoint (expected .safetensors, .bin, .pt, .pth or .ckpt)")
        if not os.path.isfile(path):  # a pipe or a device would block or never end
            raise MergeError(f"{path}: not a regular file")
        return None
    try:
        os.stat(path)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise MergeError(f"{path}: symbolic link loop ({err.strerror})") from None
        if err.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise MergeError(f"{path}: cannot open ({err.strerror})") from None
    except ValueError:  # a NUL byte in the name
        raise MergeError(f"{path!r}: not a valid path") from None
    if os.path.islink(path):
        raise MergeError(f"{path}: broken symbolic link")
    if has_glob(path):
        matches = [m for m in glob.glob(path) if not os.path.basename(m).startswith(".")
                   and (os.path.isdir(m) or m.endswith(WEIGHT_SUFFIXES))]
        if not matches:
            raise MergeError(f"{path}: no checkpoint matches this pattern")
        return sort_names(matches, natural)
    raise MergeError(f"{path}: no such file or folder")


# ---------------------------------------------------------------------------------------------------
# output planning: a pure function of the output tensors' names, dtypes and shapes

SHARD_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    """'5GB' -> 5e9 bytes (decimal units as Hugging Face uses; KiB/MiB/GiB are binary)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in SHARD_UNITS:
        raise ValueError(text)
    size = int(float(match.group(1)) * SHARD_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(text)
    return size


def plan_shards(entries: Sequence[tuple[str, TensorInfo]], max_bytes: int) -> list[list[str]]:
    """Greedy packing in the given order; a tensor over the limit gets a shard of its own.

    Within each shard the tensors are then ordered by element size, largest first, keeping the given
    order otherwise: with no gaps allowed between tensors, that keeps every tensor aligned to its
    element size, which zero-copy loaders need.
    """
    shards: list[list[tuple[str, TensorInfo]]] = [[]]
    used = 0
    for name, info in entries:
        if shards[-1] and used + info.nbytes > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, info))
        used += info.nbytes
    return [[name for name, info in sorted(shard, key=lambda e: -ITEMSIZE[e[1].dtype])] for shard in shards]


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def safetensors_header(entries: Sequence[tuple[str, TensorInfo]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, info in entries:
        header[name] = {"dtype": DTYPE_CODES[info.dtype], "shape": list(info.shape),
                        "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


# ---------------------------------------------------------------------------------------------------
# output: lock, temporary files, streaming writes, atomic commit


@dataclass(frozen=True)
class OutputTarget:
    folder: str  # where every output file goes
    weights_name: str | None  # the single file's name, or None for a Hugging Face folder
    lock_name: str

    @property
    def is_folder(self) -> bool:
        return self.weights_name is None


def output_target(path: str) -> OutputTarget:
    if path.endswith(os.sep) or path.endswith("/") or os.path.isdir(path):
        folder = os.path.normpath(path)
        return OutputTarget(folder, None, ".merge.lock")
    if path.endswith(".safetensors"):
        name = os.path.basename(path)
        return OutputTarget(os.path.dirname(path) or ".", name, f".{name}.lock")
    raise MergeError(f"--output {path}: name a .safetensors file (one file) or a folder ending in / "
                     "(a Hugging Face model folder)")


# The weight files and indexes a Hugging Face model folder holds: what an earlier output consists of.
MODEL_FOLDER_WEIGHTS = re.compile(r"(model|pytorch_model)(-\d+-of-\d+)?\.(safetensors|bin)(\.index\.json)?")


def existing_weights(folder: str) -> list[str]:
    """Weight files and indexes of an earlier output in this folder."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return []
    except OSError as err:
        raise MergeError(f"{folder}: cannot list the output folder ({err.strerror})") from None
    return sorted(n for n in names if n.endswith((".safetensors", ".index.json"))
                  or re.fullmatch(r"pytorch_model.*\.bin", n))


class OutputLock:
    """An exclusive lock on one output, so that two runs never write the same files at once.

    It creates the output's folder (and missing parents) and, when the run fails, removes the folders
    it created if they are still empty: a failed run leaves nothing behind.
    """

    def __init__(self, target: OutputTarget):
        self.folder = target.folder
        self.path = os.path.join(target.folder, target.lock_name)
        self.fd: int | None = None
        self.created: list[str] = []

    def __enter__(self) -> OutputLock:
        folder = os.path.abspath(self.folder)
        while not os.path.isdir(folder):
            self.created.append(folder)
            folder = os.path.dirname(folder)
        try:
            os.makedirs(self.folder, exist_ok=True)
            self._lock()
        except OSError as err:
            self._remove_created()
            raise MergeError(f"{self.folder}: cannot write the output here ({err.strerror})") from None
        except BaseException:
            self._remove_created()
            raise
        return self

    def _lock(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise MergeError(f"{self.path}: the output is being written by another run") from None
            # The holder before us may have removed the lock file after we opened it: retry on a live one.
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    self.fd = fd
                    return
            except FileNotFoundError:
                pass
            os.close(fd)

    @staticmethod
    def held_elsewhere(target: OutputTarget) -> bool:
        """Whether another run holds this output's lock now (nothing is created to find out)."""
        try:
            fd = os.open(os.path.join(target.folder, target.lock_name), os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def __exit__(self, kind, error, trace) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        if kind is not None:
            self._remove_created()

    def _remove_created(self) -> None:
        for folder in self.created:  # innermost first
            try:
                os.rmdir(folder)
            except OSError:
                break


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: str, content: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(content)
        handle.flush()
        os.fsync(handle.fileno())


def _copy_synced(source: str, path: str) -> None:
    try:
        original = open(source, "rb")
    except OSError as err:  # named here: the output's own errors are reported by the writer
        raise MergeError(f"{source}: cannot copy it into the output ({err.strerror})") from None
    with original, open(path, "xb") as handle:
        shutil.copyfileobj(original, handle)
        handle.flush()
        os.fsync(handle.fileno())


def _temp_name(folder: str, name: str, token: str) -> str:
    return os.path.join(folder, f".{name}.{token}.tmp")


class StreamingWriter:
    """Writes the planned tensors in plan order into temporary files; `commit` renames them into place.

    Headers are written first (shapes and dtypes are known from the plan), then tensor bytes as they
    arrive, so the merged model is never held in memory. Until `commit`, nothing carries an output
    name; `abort` removes every temporary file.
    """

    def __init__(self, target: OutputTarget, shards: list[list[tuple[str, TensorInfo]]],
                 metadata: dict[str, str], extra_files: dict[str, bytes | str]):
        self.target = target
        self.token = secrets.token_hex(4)
        self.names = [target.weights_name] if target.weights_name else shard_file_names(len(shards))
        self.shards = shards
        self.metadata = metadata
        self.extra_files = extra_files  # output name -> bytes to write, or a source path to copy
        self.temps: dict[str, str] = {}  # final name -> temporary path
        self.queue = [(shard, name, info) for shard, entries in enumerate(shards) for name, info in entries]
        self.position = 0  # index into queue of the tensor being written
        self.remaining = self.queue[0][2].nbytes if self.queue else 0
        self.fd: int | None = None
        self.written = 0

    @contextmanager
    def _reporting_os_errors(self) -> Iterator[None]:
        """Disk full, file too large, read-only or vanished folder: one line naming the output."""
        try:
            yield
        except OSError as err:
            raise MergeError(f"{self.label}: cannot write the output ({err.strerror})") from None

    @property
    def label(self) -> str:
        return os.path.join(self.target.folder, self.target.weights_name or "")

    def open(self) -> None:
        with self._reporting_os_errors():
            self._open_shard(0)

    def _open_shard(self, shard: int) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
        name = self.names[shard]
        path = _temp_name(self.target.folder, name, self.token)
        self.temps[name] = path
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self._write(memoryview(safetensors_header(self.shards[shard], self.metadata)))
        self.current_shard = shard

    def _write(self, data: memoryview) -> None:
        while data:
            count = os.write(self.fd, data[: 1 << 30])
            data = data[count:]

    def expect(self) -> str | None:
        return self.queue[self.position][1] if self.position < len(self.queue) else None

    def write(self, name: str, data: torch.Tensor) -> None:
        """The next bytes of tensor `name`, which must be the tensor the plan puts next."""
        shard, expected, info = self.queue[self.position]
        if name != expected:
            raise RuntimeError(f"writer expected {expected}, got {name}")
        raw = data.detach().contiguous().reshape(-1).view(torch.uint8)
        if raw.numel() > self.remaining:
            raise RuntimeError(f"{name}: {raw.numel()} bytes written where {self.remaining} were left")
        with self._reporting_os_errors():
            if shard != self.current_shard:
                self._open_shard(shard)
            self._write(memoryview(raw.numpy()))
        self.remaining -= raw.numel()
        self.written += raw.numel()
        if self.remaining == 0:  # this tensor is complete (an empty one with its single empty write)
            self.position += 1
            if self.position < len(self.queue):
                self.remaining = self.queue[self.position][2].nbytes

    def commit(self, overwrite: bool) -> list[str]:
        """Finish every file, rename them into place (the index or the single weights file last).

        Returns the names of stale weight files of an earlier output that were removed.
        """
        with self._reporting_os_errors():
            return self._commit(overwrite)

    def _commit(self, overwrite: bool) -> list[str]:
        if self.position < len(self.queue):
            raise RuntimeError(f"writer closed before {self.queue[self.position][1]} was written")
        for shard in range(self.current_shard + 1, len(self.shards)):  # shards that hold only empty tensors
            self._open_shard(shard)
        os.fsync(self.fd)
        os.close(self.fd)
        self.fd = None
        folder = self.target.folder
        before = existing_weights(folder) if self.target.is_folder else []
        for name, content in self.extra_files.items():
            path = _temp_name(folder, name, self.token)
            self.temps[name] = path
            if isinstance(content, bytes):
                _write_synced(path, content)
            else:
                _copy_synced(content, path)
        index_name = None
        if self.target.is_folder and len(self.names) > 1:
            index_name = "model.safetensors.index.json"
            weight_map = {name: self.names[shard] for shard, entries in enumerate(self.shards) for name, _ in entries}
            total = sum(info.nbytes for entries in self.shards for _, info in entries)
            index = json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
            path = _temp_name(folder, index_name, self.token)
            self.temps[index_name] = path
            _write_synced(path, index.encode("utf-8"))
        last = index_name or self.names[0]
        for name in [n for n in self.temps if n != last] + [last]:
            if not overwrite and os.path.exists(os.path.join(folder, name)) and name in self.names + [index_name]:
                raise MergeError(f"{os.path.join(folder, name)}: appeared while merging; not overwritten")
            os.replace(self.temps[name], os.path.join(folder, name))
        self.temps.clear()
        _fsync_folder(folder)
        # Only the old model's own files: an adapter or a user's file beside it is not ours to delete.
        stale = [n for n in before if n not in self.names and n != index_name and MODEL_FOLDER_WEIGHTS.fullmatch(n)]
        for name in stale:
            os.unlink(os.path.join(folder, name))
        if stale:
            _fsync_folder(folder)
        return stale

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        for path in self.temps.values():
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self.temps.clear()


def complete_output(path: str) -> str | None:
    """What makes `path` a complete output (a sound single file, or an index whose shards all are), or None."""

    def sound(file_path: str) -> SafetensorsFile | None:
        try:
            f = SafetensorsFile(file_path)
        except MergeError:
            return None
        f.close()
        return f if f.size == max([stop for _, stop in f.offsets.values()] + [f.data_start]) else None

    if path.endswith(".safetensors") and os.path.isfile(path):
        return "a complete safetensors file" if sound(path) else None
    if not os.path.isdir(path):
        return None
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index, encoding="utf-8") as handle:
                weight_map = json.load(handle)["weight_map"]
            shards = {}
            for name, shard in weight_map.items():
                if shard not in shards:
                    shards[shard] = sound(os.path.join(path, shard))
                if shards[shard] is None or name not in shards[shard].infos:
                    return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return f"an index and its {len(shards)} shards"
    single = os.path.join(path, "model.safetensors")
    return "a complete model.safetensors" if os.path.isfile(single) and sound(single) else None


def extra_files(folder: str | None, skip: Iterable[str] = ()) -> dict[str, str]:
    """Non-weight files of a donor folder (config, tokenizer, generation config): name -> path."""
    if folder is None or not os.path.isdir(folder):
        return {}
    skip = set(skip)
    found = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or name in skip or NOT_EXTRA.search(name) or not os.path.isfile(path):
            continue
        found[name] = path
    return found


def iter_blocks(numel: int, block: int) -> Iterator[tuple[int, int]]:
    """[start, stop) element ranges covering a tensor; one empty range for an empty tensor."""
    if numel == 0:
        yield 0, 0
        return
    for start in range(0, numel, block):
        yield start, min(start + block, numel)


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()
