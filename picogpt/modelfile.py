"""model.dat: picogpt's weight file. The only module that knows its byte layout.

One flat file per model, made to be memory-mapped: opening it reads a few kilobytes of header and maps
the rest, so a 124M model opens in milliseconds and processes that open the same file share one copy
in the page cache.

Layout (integers little-endian):

    offset  bytes  field
    0       8      magic b"PICOGPT\\0"
    8       4      format version, uint32 (1: every tensor float32; 2: the weight matrices may be bfloat16;
                   3: they may be int8, with their scales)
    12      4      header length H, uint32; 64 + H is a multiple of 64
    16      8      file size in bytes, uint64 (a truncated or extended copy is caught before any read)
    24      32     SHA-256 of bytes [64, file size): the header and all tensor data (checked on demand)
    56      8      reserved, zero
    64      H      header: UTF-8 JSON, padded with spaces
    64 + H  ...    tensor data; every tensor starts at a multiple of 64

The JSON header describes the file completely:

    {"hparams": {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12,
                 "layer_norm_epsilon": 1e-05},
     "tensors": [{"name": "wte", "dtype": "<f4", "shape": [50257, 768], "order": "F",
                  "offset": 4096, "nbytes": 154389504}, ...]}

Tensor names are OpenAI's checkpoint names without the "model/" prefix (`wte`, `wpe`, `h0/ln_1/g`,
`h0/attn/c_attn/w`, ..., `ln_f/b`); picogpt.tensors.gpt2_tensor_specs lists them all with their shapes.
Every tensor is little-endian float32 ("<f4"), except that a version-2 file may hold the weight matrices
(`wte` and every `.../w`, see tensors.is_matrix) as bfloat16 ("bf16": the upper 16 bits of the float32,
rounded to nearest even; half the bytes, 8 bits of mantissa). Layer norms, biases and `wpe` stay float32.
A version-3 file holds them as int8 instead ("i8", picogpt.int8: symmetric, one float32 scale per output
unit), each followed by its scales, `NAME.scale` ([n_out] float32), and stored output-major (a linear
weight in "F" order, `wte` in "C"), the layout an int8 product reads fastest (the shared performance
notes: 2x at one row). An int8 matrix's table entry records its quantization error, "error": ‖w − scale·q‖
/ ‖w‖ of the float32 weights it came from, which conversion reports and `picogpt verify` shows.
A float32-only file is written as version 1, byte for byte as before, so older readers still read it.
Tensors are stored in the layout the engine multiplies with, so loading transposes, casts and copies
nothing:

- Linear weights are [n_in, n_out], C order, so a layer is `x @ w + b` (the checkpoint's leading 1 of
  its conv1d weights is dropped).
- `wte` [n_vocab, n_embd] is stored in Fortran (column-major) order. The token lookup `wte[ids]` reads
  a few strided rows, while the output projection `x @ wte.T` then multiplies by a contiguous
  [n_embd, n_vocab] matrix, which BLAS's matrix-vector product reads about 1.4x faster than the
  row-major table (see the shared performance notes).
"""

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import bfloat16, int8
from .errors import PicogptError, plural
from .outputs import not_a_file, replace_onto, temp_file_beside
from .hints import picogpt_command
from .tensors import check_hparams, gpt2_tensor_specs, is_matrix, output_axis

MAGIC = b"PICOGPT\0"
VERSION = 3  # the newest this module reads and writes; float32-only files are still written as 1
PREAMBLE = struct.Struct("<8sIIQ32s8x")  # magic, version, header length, file size, sha256
ALIGN = 64
DTYPE = "<f4"
BF16 = "bf16"
I8 = "i8"
WEIGHT_DTYPES = {"f32": DTYPE, "bf16": BF16, "int8": I8}  # what --dtype accepts -> the header's name
FILE_VERSIONS = {DTYPE: 1, BF16: 2, I8: 3}  # the oldest format that holds matrices of each type
SCALE = ".scale"  # an int8 matrix's scales: "h0/mlp/c_fc/w.scale"
_NO_ERROR = f"{0.0:.5e}"  # an int8 entry's "error" until it is written (always this width: the header keeps its size)


