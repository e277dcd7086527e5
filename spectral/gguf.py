"""Open a GGUF file (llama.cpp's format) as named float32 tensors, one at a time, checked before anything is trusted.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md, v2/v3, little-endian): "GGUF", version u32,
tensor count u64, key/value count u64, the key/values, then per tensor (name, n_dims u32, dims u64[n_dims] fastest
first, ggml type u32, offset u64), padding to `general.alignment` (default 32), then the data. llama.cpp's reader
(ggml/src/gguf.cpp) requires each tensor to start where the previous one ends, padded to the alignment; so does this
one. The header is parsed here rather than by `gguf.GGUFReader`, which trusts what the file declares (an array
declared 2^50 items long keeps it looping, an unknown type code fails the whole file, a short file surfaces as an
IndexError): every count, length, offset and size is checked against the bytes present before it is used. The gguf
library supplies the type tables and the dequantisation (`gguf.quants.dequantize`), applied to one tensor at a time
through a memory map of the descriptor opened with the file (no path is reopened later; a file changed on disk since
is refused), so memory stays near the largest matrix.

Names and layout: GGUF dims are stored fastest-first, so a (rows = out features) x (cols = in features) weight is
declared [cols, rows]; shapes here are reversed to PyTorch's orientation. Where `transformers` knows the architecture,
tensors are presented under their Hugging Face names with llama.cpp's conversions undone by transformers' own tensor
processors (the Q/K row permutation of Llama-family attention, Gemma 2/3 norms stored + 1, GPT-2's transposes,
Bloom's fused QKV order), so roles, what-ifs and saved cuts use the layout of the Hugging Face model; the GGUF name
stays on `GGUFTensorInfo.gguf_name`. Without transformers (or for an architecture it cannot build) the GGUF names
and layout are kept: singular values are the same (the permutation only reorders rows), but the names carry no roles.

Quantisation noise (`GGUFFile.noise`): a block quantiser that rounds to a uniform grid of step Δ adds an error that is
uniform on [-Δ/2, Δ/2] when the weights spread over many steps, variance Δ²/12 (the pseudo-quantisation-noise model:
Widrow & Kollár, "Quantization Noise", Cambridge University Press, 2008). σ² is Δ²/12 averaged over the tensor's
(sub-)blocks, with Δ read from the stored scales; tests/test_gguf.py checks it against the library's own quantiser.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import reprlib
import stat
import struct
import tempfile
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib.metadata import version as _package_version
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

try:  # optional: Hugging Face names, config and tokenizer
    import transformers
except ImportError:  # pragma: no cover - exercised only where transformers is absent
    transformers = None

MAGIC = b"GGUF"
VERSIONS = (2, 3)  # v1 counted in 32 bits and is long gone; gguf.GGUFReader reads 2 and 3 too
DEFAULT_ALIGNMENT = gguf.GGUF_DEFAULT_ALIGNMENT  # 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSORS = 1 << 20  # far above any model's few thousand tensors; bounds the header walk
MAX_KEYS = 1 << 20
MAX_NAME_BYTES = 1 << 16  # keys and tensor names (the spec limits keys to 65535 bytes, llama.cpp names to 64)
MAX_ARRAY_ITEMS = 1 << 24  # per metadata array: vocabularies are ~10^5 tokens, merges up to ~10^6
MAX_NESTING = 3  # arrays of arrays
KEPT_ARRAY_ITEMS = 64  # longer arrays are kept as a `GGUFArray` summary, not decoded
DEQUANT_CHUNK = 1 << 16  # elements dequantised per call: the library's temporaries stay in cache (SmolLM2's 211
# tensors: 1.19 s at 2^24, 0.77 s at 2^16) and small beside the output
SCALE_CHUNK = 1 << 16  # blocks per pass when reading the scales for σ
MAX_TOKENIZER_ITEMS = 1 << 22  # tokens + merges transformers may decode into Python objects (~100 bytes each): real
# vocabularies hold under 10^6 (Llama 3: 128,256 tokens and 280,147 merges; Gemma 3: 262,144 tokens)
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                    "tokenizer.ggml.scores")  # only the tokenizer reads these: left out of the config's header copy
GGUF_LIBRARY = _package_version("gguf")

_SCALAR = {  # GGUF value type -> (struct format, size)
    GGUFValueType.UINT8: ("<B", 1), GGUFValueType.INT8: ("<b", 1), GGUFValueType.UINT16: ("<H", 2),
    GGUFValueType.INT16: ("<h", 2), GGUFValueType.UINT32: ("<I", 4), GGUFValueType.INT32: ("<i", 4),
    GGUFValueType.FLOAT32: ("<f", 4), GGUFValueType.BOOL: ("<?", 1), GGUFValueType.UINT64: ("<Q", 8),
    GGUFValueType.INT64: ("<q", 8), GGUFValueType.FLOAT64: ("<d", 8),
}
_NUMPY_ONLY = {  # plain numbers that gguf.quants.dequantize does not take (it takes F32, F16, BF16 and the blocks)
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32, GGMLQuantizationType.I64: np.int64,
}
UNQUANTISED = ("F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64")  # σ = 0.0: no block quantisation


class GGUFError(ValueError):
    """A GGUF file, or one tensor of it, that cannot be read; `str(error)` is one line naming the problem."""

    def __init__(self, problem: str):
        super().__init__(" ".join(str(problem).split()))


@dataclass(frozen=True)
class GGUFArray:
    """A metadata array too long to keep decoded (a vocabulary, merges): its item type and length."""

    item_type: str
    count: int

    def __str__(self) -> str:
        return f"[{self.count} {self.item_type.lower()}]"


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor as declared by the file, checked against it."""

    name: str  # the name presented: Hugging Face's where mapped, else the GGUF name
    gguf_name: str  # the name in the file
    shape: tuple[int, ...]  # as presented: PyTorch orientation, after the Hugging Face conversion where mapped
    stored_shape: tuple[int, ...]  # as stored, in PyTorch orientation (the file's dims reversed)
    type_name: str  # "Q4_1", "F32", ... or "type 99" for a code this gguf library does not know
    offset: int  # absolute byte offset of the data in the file
    nbytes: int  # stored bytes (for an unknown type: up to the next tensor)
    refusal: str | None = None  # why this tensor cannot be dequantised, else None


@dataclass(frozen=True)
class QuantNoise:
    """The rounding noise one tensor's storage type adds, in weight units; σ None with a reason where no model fits."""

    type_name: str
    sigma: float | None
    reason: str | None = None


# ------------------------------------------------------------------------------------------------------ entry point

def is_gguf(head: bytes) -> bool:
    """Whether a file starting with `head` is GGUF (the magic bytes "GGUF")."""
    return bytes(head[:4]) == MAGIC


def open_gguf(source: str | os.PathLike | bytes | bytearray | memoryview, *, hf_names: bool = True) -> GGUFFile:
    """Check the header of a GGUF file (a path, memory-mapped, or the file's bytes) and list its tensors.

    With `hf_names` and transformers installed, tensors of an architecture transformers knows are presented under
    Hugging Face names in Hugging Face layout; otherwise under their GGUF names. Raises `GGUFError`."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = memoryview(source).cast("B")
        return GGUFFile(_parse(data, len(data)), fd=None, stamp=None, data=data, hf_names=hf_names)
    fd = _open_descriptor(Path(source))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise GGUFError("not a regular file")
        if info.st_size == 0:
            raise GGUFError("empty file (0 bytes)")
        with mmap.mmap(fd, 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                header = _parse(view, info.st_size)
            finally:
                view.release()
    except BaseException:
        os.close(fd)
        raise
    return GGUFFile(header, fd=fd, stamp=(info.st_size, info.st_mtime_ns, info.st_ino), data=None,
                    hf_names=hf_names)


def _open_descriptor(path: Path) -> int:
    try:
        return os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise GGUFError(f"cannot read: {e.strerror or e}") from None


# --------------------------------------------------------------------------------------------------------- the file

@dataclass(frozen=True)
class _Header:
    """What `_parse` found: metadata, each key/value's byte range (for the header copy) and the tensor table."""

    version: int
    size: int
    metadata: dict[str, object]
    kv_spans: dict[str, tuple[int, int]]  # key -> (start, end) of its key/value record in the file
    counts: dict[str, int]  # top-level array key -> its length (long arrays are not decoded)
    tensors: list[GGUFTensorInfo]
    alignment: int
    data_start: int