# bfloat16 as its bit patterns (picogpt.bfloat16)
_NUMPY_DTYPES = {DTYPE: np.dtype(DTYPE), BF16: np.dtype("<u2"), I8: np.dtype("i1")}


def remake_hint_default():
    """What to do about a damaged model file of unknown origin (store.py gives a named model's own hint)."""
    return (f"convert its checkpoint again (see {picogpt_command('convert-tf', '--help')} or "
            f"{picogpt_command('convert-hf', '--help')})")


_ITEMSIZE = {DTYPE: 4, BF16: 2, I8: 1}


def _specs(hparams, weight_dtype):
    """{name: (shape, order, dtype)} of every tensor a file of these hparams and weight type holds, in file
    order: int8 matrices output-major (the other order) and each followed by its scales."""
    specs = {}
    for name, (shape, order) in gpt2_tensor_specs(hparams).items():
        if not is_matrix(name) or weight_dtype == DTYPE:
            specs[name] = (shape, order, DTYPE)
        elif weight_dtype == BF16:
            specs[name] = (shape, order, BF16)
        else:
            specs[name] = (shape, "C" if output_axis(name) == 0 else "F", I8)  # rows = output units on disk
            specs[name + SCALE] = ((shape[output_axis(name)],), "C", DTYPE)  # one per output unit
    return specs