class GGUFFile:
    """A checked GGUF file: metadata, tensors (names, shapes, types) and per-tensor float32 readers.

    `config` is the Hugging Face config (the dict a config.json would hold) where transformers can build one, else
    None; `notes` says, one line each, what could not be done and why."""

    def __init__(self, header: _Header, *, fd: int | None, stamp: tuple | None, data: memoryview | None,
                 hf_names: bool):
        # the descriptor the header was read from is the only way back to the file (no path is reopened), and its
        # (size, mtime, inode) stamp from before the parse must still hold at every read
        self._header, self._fd, self._stamp, self._data = header, fd, stamp, data
        if fd is not None:
            weakref.finalize(self, os.close, fd)
        self.version, self.size, self.metadata = header.version, header.size, header.metadata
        arch = header.metadata.get("general.architecture")
        self.architecture: str | None = arch if isinstance(arch, str) and arch else None
        self.tensors: dict[str, GGUFTensorInfo] = {t.name: t for t in header.tensors}
        self.notes: list[str] = []
        self.config: dict | None = None
        self._hf_config = None
        self._processor = None  # transformers' tensor processor, set when tensors carry Hugging Face names
        self._noise: dict[str, QuantNoise] = {}
        self._tokenizer_built = False
        self._tokenizer = None
        self._lock = threading.Lock()
        if transformers is None:
            self.notes.append("transformers is not installed: no config or tokenizer, tensors keep their GGUF names")
        elif self.architecture is None:
            self.notes.append("no general.architecture in the metadata: no config, tensors keep their GGUF names")
        else:
            self._hf_config, self.config = self._build_config()
            if self._hf_config is not None and hf_names:
                self._present_hf_names()

    # ---- listing

    def names(self) -> list[str]:
        """Every tensor name as presented, in file order."""
        return list(self.tensors)

    def info(self, name: str) -> GGUFTensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise GGUFError(f"no tensor named {_quote(name)}") from None

    def refused(self) -> dict[str, str]:
        """Tensors that cannot be dequantised, with the reason; every other tensor reads."""
        return {n: t.refusal for n, t in self.tensors.items() if t.refusal}

    def metadata_strings(self) -> dict[str, str]:
        """The metadata as one-line strings of at most 200 characters (long arrays as "[49152 string]")."""
        out = {}
        for key, value in self.metadata.items():
            text = " ".join((value if isinstance(value, str) else str(value)).split())
            out[key] = text if len(text) <= 200 else text[:196] + " ..."
        return out

    # ---- reading

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` dequantised to float32 in its presented layout, read now; the caller owns it."""
        info = self.info(name)
        if info.refusal:
            raise GGUFError(f"tensor {_quote(name)} ({info.type_name}): {info.refusal}")
        values = self._with_raw(info, lambda raw: _dequantize(raw, info))
        if info.name != info.gguf_name:
            values = self._to_hf_layout(values, info)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))

    def noise(self, name: str) -> QuantNoise:
        """The noise σ (weight units) the tensor's storage type adds: Δ²/12 averaged over its blocks, Δ from the
        stored scales, the data itself never dequantised.

        Unquantised types (F32, F16, BF16, F64, integers): σ = 0.0; F16's and BF16's own rounding, relative to each
        weight (at most 2^-11 and 2^-8 of it), is not counted. Types without one uniform step (IQ*, MXFP4, NVFP4,
        the ternary TQ1_0/TQ2_0) or that cannot be read: σ None and the reason."""
        info = self.info(name)
        with self._lock:
            known = self._noise.get(name)
        if known is None:
            known = self._compute_noise(info)
            with self._lock:
                self._noise[name] = known
        return known

    def quantization(self) -> dict[str, tuple[str, float | None]]:
        """(type name, σ) of every tensor, as `Checkpoint.quantization` holds them; reads every tensor's scales."""
        return {name: (noise.type_name, noise.sigma) for name in self.tensors for noise in [self.noise(name)]}

    def tokenizer(self):
        """The `tokenizers.Tokenizer` transformers builds from the GGUF vocabulary (built once), or None."""
        with self._lock:
            if not self._tokenizer_built:
                self._tokenizer = self._build_tokenizer()
                self._tokenizer_built = True
            return self._tokenizer

    # ---- internals: bytes and noise

    def _with_raw(self, info: GGUFTensorInfo, use: Callable[[np.ndarray], object]):
        """`use` applied to the tensor's stored bytes (read-only uint8) through a memory map of this call only, so
        neither the pages nor a descriptor outlive the read. `use` must not return views of the bytes."""
        if self._data is not None:
            return use(np.frombuffer(self._data, dtype=np.uint8, count=info.nbytes, offset=info.offset))
        try:
            st = os.fstat(self._fd)
            if (st.st_size, st.st_mtime_ns, st.st_ino) != self._stamp:
                raise GGUFError("changed on disk since it was opened; open it again")
            start = info.offset - info.offset % mmap.ALLOCATIONGRANULARITY
            with mmap.mmap(self._fd, info.offset + info.nbytes - start, offset=start, access=mmap.ACCESS_READ) as mm:
                raw = np.frombuffer(mm, dtype=np.uint8, count=info.nbytes, offset=info.offset - start)
                try:
                    return use(raw)
                finally:
                    del raw  # the map cannot close while an array views it
        except OSError as e:
            raise GGUFError(f"cannot read tensor {_quote(info.name)}: {e.strerror or e}") from None

    def _compute_noise(self, info: GGUFTensorInfo) -> QuantNoise:
        kind = info.type_name
        if info.refusal:
            return QuantNoise(kind, None, info.refusal)
        if kind in UNQUANTISED:
            return QuantNoise(kind, 0.0)
        qtype = GGMLQuantizationType[kind]
        if qtype not in _STEPS:
            return QuantNoise(kind, None, _NO_STEP.get(kind, "no uniform rounding step is known for this type"))
        type_size = GGML_QUANT_SIZES[qtype][1]

        def mean_square_step(raw: np.ndarray) -> float:
            blocks = raw.reshape(-1, type_size)
            total = 0.0
            for begin in range(0, len(blocks), SCALE_CHUNK):
                steps = _STEPS[qtype](blocks[begin:begin + SCALE_CHUNK])
                total += float(np.square(steps).mean(axis=1).sum())
            return total / len(blocks)

        sigma = float(np.sqrt(self._with_raw(info, mean_square_step) / 12.0))
        if not np.isfinite(sigma):
            return QuantNoise(kind, None, "the stored scales are not finite")
        return QuantNoise(kind, sigma)

    # ---- internals: Hugging Face config, names, layout, tokenizer

    @contextlib.contextmanager
    def _header_copy(self, drop: tuple[str, ...] = ()):
        """A temporary GGUF with this file's metadata copied verbatim (less `drop`) and its tensor names as 0-element
        F32 tensors: transformers' readers see the checked metadata, never this file's tensor table or data."""
        kept = [k for k in self._header.kv_spans if k not in drop]
        with tempfile.TemporaryDirectory(prefix="spectra-gguf-") as folder, contextlib.ExitStack() as stack:
            source = self._data
            if source is None:
                mm = stack.enter_context(mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ))
                source = memoryview(mm)
                stack.callback(source.release)
            target = Path(folder) / "header.gguf"
            with target.open("wb") as out:
                out.write(MAGIC + struct.pack("<IQQ", 3, len(self._header.tensors), len(kept)))
                for key in kept:
                    start, end = self._header.kv_spans[key]
                    out.write(source[start:end])
                for t in self._header.tensors:
                    name = t.gguf_name.encode()
                    out.write(struct.pack("<Q", len(name)) + name + struct.pack("<IQIQ", 1, 0, 0, 0))
            stack.close()
            yield target

    def _build_config(self):
        """(transformers config, its dict) from the metadata, through `AutoConfig.from_pretrained(gguf_file=...)`."""
        legacy = not _uses_new_gguf_loader(self.architecture)
        try:  # transformers' legacy reader decodes every token string one by one: it gets the copy without them
            with self._header_copy(drop=TOKENIZER_ARRAYS if legacy else ()) as copy, _quiet_transformers():
                hf_config = transformers.AutoConfig.from_pretrained(str(copy.parent), gguf_file=copy.name,
                                                                    local_files_only=True)
        except Exception as e:  # noqa: BLE001 - an architecture transformers cannot map is a note, not a failure
            self.notes.append(f"transformers has no config for GGUF architecture {_quote(self.architecture)} "
                              f"({_first_line(e)}): tensors keep their GGUF names")
            return None, None
        tokens = self._header.counts.get("tokenizer.ggml.tokens")
        if legacy and tokens and not _config_states_vocab(self.architecture, self.metadata):
            hf_config.vocab_size = tokens  # what transformers does when the metadata has no vocab_size
        config = hf_config.to_dict()
        config.pop("_name_or_path", None)  # the temporary copy's folder
        return hf_config, config

    def _present_hf_names(self) -> None:
        """Rename the tensors transformers maps one-to-one to its Hugging Face names and shapes (from the model
        built on the meta device), keeping the GGUF name and layout for the rest."""
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

        arch = self.architecture
        if _uses_new_gguf_loader(arch):
            self.notes.append(f"transformers converts {arch} GGUF tensors in its own loader: tensors keep their GGUF "
                              "names and layout")
            return
        arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
        if arch_enum is None:
            self.notes.append(f"gguf {GGUF_LIBRARY} has no tensor names for architecture {_quote(arch)}: GGUF "
                              "names kept")
            return
        try:
            with _quiet_transformers(), torch.device("meta"):
                model = _meta_model(self._hf_config)
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"transformers cannot build {arch} from its GGUF config ({_first_line(e)}): GGUF "
                              "names kept")
            return
        processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.config)
        n_layers = max(_int(self.metadata.get(f"{arch}.block_count")),
                       _int(getattr(self._hf_config, "num_hidden_layers", 0)))
        hf_of = _gguf_to_hf_names(model, processor, gguf.get_tensor_name_map(arch_enum, n_layers))
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        claimed: dict[str, int] = {}
        for hf_name in hf_of.values():
            claimed[hf_name] = claimed.get(hf_name, 0) + 1
        presented: dict[str, GGUFTensorInfo] = {}
        unmapped: list[str] = []
        for t in self._header.tensors:
            hf_name = hf_of.get(t.gguf_name)
            if (hf_name is not None and claimed[hf_name] == 1 and hf_name in expected
                    and _numel(expected[hf_name]) == _numel(t.stored_shape)):
                presented[hf_name] = replace(t, name=hf_name, shape=expected[hf_name])
            else:
                unmapped.append(t.gguf_name)
                presented[t.gguf_name] = t
        if len(presented) != len(self._header.tensors):
            self.notes.append("a GGUF name equals a Hugging Face name of another tensor: GGUF names kept")
            return
        self.tensors, self._processor = presented, processor
        if unmapped:
            listed = ", ".join(unmapped[:3]) + (" ..." if len(unmapped) > 3 else "")
            self.notes.append(f"{len(unmapped)} tensors have no one-to-one Hugging Face name and keep their GGUF "
                              f"name and layout ({listed})")

    def _to_hf_layout(self, values: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
        """transformers' processor for this architecture, applied as its GGUF loader applies it (Q/K rows
        un-permuted for Llama-family attention, Gemma norms minus 1, GPT-2's transposes, Bloom's QKV order)."""
        parsed: dict[str, dict] = {"tensors": {}}
        result = self._processor.process(weights=values, name=info.gguf_name, tensor_key_mapping=None,
                                         parsed_parameters=parsed)
        if len(parsed["tensors"]) == 1:  # GPT-2's output.weight is handed over this way, renamed
            (handed,) = parsed["tensors"].values()
            values = handed.numpy()
        else:
            values = np.asarray(result.weights)
        if values.shape != info.shape:
            if tuple(d for d in values.shape if d != 1) != tuple(d for d in info.shape if d != 1):
                raise GGUFError(f"tensor {_quote(info.name)}: the {self.architecture} conversion gave shape "
                                f"{list(values.shape)}, the Hugging Face model has {list(info.shape)}")
            values = values.reshape(info.shape)  # only unit dimensions differ (an unsqueezed bias or conv)
        return values

    def _build_tokenizer(self):
        if transformers is None or "tokenizer.ggml.tokens" not in self._header.counts:
            return None
        items = sum(self._header.counts.get(k, 0) for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
        if items > MAX_TOKENIZER_ITEMS:
            self.notes.append(f"no tokenizer: the vocabulary declares {items:,} tokens and merges, over the bound of "
                              f"{MAX_TOKENIZER_ITEMS:,}")
            return None
        try:
            with self._header_copy() as copy, _quiet_transformers():
                fast = transformers.PreTrainedTokenizerFast.from_pretrained(str(copy.parent), gguf_file=copy.name,
                                                                            local_files_only=True)
            return fast.backend_tokenizer
        except Exception as e:  # noqa: BLE001 - no tokenizer only costs the text evaluation
            self.notes.append(f"transformers cannot build a tokenizer from this GGUF ({_first_line(e)})")
            return None


# ------------------------------------------------------------------------------------------------------ dequantising

def _dequantize(raw: np.ndarray, info: GGUFTensorInfo) -> np.ndarray:
    """Float32 values of one tensor's bytes, shaped as stored (PyTorch orientation), through
    `gguf.quants.dequantize`; rows go in chunks into one fresh output, so the library's temporaries stay small."""
    shape = info.stored_shape
    qtype = GGMLQuantizationType[info.type_name]
    if qtype in _NUMPY_ONLY:  # plain numbers the library leaves alone; astype copies, so nothing views `raw`
        return raw.view(_NUMPY_ONLY[qtype]).astype(np.float32).reshape(shape)
    cols = shape[-1]
    rows = _numel(shape) // cols
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = raw.reshape(rows, cols // block_size * type_size)
    out = np.empty((rows, cols), dtype=np.float32)
    step = max(1, DEQUANT_CHUNK // cols)
    for begin in range(0, rows, step):
        out[begin:begin + step] = gguf.quants.dequantize(blocks[begin:begin + step], qtype)
    return out.reshape(shape)


def _refusal(qtype: GGMLQuantizationType) -> str | None:
    """Why this gguf library cannot dequantise the type, or None when it can."""
    readable = qtype in _NUMPY_ONLY or qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) \
        or qtype in gguf.quants._type_traits  # the library's registry of block codecs
    return None if readable else f"gguf {GGUF_LIBRARY} has no dequantiser for {qtype.name}"


# ----------------------------------------------------------------------------------- quantisation steps per block type
# Each maps blocks (n, type size) uint8 to |Δ| per sub-block, (n, sub-blocks) float64. Layouts: the
# `dequantize_blocks` of each class in gguf-py's gguf/quants.py, and block_q4_0 ... block_q6_K in llama.cpp's
# ggml/src/ggml-common.h. Sub-blocks of one type are equal in size, so σ² = mean over them of Δ²/12.

def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float64)  # (n, 1)


def _step_d_first(blocks: np.ndarray) -> np.ndarray:
    """block_q4_0/q5_0/q8_0 (d, q): x = d·q, d negative when the block's extreme is; block_q4_1/q5_1 (d, m, q):
    x = d·q + m. One step d per block of 32."""
    return np.abs(_f16(blocks, 0))


def _step_q2_k(blocks: np.ndarray) -> np.ndarray:
    """block_q2_K: scales[16] (low nibble: the scale of each 16 weights), qs[64], d, dmin: x = d·sc·q - dmin·m."""
    return np.abs(_f16(blocks, 80) * (blocks[:, :16] & 0x0F).astype(np.float64))


def _step_q3_k(blocks: np.ndarray) -> np.ndarray:
    """block_q3_K: hmask[32], qs[64], scales[12] (sixteen 6-bit scales stored + 32), d: x = d·(sc - 32)·q."""
    n = len(blocks)
    scales = blocks[:, 96:108]
    low = (scales[:, :8].reshape(n, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (scales[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int8) - np.int8(32)
    return np.abs(_f16(blocks, 108) * sc.astype(np.float64))


def _step_q4_k(blocks: np.ndarray) -> np.ndarray:
    """block_q4_K and block_q5_K: d, dmin, scales[12] (eight 6-bit scales and mins), ...: x = d·sc·q - dmin·m, one
    scale per 32 weights, unpacked by the library's own `Q4_K.get_scale_min`."""
    sc, _ = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
    return np.abs(_f16(blocks, 0) * sc.astype(np.float64))


def _step_q6_k(blocks: np.ndarray) -> np.ndarray:
    """block_q6_K: ql[128], qh[64], scales[16] (int8, one per 16 weights), d: x = d·sc·(q - 32)."""
    return np.abs(_f16(blocks, 208) * blocks[:, 192:208].copy().view(np.int8).astype(np.float64))


_STEPS: dict[GGMLQuantizationType, Callable[[np.ndarray], np.ndarray]] = {
    GGMLQuantizationType.Q4_0: _step_d_first, GGMLQuantizationType.Q4_1: _step_d_first,
    GGMLQuantizationType.Q5_0: _step_d_first, GGMLQuantizationType.Q5_1: _step_d_first,
    GGMLQuantizationType.Q8_0: _step_d_first,
    GGMLQuantizationType.Q2_K: _step_q2_k, GGMLQuantizationType.Q3_K: _step_q3_k,
    GGMLQuantizationType.Q4_K: _step_q4_k, GGMLQuantizationType.Q5_K: _step_q4_k,
    GGMLQuantizationType.Q6_K: _step_q6_k,
}
_TERNARY = "ternary levels: the step is as wide as the weights' own spread, where Δ²/12 does not hold"
_FLOAT_GRID = "a 4-bit float grid: the step grows with the magnitude, there is no single Δ"
_NO_STEP = {"TQ1_0": _TERNARY, "TQ2_0": _TERNARY, "MXFP4": _FLOAT_GRID, "NVFP4": _FLOAT_GRID}
_NO_STEP.update({t.name: "a lattice codebook, not a uniform grid: there is no single Δ"
                 for t in GGMLQuantizationType if t.name.startswith("IQ")})


# ------------------------------------------------------------------------------------------------------------ parsing

class _Cursor:
    """Little-endian fields from a buffer; a read past its end is a `GGUFError`, never an IndexError."""

    def __init__(self, buf: memoryview, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def left(self) -> int:
        return max(0, self.size - self.pos)

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise GGUFError(f"truncated file: {what} needs {n} bytes at offset {self.pos}, only {self.left()} left")

    def unpack(self, fmt: str, width: int, what: str):
        self.need(width, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += width
        return value

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.unpack("<Q", 8, f"the length of {what}")
        if limit is not None and n > limit:
            raise GGUFError(f"bogus header: {what} is {n} bytes long (the limit is {limit})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFError(f"bogus header: {what} is not valid UTF-8") from None

    def skip_strings(self, count: int, shown: str) -> None:
        """Step over `count` strings (a vocabulary), checking each length, decoding none."""
        buf, size, pos = self.buf, self.size, self.pos
        for j in range(count):
            if size - pos < 8 or struct.unpack_from("<Q", buf, pos)[0] > size - pos - 8:
                self.pos = pos
                raise GGUFError(f"truncated file: item {j} of {shown} runs past the end at offset {pos}")
            pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
        self.pos = pos


def _parse(buf: memoryview, size: int) -> _Header:
    """Check and read a GGUF header: every count, length, type and offset against the `size` bytes present."""
    if size == 0:
        raise GGUFError("empty file (0 bytes)")
    cur = _Cursor(buf, size)
    cur.need(4, "the magic bytes")
    if bytes(buf[:4]) != MAGIC:
        raise GGUFError("not a GGUF file (no GGUF magic bytes)")
    cur.pos = 4
    version = cur.unpack("<I", 4, "the version")
    if version and version & 0xFFFF == 0:  # gguf.GGUFReader's test for a file written on a big-endian machine
        raise GGUFError("big-endian GGUF files are not supported")
    if version not in VERSIONS:
        raise GGUFError(f"GGUF version {version} is not supported (only 2 and 3)")
    n_tensors = cur.unpack("<Q", 8, "the tensor count")
    n_keys = cur.unpack("<Q", 8, "the metadata count")
    if n_tensors > MAX_TENSORS or n_tensors * 33 > size:  # a tensor entry takes at least 33 bytes
        raise GGUFError(f"bogus header: declares {n_tensors} tensors, more than the {size}-byte file can hold")
    if n_keys > MAX_KEYS or n_keys * 13 > size:  # a key/value takes at least 13 bytes
        raise GGUFError(f"bogus header: declares {n_keys} metadata entries, more than the {size}-byte file can hold")

    metadata: dict[str, object] = {}
    spans: dict[str, tuple[int, int]] = {}
    counts: dict[str, int] = {}
    for i in range(n_keys):
        start = cur.pos
        key = cur.string(f"metadata key {i}", MAX_NAME_BYTES)
        if key in metadata:
            raise GGUFError(f"bogus header: metadata key {_quote(key)} appears twice")
        kind = cur.unpack("<I", 4, f"the type of metadata key {i}")
        metadata[key] = _read_value(cur, kind, key, counts, depth=0)
        spans[key] = (start, cur.pos)

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not (type(alignment) is int and alignment > 0 and alignment & (alignment - 1) == 0):
        raise GGUFError(f"bogus header: general.alignment {_quote(alignment)} is not a positive power of two")

    entries = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}", MAX_NAME_BYTES)
        if not name:
            raise GGUFError(f"bogus header: tensor {i} has an empty name")
        shown = _quote(name)
        if name in seen:
            raise GGUFError(f"bogus header: tensor {i} has the name {shown} again")
        seen.add(name)
        n_dims = cur.unpack("<I", 4, f"the dimension count of {shown}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise GGUFError(f"bogus header: tensor {shown} has {n_dims} dimensions (GGUF allows 1 to {MAX_DIMS})")
        dims = [cur.unpack("<Q", 8, f"the dimensions of {shown}") for _ in range(n_dims)]
        if min(dims) == 0 or _numel(dims) > 8 * size:  # no type stores more than 8 values per byte
            raise GGUFError(f"bogus header: tensor {shown} has dimensions {dims}, more than the file can hold")
        type_id = cur.unpack("<I", 4, f"the type of {shown}")
        offset = cur.unpack("<Q", 8, f"the offset of {shown}")
        entries.append((name, dims, type_id, offset))
    data_start = -(-cur.pos // alignment) * alignment
    return _Header(version, size, metadata, spans, counts, _tensor_table(entries, alignment, data_start, size),
                   alignment, data_start)


def _tensor_table(entries: list, alignment: int, data_start: int, size: int) -> list[GGUFTensorInfo]:
    """Each tensor's span, checked as llama.cpp's gguf.cpp checks it: tensor i starts where tensor i-1 ends, padded to
    the alignment, and ends inside the file. A type code this gguf library does not know is kept, refused, its span
    running to the next tensor (or the end of the file)."""
    tensors: list[GGUFTensorInfo] = []
    expected: int | None = 0  # the offset the next tensor must have; None after an unknown type (size unknown)
    for i, (name, dims, type_id, offset) in enumerate(entries):
        shape, shown = tuple(reversed(dims)), _quote(name)
        qtype = GGMLQuantizationType._value2member_map_.get(type_id)
        if offset % alignment:
            raise GGUFError(f"bogus header: tensor {shown} has offset {offset}, not a multiple of the alignment "
                            f"{alignment}")
        if expected is not None and offset != expected:
            raise GGUFError(f"bogus header: tensor {shown} has offset {offset}, expected {expected} (a gap or an "
                            "overlap)")
        if data_start + offset > size:
            raise GGUFError(f"truncated file: tensor {shown} starts at byte {data_start + offset}, past the end of "
                            f"the {size}-byte file")
        if qtype is None or qtype not in GGML_QUANT_SIZES:
            following = [e[3] for e in entries[i + 1:i + 2]]
            end = data_start + following[0] if following else size
            if end < data_start + offset:
                raise GGUFError(f"bogus header: tensor {_quote(entries[i + 1][0])} starts before tensor {shown}")
            tensors.append(GGUFTensorInfo(name, name, shape, shape, f"type {type_id}", data_start + offset,
                                          end - data_start - offset, f"unknown ggml type {type_id} (not in gguf "
                                                                     f"{GGUF_LIBRARY})"))
            expected = None
            continue
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:
            raise GGUFError(f"bogus header: tensor {shown} of type {qtype.name} has rows of {dims[0]} values, not a "
                            f"multiple of its block size {block_size}")
        nbytes = _numel(dims) // block_size * type_size
        if data_start + offset + nbytes > size:
            raise GGUFError(f"truncated file: tensor {shown} ({qtype.name}, shape {list(shape)}) needs bytes up to "
                            f"{data_start + offset + nbytes}, the file has {size}")
        tensors.append(GGUFTensorInfo(name, name, shape, shape, qtype.name, data_start + offset, nbytes,
                                      _refusal(qtype)))
        expected = offset + -(-nbytes // alignment) * alignment
    return tensors


def _read_value(cur: _Cursor, kind: int, key: str, counts: dict[str, int], depth: int):
    """One metadata value; arrays longer than KEPT_ARRAY_ITEMS are walked and checked but kept as a `GGUFArray`."""
    shown = _quote(key)
    kind = GGUFValueType._value2member_map_.get(kind)
    if kind is None:
        raise GGUFError(f"bogus header: metadata {shown} has an unknown value type")
    if kind in _SCALAR:
        return cur.unpack(*_SCALAR[kind], f"metadata {shown}")
    if kind == GGUFValueType.STRING:
        return cur.string(f"metadata {shown}")
    item_kind = GGUFValueType._value2member_map_.get(cur.unpack("<I", 4, f"the item type of {shown}"))
    count = cur.unpack("<Q", 8, f"the length of {shown}")
    if item_kind is None:
        raise GGUFError(f"bogus header: metadata {shown} is an array of an unknown value type")
    smallest = _SCALAR[item_kind][1] if item_kind in _SCALAR else 8 if item_kind == GGUFValueType.STRING else 12
    if count > MAX_ARRAY_ITEMS or count * smallest > cur.left():
        raise GGUFError(f"bogus header: metadata {shown} declares {count} items, more than the {cur.left()} bytes "
                        "left can hold")
    if depth == 0:
        counts[key] = count
    if item_kind in _SCALAR:
        fmt, width = _SCALAR[item_kind]
        kept = np.frombuffer(cur.buf, dtype=np.dtype(fmt), count=count, offset=cur.pos).tolist() \
            if count <= KEPT_ARRAY_ITEMS else GGUFArray(item_kind.name, count)
        cur.pos += count * width
        return kept
    if item_kind == GGUFValueType.STRING:
        if count <= KEPT_ARRAY_ITEMS:
            return [cur.string(f"item {j} of {shown}") for j in range(count)]
        cur.skip_strings(count, shown)
        return GGUFArray("STRING", count)
    if depth + 1 >= MAX_NESTING:
        raise GGUFError(f"bogus header: metadata {shown} nests arrays more than {MAX_NESTING} deep")
    items = [_read_value(cur, GGUFValueType.ARRAY, key, counts, depth + 1) for _ in range(count)]
    return items if count <= KEPT_ARRAY_ITEMS else GGUFArray("ARRAY", count)


# ----------------------------------------------------------------------------------- transformers: models and names

def _uses_new_gguf_loader(arch: str) -> bool:
    """Architectures transformers loads through `integrations.gguf` (conversion ops, not tensor processors)."""
    try:
        from transformers.integrations.gguf import is_gguf_arch_supported
    except ImportError:  # an older transformers: every architecture goes through the tensor processors
        return False
    return bool(is_gguf_arch_supported(arch))


def _config_states_vocab(arch: str, metadata: dict) -> bool:
    """Whether transformers' legacy reader takes vocab_size from the metadata (else it counts the tokens)."""
    from transformers.integrations import GGUF_CONFIG_MAPPING

    return f"{arch}.vocab_size" in metadata and "vocab_size" in GGUF_CONFIG_MAPPING.get(arch, {})


def _meta_model(hf_config):
    """The model transformers builds for this config (a causal LM, else the base model); called on the meta device."""
    try:
        return transformers.AutoModelForCausalLM.from_config(hf_config)
    except ValueError:
        return transformers.AutoModel.from_config(hf_config)


def _gguf_to_hf_names(model, processor, name_map, qual_name: str = "") -> dict[str, str]:
    """GGUF name -> Hugging Face state-dict key, found as transformers' `get_gguf_hf_weights_map` finds it (the model,
    then each child, names already mapped kept), with one `gguf.TensorNameMap` instead of one per module."""
    mapping: dict[str, str] = {}
    for hf_name in model.state_dict():
        hf_name = processor.preprocess_name(hf_name)
        stem, suffix = hf_name, ""
        if hf_name.endswith((".weight", ".bias")):
            stem, suffix = hf_name.rsplit(".", 1)
            suffix = "." + suffix
        gguf_name = name_map.get_name(stem)
        if gguf_name is None:
            processor.perform_fallback_tensor_mapping(mapping, suffix, qual_name, hf_name)
            continue
        mapping[gguf_name + suffix] = qual_name + hf_name
    for child_name, child in model.named_children():
        sub = _gguf_to_hf_names(child, processor, name_map, f"{qual_name}{child_name}.")
        mapping.update({k: v for k, v in sub.items() if k not in mapping})
    return mapping


@contextlib.contextmanager
def _quiet_transformers():
    """transformers' GGUF readers log unparsed keys and defaults; none of it is for the user here."""
    logging = transformers.utils.logging
    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)


# ---------------------------------------------------------------------------------------------------------- helpers

def _numel(shape) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count


def _int(value) -> int:
    return value if type(value) is int else 0


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist = 60, 60, 8


def _quote(value) -> str:
    """repr() of a name or value read from the file, cut to ~60 characters: never a 64 KB key in a message."""
    return _REPR.repr(value)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__