def _align(n):
    return -(-n // ALIGN) * ALIGN


def _layout(hparams, weight_dtype=DTYPE, errors=None):
    """The JSON header (bytes, padded) and the tensor table with offsets, for these hparams, the weight
    matrices stored as weight_dtype ("<f4", "bf16" or "i8")."""
    table = [{"name": name, "dtype": dtype, "shape": list(shape), "order": order, "offset": 0,
              "nbytes": _ITEMSIZE[dtype] * math.prod(shape), **({"error": _NO_ERROR} if dtype == I8 else {})}
             for name, (shape, order, dtype) in _specs(hparams, weight_dtype).items()]
    for entry in table if errors else ():  # the writer's table, with the errors it measured
        if "error" in entry:
            entry["error"] = errors[entry["name"]]["error"]

    def encode():
        return json.dumps({"hparams": hparams, "tensors": table}, separators=(",", ":")).encode()

    # Offsets depend on the header's length, which depends on the offsets' digits: iterate to a fixpoint.
    header_len = 0
    while True:
        offset = _align(PREAMBLE.size + header_len)
        for entry in table:
            entry["offset"] = offset
            offset = _align(offset + entry["nbytes"])
        header = encode()
        if _align(PREAMBLE.size + len(header)) == _align(PREAMBLE.size + header_len):
            break
        header_len = len(header)
    padded = header + b" " * (_align(PREAMBLE.size + len(header)) - PREAMBLE.size - len(header))
    file_size = table[-1]["offset"] + table[-1]["nbytes"]
    return padded, {e["name"]: e for e in table}, file_size


class ModelFileWriter:
    """Write a model.dat atomically, one tensor at a time (a 1558M model is never held twice).

        with ModelFileWriter("models/124M/model.dat", hparams) as out:
            for name, array in tensors:
                out.write(name, array)

    Data goes to a hidden temporary file in the same folder, which is renamed over `path` only after
    every tensor is written, checksummed and synced. Any exception, Ctrl-C included, deletes it, so a
    model.dat that exists is always complete.
    """

    def __init__(self, path, hparams, weight_dtype="f32"):
        self.path = Path(path)
        self.hparams = check_hparams(hparams, str(path), "check the hyper-parameters given to the writer")
        if weight_dtype not in WEIGHT_DTYPES:
            raise PicogptError(f"unknown weight dtype {weight_dtype!r}; choose one of {', '.join(WEIGHT_DTYPES)}")
        self.weight_dtype = WEIGHT_DTYPES[weight_dtype]
        self.version = FILE_VERSIONS[self.weight_dtype]
        self.header, self.table, self.file_size = _layout(self.hparams, self.weight_dtype)
        self.written = set()
        self.file = None

    def __enter__(self):
        kind = not_a_file(self.path)
        if kind is not None:  # written in place (seek, fallocate) and mapped when read: only a regular file
            raise PicogptError(f"{self.path} is {kind}, not a file: a model.dat is written in place and read back "
                               f"by mapping it, so it needs a regular file; give a file name")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, self.tmp_path = temp_file_beside(self.path, ".partial")
        except OSError as e:
            raise PicogptError(f"cannot write in {self.path.parent}: {e.strerror}; choose a writable folder") from e
        self.file = os.fdopen(fd, "w+b")
        try:
            if hasattr(os, "posix_fallocate"):  # fail now, not after minutes of writing, if the disk is full
                os.posix_fallocate(fd, 0, self.file_size)
            self.file.write(PREAMBLE.pack(MAGIC, self.version, len(self.header), self.file_size, bytes(32)))
            self.file.write(self.header)
        except BaseException as e:
            self._discard()
            raise self._os_error(e)
        return self

    def write(self, name, array):
        entry = self.table.get(name)
        if entry is None or name.endswith(SCALE):  # an int8 matrix's scales are written with it
            raise ValueError(f"{name!r} is not a tensor of this model")
        if name in self.written:
            raise ValueError(f"tensor {name!r} written twice")
        array = np.asarray(array)
        if array.shape != tuple(entry["shape"]):
            raise PicogptError(f"tensor {name} has shape {list(array.shape)} but the hyper-parameters say "
                               f"{entry['shape']}; the checkpoint and its hparams.json disagree")
        if not np.isfinite(array).all():
            raise PicogptError(f"tensor {name} contains NaN or infinite values; the checkpoint is damaged")
        # Fortran order on disk is the C-order bytes of the transpose.
        data = array.T if entry["order"] == "F" else array
        if entry["dtype"] == I8:  # rows of `data` are the output units (the order was chosen so)
            data, scale = int8.quantize_rows(data)
            entry["error"] = f"{int8.relative_error(array.T if entry['order'] == 'F' else array, data, scale):.5e}"
            self._write_at(self.table[name + SCALE], scale)
            self.written.add(name + SCALE)
        elif entry["dtype"] == BF16:  # rounded to nearest even; a value beyond bfloat16's range would be inf
            data = np.ascontiguousarray(bfloat16.round_to_bfloat16(data), dtype="<u2")
            if not bfloat16.isfinite(data).all():
                raise PicogptError(f"tensor {name} has values beyond bfloat16's range (about 3.4e38); "
                                   f"keep this model in float32 (--dtype f32)")
        else:
            data = np.ascontiguousarray(data, dtype=DTYPE)
        self._write_at(entry, data)
        self.written.add(name)

    def _write_at(self, entry, data):
        try:
            self.file.seek(entry["offset"])
            self.file.write(np.ascontiguousarray(data).data)
        except OSError as e:
            raise self._os_error(e)

    def _os_error(self, e):
        if isinstance(e, OSError):
            return PicogptError(f"cannot write {self.path}: {e.strerror or e}; free space "
                                f"({self.file_size / 1e6:.0f} MB needed) or choose another folder")
        return e

    def _discard(self):
        self.file.close()
        self.tmp_path.unlink(missing_ok=True)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self._discard()
            return False
        try:
            missing = [name for name in self.table if name not in self.written]
            if missing:
                raise PicogptError(f"the checkpoint lacks {plural(len(missing), 'tensor')} of this model, "
                                   f"e.g. {missing[0]}; it is incomplete or not a GPT-2 checkpoint")
            self.file.truncate(self.file_size)
            if self.weight_dtype == I8:  # the quantization errors, now known, in a header of the same length
                header, _, _ = _layout(self.hparams, self.weight_dtype, errors=self.table)
                assert len(header) == len(self.header)
                self.file.seek(PREAMBLE.size)
                self.file.write(header)
            self.file.flush()
            digest = _sha256_from(self.file, PREAMBLE.size)
            self.file.seek(0)
            self.file.write(PREAMBLE.pack(MAGIC, self.version, len(self.header), self.file_size, digest))
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            replace_onto(self.tmp_path, self.path)
        except BaseException as e:
            self._discard()
            raise self._os_error(e) from e
        return False


def _sha256_from(file, offset):
    """SHA-256 of an open file's bytes from `offset` to its end, read in 16 MiB chunks."""
    file.seek(offset)
    digest = hashlib.sha256()
    while chunk := file.read(1 << 24):
        digest.update(chunk)
    return digest.digest()


@dataclass
class ModelFile:
    """An opened model.dat: hyper-parameters and read-only arrays mapped from the file (float32, and
    bfloat16 matrices as uint16 bit patterns)."""
    path: Path
    hparams: dict
    tensors: dict  # name -> np.ndarray (a view into the memory map; nothing is read until used); bfloat16
    #                matrices are uint16 bit patterns (picogpt.bfloat16)
    sha256: bytes  # the checksum stored in the file
    remake_hint: str = ""  # what a message about damage tells the user to do
    weight_dtype: str = "f32"  # how the weight matrices are stored: "f32", "bf16" or "int8"
    quantization_errors: dict = None  # int8 files: matrix name -> ‖w − scale·q‖ / ‖w‖ (the header's "error")

    def float32_tensors(self):
        """(name, float32 array) of every tensor, matrices widened (bfloat16 exactly, int8 as scale·q), one
        at a time; an int8 matrix's scales are folded into it."""
        for name, tensor in self.tensors.items():
            if name.endswith(SCALE):
                continue
            if tensor.dtype == np.uint16:
                yield name, bfloat16.widen(tensor)
            elif tensor.dtype == np.int8:
                yield name, int8.widen(tensor, self.tensors[name + SCALE], output_axis(name))
            else:
                yield name, tensor

    def quantization_summary(self):
        """One line on an int8 file's weights against the float32 ones they came from, or None."""
        if not self.quantization_errors:
            return None
        worst = max(self.quantization_errors, key=self.quantization_errors.get)
        errors = np.array(list(self.quantization_errors.values()))
        return (f"int8 weights: {np.median(errors):.2%} error (median over {len(errors)} matrices, "
                f"‖w − scale·q‖ / ‖w‖), at most {errors.max():.2%} ({worst})")

    def verify(self):
        """Hash the whole file against the stored checksum and scan every tensor for NaN or infinity;
        raise PicogptError naming the first problem. Reads the whole file (about 0.5 s for 124M)."""
        with open(self.path, "rb") as f:
            actual = _sha256_from(f, PREAMBLE.size)
        if actual != self.sha256:
            raise PicogptError(f"{self.path}: checksum mismatch, the file is damaged; {self.remake_hint}")
        for name, array in self.tensors.items():  # a file written by other software may hash fine but hold NaN
            finite = bfloat16.isfinite(array) if array.dtype == np.uint16 else np.isfinite(array)
            if not finite.all():
                raise PicogptError(f"{self.path}: tensor {name} contains NaN or infinite values; {self.remake_hint}")


def open_model_file(path, remake_hint=None):
    """Map a model.dat, checking everything about its structure before any tensor is touched.

    remake_hint: what messages about a damaged file tell the user to do (default: convert it again)."""
    path = Path(path)
    remake_hint = remake_hint or remake_hint_default()
    if not path.exists():
        raise PicogptError(f"model file {path} does not exist; give the path of a model.dat, or create one with "
                           f"{picogpt_command('convert-tf')} (GPT-2 124M) or {picogpt_command('convert-hf', '--help')}")
    if not path.is_file():
        raise PicogptError(f"{path} is not a regular file (a device, a pipe?); give the path of a model.dat")
    size = path.stat().st_size

    def bad(problem):
        return PicogptError(f"{path}: {problem}; {remake_hint}")

    with open(path, "rb") as f:
        preamble = f.read(PREAMBLE.size)
        if len(preamble) < PREAMBLE.size or preamble[:8] != MAGIC:
            raise bad("not a picogpt model file (bad magic)")
        _, version, header_len, file_size, digest = PREAMBLE.unpack(preamble)
        if version > VERSION:
            raise PicogptError(f"{path}: model file format version {version} is newer than this picogpt "
                               f"reads (version {VERSION}); upgrade picogpt or {remake_hint}")
        if version not in (1, 2, 3):
            raise bad(f"unknown model file format version {version}")
        if file_size != size:
            raise bad(f"file is {size} bytes but its header says {file_size} (truncated or damaged copy)")
        if (PREAMBLE.size + header_len) % ALIGN or PREAMBLE.size + header_len > size:
            raise bad(f"header length {header_len} is impossible")
        try:
            header = json.loads(f.read(header_len))
            hparams, table = header["hparams"], header["tensors"]
        except (ValueError, KeyError, TypeError):
            raise bad("header is not valid JSON with hparams and tensors") from None
    hparams = check_hparams(hparams, str(path), remake_hint)

    if not isinstance(table, list) or not all(isinstance(e, dict) for e in table):
        raise bad("tensor table is not a list of objects")
    matrix_dtypes = {e.get("dtype") for e in table if is_matrix(str(e.get("name"))) and isinstance(e.get("dtype"), str)}
    weight = I8 if I8 in matrix_dtypes else BF16 if BF16 in matrix_dtypes else DTYPE
    if FILE_VERSIONS[weight] > version:
        raise bad(f"format version {version} cannot hold {weight} matrices")
    specs = _specs(hparams, weight)
    names = [e.get("name") for e in table]
    if sorted(map(str, names)) != sorted(specs) or len(set(names)) != len(names):
        raise bad(f"tensor names do not match a GPT-2 model with {plural(hparams['n_layer'], 'layer')}"
                  + (" and int8 weights with their scales" if weight == I8 else ""))
    errors = {}
    end_of_previous = PREAMBLE.size + header_len
    for e in sorted(table, key=lambda e: e.get("offset") if type(e.get("offset")) is int else -1):
        shape, order, dtype = specs[e["name"]]
        offset, nbytes = e.get("offset"), e.get("nbytes")
        allowed = (DTYPE, BF16) if dtype == BF16 else (dtype,)  # a bfloat16 file may keep some matrices float32
        if dtype == I8:
            try:
                errors[e["name"]] = float(e["error"])
            except (KeyError, TypeError, ValueError):
                errors[e["name"]] = math.nan
            if not 0 <= errors[e["name"]] < math.inf:
                raise bad(f"int8 tensor {e['name']} does not record its quantization error") from None
        if e.get("dtype") not in allowed or e.get("order") != order or e.get("shape") != list(shape):
            raise bad(f"tensor {e['name']} is {e.get('dtype')} {e.get('shape')} order {e.get('order')}, "
                      f"expected {' or '.join(allowed)} {list(shape)} order {order} for these hyper-parameters "
                      f"(format version {version})")
        if type(offset) is not int or type(nbytes) is not int or nbytes != _ITEMSIZE[e["dtype"]] * math.prod(shape):
            raise bad(f"tensor {e['name']} has a bad offset or byte count")
        if offset % ALIGN or offset < end_of_previous or offset + nbytes > size:
            raise bad(f"tensor {e['name']} lies outside the file or overlaps another")
        end_of_previous = offset + nbytes

    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {e["name"]: np.ndarray(tuple(e["shape"]), _NUMPY_DTYPES[e["dtype"]], buffer=mapped,
                                     offset=e["offset"], order=e["order"]) for e in table}
    weight_dtype = {DTYPE: "f32", BF16: "bf16", I8: "int8"}[weight]
    return ModelFile(path=path, hparams=hparams, tensors=tensors, sha256=digest, remake_hint=remake_hint,
                     weight_dtype=weight_dtype, quantization_errors=errors)


def convert_dtype(in_path, out_path, weight_dtype):
    """Rewrite the model.dat at in_path with its weight matrices stored as weight_dtype ("f32", "bf16" or
    "int8"), tensor by tensor (never the whole model twice in memory), atomically at out_path. float32
    to bfloat16 rounds to nearest even, to int8 quantizes (picogpt.int8); bfloat16 to float32 is exact,
    int8 to float32 gives scale·q. Returns the hparams."""
    source = open_model_file(in_path)
    with ModelFileWriter(out_path, source.hparams, weight_dtype) as out:
        for name, tensor in source.float32_tensors():
            out.write(name, tensor)
    return source.hparams
