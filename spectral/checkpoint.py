"""Open a checkpoint (a file, raw bytes, a folder or a set of uploaded files) as named tensors, safely.

Formats: safetensors (header validated here as strictly as the library does, uploads included; then each tensor read
by offset through one descriptor per file, kept open), PyTorch `.pt/.pth/.bin/.ckpt` (zip or legacy pickle, through
`torch.load(weights_only=True)`, so a pickle can never run code), GGUF (`spectral.gguf`: header checked there, each
tensor dequantised to float32 when read, under its Hugging Face name where transformers knows the architecture), and
Hugging Face folders (config.json with one or several safetensors/bin shards and their index, or one GGUF). Magic
bytes decide the format, not the extension. Every failure is a `CheckpointError` whose message is one line: the
file, then what is wrong with it; a file's own bytes are never quoted.

Healed files (spectral/heal.py `save_healed`): matrices stored factorised as NAME.factor_a @ NAME.factor_b, listed in
metadata `spectra_factorised`, are presented as the dense tensor NAME (and each of its tied names), the factors
hidden, so a healed file opens like any other (`spectral.heal.densify` is the reference).

Hostile files: what a file declares is checked against the bytes it has and against MEMORY_BUDGET before anything is
allocated (zip entries must be stored, not compressed, and must not overlap; a pickle is dry-run by `_Census` first:
its storages within their records, its tensors within their storages, nothing it would allocate itself over the
budget; JSON is bounded by its value count before it is parsed), and a checkpoint holds at most MAX_TENSORS tensors.

The server folder (`list_checkpoints`, `open_in_folder`): every path opened resolves inside the folder, the entry and
each file read inside it; `Checkpoint.root` keeps the bound for side files read later (`Checkpoint.side_file`).

Tied tensors (one storage under two names, or equal values in a known embedding/LM-head pair) are reported as groups
in `Checkpoint.tied_groups`, so the analysis treats them as one matrix with several names.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import contextlib
import hashlib
import io
import itertools
import json
import math
import os
import pickle
import re
import reprlib
import warnings
import weakref
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch

from spectral.gguf import GGUFError, GGUFFile, is_gguf, open_gguf


def _env_bytes(name: str, default: int) -> int:
    """A byte count from the environment ("1073741824", "2G", "512MiB"; binary multiples), else `default`."""
    text = os.environ.get(name, "").strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", text, re.IGNORECASE)
    if not text:
        return default
    if match is None:
        warnings.warn(f"{name}={text!r} is not a byte count (e.g. 2G); using {default}", stacklevel=2)
        return default
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2).lower() or " "))


def _env_count(name: str, default: int) -> int:
    """A positive count from the environment, else `default`."""
    text = os.environ.get(name, "").strip().replace("_", "").replace(",", "")
    if not text:
        return default
    if not text.isdigit() or int(text) < 1:
        warnings.warn(f"{name}={text!r} is not a positive count; using {default}", stacklevel=2)
        return default
    return int(text)


FORMATS = ("safetensors", "pytorch", "gguf", "huggingface", "demo")
DEMO_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
HASH_CHUNK = 8 * 1024 * 1024  # sha256 is streamed in 8 MiB chunks
SAFETENSORS_MAX_HEADER = 100_000_000  # the safetensors library refuses larger headers
# What a load may allocate beyond the bytes it was handed (decoded PyTorch uploads, legacy files, pickles, JSON):
# checked before allocating. Memory-mapped and pread tensor data do not count: their bytes are on disk.
MEMORY_BUDGET = _env_bytes("SPECTRA_MEMORY_BUDGET", 1 << 30)
MAX_TENSORS = _env_count("SPECTRA_MAX_TENSORS", 100_000)  # per checkpoint, all shards together
PICKLE_AMPLIFICATION = 80  # worst case bytes of objects per pickle byte (a run of EMPTY_DICT: 72)
JSON_VALUE_BYTES = 80  # worst case bytes per parsed JSON value (an empty object and its slot)
MAX_JSON_DEPTH = 100  # config.json and index files nested deeper are refused (real ones nest 3-4 levels)
EXPANDED_ALLOWANCE = 1 << 20  # a tensor may claim this much beyond its storage (broadcast buffers); no more
READ_CHUNK = 256 << 20  # one positional read; the kernel caps a single one near 2 GiB
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy torch.save file
FOLDER_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # with config.json: a Hugging Face folder
WEIGHT_SUFFIXES = FOLDER_WEIGHT_SUFFIXES + (".gguf",)  # a folder holding one of these opens (GGUF: its own config)
LISTED_SUFFIXES = WEIGHT_SUFFIXES  # what a server folder offers
LIST_DEPTH = 2  # a server folder is listed this many levels deep
MAX_LISTED_ENTRIES = 100_000  # directory entries examined by one listing, so a huge folder cannot stall the page
MAX_SIDE_FILE = 64 << 20  # config.json, an index, tokenizer.json, heldout.txt: read whole, so bounded
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "module")  # where training scripts nest the weights
STRIPPED_PREFIXES = ("_orig_mod.", "module.")  # added by torch.compile and DistributedDataParallel
# part of a folder's content (and its sha256) when present; a folder's other side files (preprocessor_config.json,
# heldout.txt, 1_Pooling/config.json) are read later through `Checkpoint.side_file`, where one that links out of the
# server folder is ignored with a note rather than refusing the whole folder
SIDE_FILES = ("config.json", "tokenizer.json")
# kept in memory with an upload, for the runnable model (preprocessor_config.json: an image classifier's own
# normalisation of its evaluation photographs); part of the upload's sha256
UPLOADED_SIDE_FILES = ("tokenizer.json", "heldout.txt", "preprocessor_config.json")
FACTORISED_KEY = "spectra_factorised"  # healed files: metadata listing matrices stored as NAME.factor_a @ factor_b

# safetensors dtype code -> (torch dtype, bytes per element)
SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2), "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8), "I32": (torch.int32, 4), "I16": (torch.int16, 2), "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1), "U16": (torch.uint16, 2), "U32": (torch.uint32, 4),
    "U64": (torch.uint64, 8), "F8_E4M3": (torch.float8_e4m3fn, 1), "F8_E5M2": (torch.float8_e5m2, 1),
}

# Names that may hold the same matrix as an input embedding (weight tying); only equal-shape pairs are compared.
_EMBEDDING_NAME = re.compile(
    r"(^|\.)(tok_emb|wte|embed_tokens|word_embeddings|tok_embeddings|token_embedding|shared|embed_in)\.weight$")
_HEAD_NAME = re.compile(r"(^|\.)(lm_head|embed_out|decoder)\.weight$|^output\.weight$")


class CheckpointError(Exception):
    """A checkpoint that cannot be read safely. `str(error)` is one line: "<file>: <problem>"."""

    def __init__(self, source: str | os.PathLike, problem: str):
        self.source = str(source)
        self.problem = " ".join(str(problem).split())  # one line, whatever the underlying library said
        super().__init__(f"{self.source}: {self.problem}")


@dataclass(eq=False)
class Checkpoint:
    """Named tensors of one checkpoint, read lazily; shapes and dtypes are known without reading any data."""

    source: str  # the path as given, an upload's file name, or "demo"
    format: str  # one of FORMATS
    sha256: str  # hex digest of the content (see `_combined_sha256` for folders and file sets)
    shapes: dict[str, tuple[int, ...]]  # every stored name, in checkpoint order
    dtypes: dict[str, str]  # torch dtype names without the "torch." prefix: "float32", "bfloat16", ...
    config: dict | None = None  # config.json, nanoGPT `model_args`, or safetensors metadata "config"
    metadata: dict[str, str] = field(default_factory=dict)
    tied_groups: list[tuple[str, ...]] = field(default_factory=list)  # each group one matrix; first = canonical
    files: list[str] = field(default_factory=list)  # the files the content came from
    warnings: list[str] = field(default_factory=list)  # things worth telling the user that did not stop loading
    side_files: dict[str, bytes] = field(default_factory=dict, repr=False)  # uploads only: tokenizer.json,
    # heldout.txt sent with the weights (a folder's stay on disk beside them: read them with `side_file`)
    root: str | None = None  # the server folder every file of this checkpoint must resolve inside (open_in_folder)
    quantization: dict[str, tuple[str, float | None]] = field(default_factory=dict)  # name -> (quantisation type,
    # the noise sigma it alone adds, in weight units, None where no uniform step models it); empty if unquantised
    tokenizer: Callable[[], object | None] | None = None  # GGUF: builds the tokenizers.Tokenizer its vocabulary
    # holds (first call ~0.3 s, then cached), or None; None for formats that carry no tokenizer
    on_disk: bool = False  # every tensor is read from the files in `files` (not an upload held in memory)
    left_out: dict[str, str] = field(default_factory=dict)  # tensors the file holds but that cannot be read (a GGUF
    # type the gguf library cannot dequantise): name -> why; each is also in `warnings`, and in no other field
    _readers: dict[str, Callable[[str], torch.Tensor]] = field(default_factory=dict, repr=False)
    _folder: Path | None = field(default=None, repr=False)  # where side files live on disk; None for uploads

    def names(self) -> list[str]:
        """Every stored tensor name, in checkpoint order (tied aliases included)."""
        return list(self.shapes)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` in its stored dtype, read now; the caller owns it (mutating it changes nothing here)."""
        if name not in self._readers:
            raise KeyError(f"{self.source} has no tensor named {name!r}")
        return self._readers[name](name)

    def tied_with(self, name: str) -> tuple[str, ...]:
        """The other names of the matrix stored under `name` (empty when it is not tied)."""
        for group in self.tied_groups:
            if name in group:
                return tuple(n for n in group if n != name)
        return ()

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    def side_file(self, relative: str) -> bytes | None:
        """A file that came with the weights ("tokenizer.json", "heldout.txt", "1_Pooling/config.json"), or None.

        Uploads: by base name, from what was uploaded. On disk: from the weights' folder, refused (CheckpointError) if
        it resolves outside `root` (a symlink out of the server folder) or is over MAX_SIDE_FILE bytes."""
        if self._folder is None:
            return self.side_files.get(PurePosixPath(str(relative).replace("\\", "/")).name)
        parts = _relative_parts(str(relative), label=str(relative), max_depth=None)
        path = self._folder.joinpath(*parts)
        root = Path(self.root) if self.root is not None else None
        label = _shown(path, root)
        if not path.exists():  # a dangling symlink is absent too
            return None
        target = _confine(path, root, label)
        if not target.is_file():
            return None
        size = target.stat().st_size
        if size > MAX_SIDE_FILE:
            raise CheckpointError(label, f"too large: {_human_bytes(size)}, over the {_human_bytes(MAX_SIDE_FILE)} "
                                         "limit for a side file")
        return target.read_bytes()

    @property
    def n_params(self) -> int:
        """Elements of every tensor, each tied group counted once."""
        aliases = {n for group in self.tied_groups for n in group[1:]}
        return sum(_numel(shape) for name, shape in self.shapes.items() if name not in aliases)


# -------------------------------------------------------------------------------------------------------- entry points

def load_checkpoint(source: str | os.PathLike, *, max_bytes: int | None = None,
                    known_sha256: str | None = None) -> Checkpoint:
    """Open a file (.safetensors/.pt/.pth/.bin), a Hugging Face folder, or the word "demo" (the bundled model).

    `known_sha256`: the content's digest, already computed elsewhere (a Ray worker opening a file its driver hashed);
    the file is then not hashed again."""
    if isinstance(source, str) and source == "demo":
        return _load_demo(max_bytes)
    label = str(source)
    if not label.strip():
        raise CheckpointError("''", "no checkpoint path given")
    if known_sha256 is not None and not re.fullmatch(r"[0-9a-f]{64}", known_sha256):
        raise ValueError(f"known_sha256 must be 64 lowercase hex digits, got {known_sha256!r}")
    path = Path(source)
    with _reading(label):
        if path.is_dir():
            return _load_fileset(_FolderFiles(path), label, max_bytes, known_sha256)
        if not path.exists():
            raise CheckpointError(label, "no such file or folder")
        return _load_file(path, label, max_bytes, known_sha256)


def load_checkpoint_bytes(data: bytes, filename: str, *, max_bytes: int | None = None) -> Checkpoint:
    """Open one uploaded file held in memory; `filename` names it in messages (the format comes from the bytes)."""
    with _reading(filename):
        _check_size(filename, len(data), max_bytes)
        part = _open_file(filename, filename, len(data), bytes(data[:16]), data=data)
        return _assemble(part, source=filename, fmt=part.kind, sha256=hashlib.sha256(data).hexdigest(),
                         files=[filename])


def load_checkpoint_files(files: dict[str, bytes], *, max_bytes: int | None = None) -> Checkpoint:
    """Open a multi-file Hugging Face upload (config.json, shards, index, tokenizer.json), held in memory.

    Only base names matter (browsers upload files without folders). One file alone is opened like
    `load_checkpoint_bytes`."""
    by_name: dict[str, bytes] = {}
    for key, data in files.items():
        name = Path(str(key).replace("\\", "/")).name
        if name in by_name:
            raise CheckpointError(name, "uploaded twice")
        by_name[name] = data
    if not by_name:
        raise CheckpointError("upload", "no files")
    if len(by_name) == 1:
        (name, data), = by_name.items()
        return load_checkpoint_bytes(data, name, max_bytes=max_bytes)
    with _reading("upload"):
        return _load_fileset(_MemoryFiles(by_name), None, max_bytes, None)


# ------------------------------------------------------------------------------------------------- the server folder

def list_checkpoints(root: str | os.PathLike) -> list[str]:
    """What a server folder offers: weight files and Hugging Face folders (config.json beside weights), up to
    LIST_DEPTH levels down, as POSIX paths relative to `root`; folders end with "/".

    Hidden entries are skipped, and so is anything that resolves outside `root` (a symlink out of it): a folder is
    offered only if none of its files does. A weight file inside a Hugging Face folder is part of the folder, not
    offered alone; .gguf files are always offered alone. A missing root lists nothing."""
    try:
        base = Path(root).resolve(strict=True)
    except (OSError, RuntimeError):
        return []
    if not base.is_dir():
        return []
    found: list[tuple[str, ...]] = []
    budget = [MAX_LISTED_ENTRIES]

    def visit(folder: Path, parts: tuple[str, ...]) -> None:
        files, folders, escapes = _scan(folder, base, budget)
        is_model = "config.json" in files and any(n.lower().endswith(FOLDER_WEIGHT_SUFFIXES) for n in files)
        if parts and is_model and not escapes:
            found.append(parts + ("",))
        if len(parts) >= LIST_DEPTH:  # a folder at the last level is offered whole, its contents are not
            return
        for name, target in files.items():
            if target is None or not name.lower().endswith(LISTED_SUFFIXES):
                continue
            if name.lower().endswith(".gguf") or "config.json" not in files:
                found.append(parts + (name,))
        for name in folders:
            visit(folder / name, parts + (name,))

    visit(base, ())
    return ["/".join(parts) for parts in sorted(found)]


def open_in_folder(root: str | os.PathLike, relative: str, *, max_bytes: int | None = None) -> Checkpoint:
    """Open the entry `relative` (as `list_checkpoints` names it) of the server folder `root`.

    Every path opened resolves inside `root`: the entry, each file read inside a folder, index-listed shards,
    config.json and tokenizer.json; `Checkpoint.root` records it so that side files read later
    (`Checkpoint.side_file`) are held to it too. Messages name the relative path, never the server's own paths."""
    shown = str(relative)
    try:
        base = Path(root).resolve(strict=True)
    except (OSError, RuntimeError):
        raise CheckpointError(shown, "the server's checkpoint folder is missing") from None
    hidden = [str(Path(root)), str(base)]
    try:
        with _reading(shown):
            parts = _relative_parts(shown, label=shown, max_depth=LIST_DEPTH)
            entry = base.joinpath(*parts)
            target = _confine(entry, base, shown)
            name = "/".join(parts)
            if target.is_dir():
                ckpt = _load_fileset(_FolderFiles(entry, root=base, shown=name), name + "/", max_bytes, None)
            elif target.is_file():
                ckpt = _load_file(target, name, max_bytes, None, recorded=entry)
            else:
                raise CheckpointError(shown, "no such file or folder")
    except CheckpointError as e:  # a library's message may still carry an absolute path: strip the folder
        raise CheckpointError(_scrub(e.source, hidden), _scrub(e.problem, hidden)) from None
    ckpt.root = str(base)
    return ckpt


def _scan(folder: Path, base: Path, budget: list[int]) -> tuple[dict[str, Path | None], dict[str, Path], bool]:
    """The visible files (name -> resolved path, None when it resolves outside `base`), the visible folders that
    stay inside `base`, and whether any visible entry (file or folder) resolves outside it, of one listed folder."""
    files: dict[str, Path | None] = {}
    folders: dict[str, Path] = {}
    escapes = False
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                budget[0] -= 1
                if budget[0] < 0:
                    break
                if entry.name.startswith("."):
                    continue
                try:
                    target = Path(entry.path).resolve(strict=True)
                except (OSError, RuntimeError):  # dangling symlink, loop, permission
                    continue
                inside = _is_inside(target, base)
                escapes = escapes or not inside
                if target.is_dir():
                    if inside:
                        folders[entry.name] = target
                elif target.is_file():
                    files[entry.name] = target if inside else None
    except OSError:
        pass
    return files, folders, escapes


def _relative_parts(relative: str, *, label: str, max_depth: int | None) -> tuple[str, ...]:
    """The parts of a relative POSIX path; absolute paths, "..", hidden parts and NUL bytes are refused."""
    text = relative.strip().replace("\\", "/")
    pure = PurePosixPath(text)
    parts = tuple(p for p in pure.parts if p not in ("", "."))
    if not parts:
        raise CheckpointError(label or "''", "no checkpoint named")
    if pure.is_absolute() or re.match(r"^[A-Za-z]:", text) or "\x00" in text:
        raise CheckpointError(label, "not a path inside the server's checkpoint folder")
    if any(p == ".." or p.startswith(".") for p in parts):
        raise CheckpointError(label, "outside the server's checkpoint folder (.. or a hidden entry)")
    if max_depth is not None and len(parts) > max_depth:
        raise CheckpointError(label, f"deeper than the {max_depth} levels the server folder offers")
    return parts


def _confine(path: Path, root: Path | None, label: str) -> Path:
    """`path` resolved (symlinks followed), refused if it resolves outside `root` (no check without a root)."""
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        raise CheckpointError(label, "no such file or folder") from None
    except RuntimeError:  # a symlink loop
        raise CheckpointError(label, "a symlink loop") from None
    if root is not None and not _is_inside(target, root):
        raise CheckpointError(label, "resolves outside the server's checkpoint folder (a symlink?); refused")
    return target


def _is_inside(target: Path, root: Path) -> bool:
    return target == root or root in target.parents


def _shown(path: Path, root: Path | None) -> str:
    """How a message names `path`: relative to the server folder when there is one, else as given."""
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            return path.name
    return str(path)


def _scrub(text: str, hidden: list[str]) -> str:
    for prefix in sorted(set(hidden), key=len, reverse=True):
        if prefix and prefix != "/":
            text = text.replace(prefix + os.sep, "").replace(prefix, ".")
    return text


# ---------------------------------------------------------------------------------------------------------- file sets

class _FolderFiles:
    """Files of a folder on disk, named relative to it; with a `root`, each must resolve inside it when touched."""

    def __init__(self, folder: Path, *, root: Path | None = None, shown: str | None = None):
        self.folder, self.root = folder, root
        self.shown = shown if shown is not None else str(folder)

    def label(self, name: str) -> str:
        return f"{self.shown}/{name}" if self.root is not None else str(self.folder / name)

    def names(self) -> list[str]:
        return sorted(p.name for p in self.folder.iterdir() if p.is_file())

    def target(self, name: str) -> Path:
        """The file to read for `name`: resolved, and confined to the root when there is one."""
        return _confine(self.folder / name, self.root, self.label(name))

    def exists(self, name: str) -> bool:
        if not (self.folder / name).is_file():
            return False
        self.target(name)  # a side file that points outside the root is refused, not ignored
        return True

    def size(self, name: str) -> int:
        return self.target(name).stat().st_size

    def read(self, name: str) -> bytes:
        target = self.target(name)
        size = target.stat().st_size
        if size > MAX_SIDE_FILE:
            raise CheckpointError(self.label(name), f"too large: {_human_bytes(size)}, over the "
                                                    f"{_human_bytes(MAX_SIDE_FILE)} limit for a side file")
        return target.read_bytes()

    def sha256(self, name: str) -> str:
        return _sha256_file(self.target(name))

    def open(self, name: str, budget: _Budget) -> _Part:
        target = self.target(name)
        with target.open("rb") as f:
            head = f.read(16)
        return _open_file(self.label(name), name, target.stat().st_size, head, path=target, budget=budget)

    def path(self, name: str) -> str:
        return str(self.folder / name)


class _MemoryFiles:
    """Uploaded files held in memory, by base name."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files

    def label(self, name: str) -> str:
        return name

    def names(self) -> list[str]:
        return sorted(self.files)

    def exists(self, name: str) -> bool:
        return name in self.files

    def size(self, name: str) -> int:
        return len(self.files[name])

    def read(self, name: str) -> bytes:
        return self.files[name]

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def open(self, name: str, budget: _Budget) -> _Part:
        data = self.files[name]
        return _open_file(name, name, len(data), bytes(data[:16]), data=data, budget=budget)

    def path(self, name: str) -> str:
        return name


def _load_demo(max_bytes: int | None) -> Checkpoint:
    path = DEMO_DIR / "model.safetensors"
    if not path.is_file():
        raise CheckpointError("demo", f"the bundled demo model is missing ({path}); rebuild it with "
                                      "`python models/train_demo.py`")
    ckpt = load_checkpoint(path, max_bytes=max_bytes)
    ckpt.source, ckpt.format = "demo", "demo"
    config_path = DEMO_DIR / "config.json"
    if config_path.is_file():  # the model card's config names the architecture; the metadata copy does not
        ckpt.config = _read_json(str(config_path), config_path.read_bytes())
    return ckpt


def _load_file(path: Path, label: str, max_bytes: int | None, known_sha256: str | None, *,
               recorded: Path | None = None) -> Checkpoint:
    """One weights file on disk; `recorded` is the path to report in `Checkpoint.files` (default `path`)."""
    if not path.is_file():
        raise CheckpointError(label, "not a regular file or folder")
    size = path.stat().st_size
    _check_size(label, size, max_bytes)
    digest = known_sha256 or _sha256_file(path)
    with path.open("rb") as f:
        head = f.read(16)
    part = _open_file(label, path.name, size, head, path=path)
    shown = recorded if recorded is not None else path
    ckpt = _assemble(part, source=label, fmt=part.kind, sha256=digest, files=[str(shown)])
    ckpt._folder, ckpt.on_disk = shown.parent, True
    return ckpt


def _load_fileset(store: _FolderFiles | _MemoryFiles, label: str | None, max_bytes: int | None,
                  known_sha256: str | None) -> Checkpoint:
    """A Hugging Face layout: one weights file, or shards listed in an index, plus config.json and tokenizer.json."""
    present = store.names()
    index_name, weights_name = _choose_weights(present, label or "upload")
    if index_name is None and weights_name is None:
        where = label if label is not None else "upload"
        listing = ", ".join(present[:8]) + (", ..." if len(present) > 8 else "") if present else "nothing"
        raise CheckpointError(where, "no weights found: expected model.safetensors, pytorch_model.bin, a sharded "
                                     f"*.index.json or one .safetensors/.pt/.pth/.bin file (found {listing})")
    source = label if label is not None else (index_name or weights_name)

    if index_name is not None:
        shard_of = _read_index(store, index_name)
        used = sorted(set(shard_of.values()))
        for shard in used:
            if not store.exists(shard):
                raise CheckpointError(store.label(index_name), f"lists shard {shard}, which is missing")
    else:
        shard_of, used = None, [weights_name]
    side = [n for n in SIDE_FILES if store.exists(n)]
    content = sorted(set(used + side + ([index_name] if index_name else [])))
    _check_size(source, sum(store.size(n) for n in content), max_bytes)

    budget = _Budget()  # one for the whole set: what each shard keeps in memory adds up
    parts = {shard: store.open(shard, budget) for shard in used}
    if shard_of is None:
        merged = parts[weights_name]
    else:
        merged = _merge_shards(store, index_name, shard_of, parts, used)
    config = None
    if "config.json" in side:
        config = _read_json(store.label("config.json"), store.read("config.json"))
    elif merged.config is not None:
        config = merged.config
    merged.config = config
    # the upload's held-out text changes what the loaded model is evaluated on, so it is part of its identity
    hashed = sorted(set(content) | ({n for n in UPLOADED_SIDE_FILES if store.exists(n)}
                                     if isinstance(store, _MemoryFiles) else set()))
    digest = known_sha256 or _combined_sha256({n: store.sha256(n) for n in hashed})
    fmt = "gguf" if merged.kind == "gguf" else "huggingface"  # a folder around one GGUF is still a GGUF
    ckpt = _assemble(merged, source=source, fmt=fmt, sha256=digest, files=[store.path(n) for n in content])
    if isinstance(store, _MemoryFiles):
        ckpt.side_files = {n: store.read(n) for n in UPLOADED_SIDE_FILES if store.exists(n)}
    else:
        ckpt._folder, ckpt.on_disk = store.folder, True
    return ckpt


def _choose_weights(present: list[str], label: str) -> tuple[str | None, str | None]:
    """(index file, single weights file) to use from the names present; preference follows transformers."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if index in present:
            return index, None
        if single in present:
            return None, single
    indexes = [n for n in present if n.endswith(".index.json")]
    if len(indexes) == 1:
        return indexes[0], None
    weights = [n for n in present if n.lower().endswith(WEIGHT_SUFFIXES)]
    if len(weights) == 1:
        return None, weights[0]
    if len(indexes) > 1 or len(weights) > 1:
        found = ", ".join((indexes or weights)[:6])
        raise CheckpointError(label, f"several weight files ({found}) and no single index to say which belong together")
    return None, None


def _read_index(store, index_name: str) -> dict[str, str]:
    index = _read_json(store.label(index_name), store.read(index_name))
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(store.label(index_name), "index has no weight_map (tensor name -> shard file)")
    if len(weight_map) > MAX_TENSORS:
        raise CheckpointError(store.label(index_name), f"too many tensors: {len(weight_map):,}, over the bound of "
                                                       f"{MAX_TENSORS:,} (SPECTRA_MAX_TENSORS)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard or any(c in shard for c in "/\\\x00") or shard.startswith("."):
            raise CheckpointError(store.label(index_name), f"weight_map entry {_quote(name)} names a bad shard "
                                                           f"{_quote(shard)}")
    return dict(weight_map)


def _merge_shards(store, index_name: str, shard_of: dict[str, str], parts: dict[str, _Part],
                  used: list[str]) -> _Part:
    merged = _Part(kind="huggingface")
    for shard in used:  # shards in file order, names in each shard's own order
        part = parts[shard]
        for name in part.order:
            if shard_of.get(name) == shard:
                merged.add(name, part.shapes[name], part.dtypes[name], part.readers[name])
                if name in part.quantization:
                    merged.quantization[name] = part.quantization[name]
        for group in part.shared:
            kept = [n for n in group if shard_of.get(n) == shard]
            if len(kept) > 1:
                merged.shared.append(kept)
        for key, value in part.metadata.items():
            merged.metadata.setdefault(key, value)
        if merged.config is None:
            merged.config = part.config
        merged.tokenizer = merged.tokenizer or part.tokenizer
        merged.left_out.update(part.left_out)
        merged.warnings += part.warnings
        merged.natural_order = merged.natural_order or part.natural_order
    for name, shard in shard_of.items():
        if name not in merged.shapes:
            raise CheckpointError(store.label(shard), f"has no tensor {name!r}, which {index_name} places there")
    return merged


# ------------------------------------------------------------------------------------------------------ single files

@dataclass
class _Part:
    """What one file (or a merged set of shards) holds, before tie detection."""

    kind: str
    order: list[str] = field(default_factory=list)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dtypes: dict[str, str] = field(default_factory=dict)
    readers: dict[str, Callable[[str], torch.Tensor]] = field(default_factory=dict)
    shared: list[list[str]] = field(default_factory=list)  # names that share one storage
    metadata: dict[str, str] = field(default_factory=dict)
    config: dict | None = None
    natural_order: bool = False  # the writer sorted names alphabetically; sort them "naturally" instead
    warnings: list[str] = field(default_factory=list)
    quantization: dict[str, tuple[str, float | None]] = field(default_factory=dict)  # see Checkpoint.quantization
    tokenizer: Callable[[], object | None] | None = None  # see Checkpoint.tokenizer
    left_out: dict[str, str] = field(default_factory=dict)  # see Checkpoint.left_out

    def add(self, name: str, shape: tuple[int, ...], dtype: str, reader: Callable[[str], torch.Tensor]) -> None:
        self.order.append(name)
        self.shapes[name] = shape
        self.dtypes[name] = dtype
        self.readers[name] = reader


class _Budget:
    """Memory one load may allocate beyond the bytes it was handed, checked before anything is allocated.

    `kept` bytes stay for the checkpoint's life (storages a PyTorch upload or legacy file decodes into memory);
    `passing` bytes are freed before the next file (unpickled objects, a parsed JSON header)."""

    def __init__(self):
        self.kept = 0

    def spend(self, label: str, *, kept: int = 0, passing: int = 0, what: str) -> None:
        need = self.kept + kept + passing
        if need > MEMORY_BUDGET:
            raise CheckpointError(label, f"{what} would take about {_human_bytes(need)} of memory, over the "
                                         f"{_human_bytes(MEMORY_BUDGET)} budget (SPECTRA_MEMORY_BUDGET)")
        self.kept += kept


def _open_file(label: str, filename: str, size: int, head: bytes, *, path: Path | None = None,
               data: bytes | None = None, budget: _Budget | None = None) -> _Part:
    kind = _sniff(label, filename, size, head)
    budget = budget if budget is not None else _Budget()
    if kind == "gguf":
        return _open_gguf(label, path=path, data=data)
    if kind == "safetensors":
        return _open_safetensors(label, size, path=path, data=data, budget=budget)
    return _open_pytorch(label, size, is_zip=(kind == "zip"), path=path, data=data, budget=budget)


def _sniff(label: str, filename: str, size: int, head: bytes) -> str:
    """'safetensors', 'zip', 'pickle' or 'gguf', from the first bytes; the extension only chooses the error message."""
    if size == 0:
        raise CheckpointError(label, "empty file (0 bytes)")
    if is_gguf(head):
        return "gguf"
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= SAFETENSORS_MAX_HEADER:
        return "safetensors"
    if head[:1] == b"\x80" and len(head) >= 2 and 2 <= head[1] <= 5:
        return "pickle"
    suffix = Path(filename).suffix.lower()
    if suffix == ".safetensors":
        return "safetensors"  # let the header check say what exactly is wrong
    # the file's own bytes are never quoted: a message may reach a browser, and the bytes may not be the user's
    if _looks_like_text(head):
        problem = "not a checkpoint: the file is text"
    elif suffix in WEIGHT_SUFFIXES:
        problem = "not a checkpoint: no safetensors header, zip, pickle or GGUF signature"
    else:
        problem = "unknown format: not safetensors, a PyTorch zip, a pickle or GGUF"
    raise CheckpointError(label, problem)


def _looks_like_text(head: bytes) -> bool:
    try:  # incremental: a character cut at the end of `head` is not an error
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


# ------------------------------------------------------------------------------------------------------------ GGUF

def _open_gguf(label: str, *, path: Path | None, data: bytes | None) -> _Part:
    """A GGUF file through `spectral.gguf` (its header checked there): tensors as float32 under Hugging Face names where
    transformers knows the architecture, the config from the metadata, the tokenizer built lazily. A tensor the gguf
    library cannot dequantise is left out with a warning; so, in an upload, is one whose float32 copy would exceed
    the memory budget (a few quantised bytes must not become gigabytes in memory)."""
    try:
        g = open_gguf(path if path is not None else data)
        if len(g.tensors) > MAX_TENSORS:
            raise CheckpointError(label, f"too many tensors: {len(g.tensors):,}, over the bound of {MAX_TENSORS:,} "
                                         "(SPECTRA_MAX_TENSORS)")
        quantization = g.quantization()
    except GGUFError as e:
        raise CheckpointError(label, str(e)) from None
    part = _Part(kind="gguf", config=g.config, metadata=g.metadata_strings(),
                 warnings=[f"{label}: {note}" for note in g.notes])
    refused = g.refused()
    for name, reason in refused.items():
        part.left_out[name] = f"{g.info(name).type_name}: {reason}"
        part.warnings.append(f"{label}: tensor {_quote(name)} ({g.info(name).type_name}) left out: {reason}")
    reader = _GGUFReader(g, label)
    for name in g.names():
        if name in refused:
            continue
        info = g.info(name)
        if data is not None and _numel(info.shape) * 4 > MEMORY_BUDGET:
            part.left_out[name] = f"{info.type_name}: float32 copy over the memory budget for an upload"
            part.warnings.append(f"{label}: tensor {_quote(name)} ({info.type_name}) left out: its float32 copy "
                                 f"would take {_human_bytes(_numel(info.shape) * 4)}, over the "
                                 f"{_human_bytes(MEMORY_BUDGET)} budget for an upload (open it from the server "
                                 "folder instead)")
            continue
        part.add(name, info.shape, "float32", reader)
        part.quantization[name] = quantization[name]
    if not part.order:
        if not g.tensors:
            raise CheckpointError(label, "no tensors in the file")
        first = next(w for w in part.warnings if " left out: " in w).removeprefix(f"{label}: ")
        raise CheckpointError(label, f"no readable tensors: all {len(g.tensors)} left out (the first: {first})")
    part.tokenizer = g.tokenizer
    return part


class _GGUFReader:
    """Tensors of a GGUF file, each dequantised to float32 when asked for; the reader's failures name the file as the
    loader names it."""

    def __init__(self, g: GGUFFile, label: str):
        self.g, self.label = g, label

    def __call__(self, name: str) -> torch.Tensor:
        try:
            return self.g.tensor(name)
        except GGUFError as e:
            raise CheckpointError(self.label, str(e)) from None


# ---------------------------------------------------------------------------------------------------- safetensors

@dataclass(frozen=True)
class _Span:
    """Where one tensor's bytes lie in its file, and what they are."""

    start: int  # absolute offset in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _open_safetensors(label: str, size: int, *, path: Path | None, data: bytes | None, budget: _Budget) -> _Part:
    """Validate the header as strictly as the safetensors library does (uploads never reach the library), then read
    tensors by offset: from an upload's bytes, or from one descriptor per file kept open for the checkpoint's life."""
    if path is not None:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            header, data_start = _parse_safetensors_header(label, size, lambda start, n: _pread(fd, start, n), budget)
            _library_agrees(label, path)
            reader: _SafetensorsPath | _SafetensorsBytes = _SafetensorsPath(path, label, fd)
        except BaseException:
            os.close(fd)
            raise
    else:
        view = memoryview(data)
        header, data_start = _parse_safetensors_header(label, size, lambda start, n: bytes(view[start:start + n]),
                                                       budget)
        reader = _SafetensorsBytes(data, label)
    part = _Part(kind="safetensors", natural_order=True)
    meta = header.pop("__metadata__", None) or {}
    part.metadata = dict(meta)
    if "config" in meta:
        try:
            config = _read_json(label, meta["config"].encode("utf-8", "surrogatepass"), "metadata 'config': ")
            part.config = config
        except CheckpointError:
            part.warnings.append(f"{label}: metadata 'config' is not a valid JSON object; ignored")
    for name, entry in header.items():
        dtype = SAFETENSORS_DTYPES[entry["dtype"]][0]
        begin, end = entry["data_offsets"]
        shape = tuple(entry["shape"])
        reader.spans[name] = _Span(data_start + begin, end - begin, dtype, shape)
        part.add(name, shape, _dtype_name(dtype), reader)
    if FACTORISED_KEY in part.metadata:
        _present_factorised(label, part, budget)
    return part


@dataclass(frozen=True)
class _Factorised:
    """One matrix a healed file stores as a @ b (spectral/heal.py `save_healed`)."""

    a: str
    b: str
    shape: tuple[int, ...]  # the dense tensor's stored shape
    names: tuple[str, ...]  # the matrix's name, then its tied names


def _present_factorised(label: str, part: _Part, budget: _Budget) -> None:
    """Healed files: each matrix listed in metadata spectra_factorised ({NAME: {"a", "b", "shape", "rank", "dtype",
    "tied_with"}}) becomes the float32 tensor NAME = a @ b reshaped to `shape`, and each tied name the same matrix (a
    tied group); the factor tensors are hidden. As `spectral.heal.densify`, checked first: the factors exist, are
    floating point, multiply (rows x k, k x cols) into `shape`, are used once, and a dense matrix fits the memory
    budget (rank-0 factors hold no bytes at all, so the file's size bounds nothing)."""
    what = f"metadata {FACTORISED_KEY!r}: "
    entries = _read_json(label, part.metadata[FACTORISED_KEY].encode("utf-8", "surrogatepass"), what, budget=budget)
    used: set[str] = set()
    matrices: list[_Factorised] = []
    for name, entry in entries.items():
        shown = _quote(name)
        if not isinstance(entry, dict):
            raise CheckpointError(label, f"{what}entry {shown} is not an object")
        a, b, shape, aliases = entry.get("a"), entry.get("b"), entry.get("shape"), entry.get("tied_with", [])
        if not (isinstance(a, str) and isinstance(b, str) and a in part.shapes and b in part.shapes and a != b):
            raise CheckpointError(label, f"{what}entry {shown} names factors {_quote(a)} and {_quote(b)}, which the "
                                         "file does not hold")
        if not (isinstance(shape, list) and shape and all(_is_count(d) for d in shape)):
            raise CheckpointError(label, f"{what}entry {shown} has shape {_quote(shape)}")
        if not (isinstance(aliases, list) and all(isinstance(n, str) for n in aliases)):
            raise CheckpointError(label, f"{what}entry {shown} has tied_with {_quote(aliases)}, not a list of names")
        sa, sb = part.shapes[a], part.shapes[b]
        if len(sa) != 2 or len(sb) != 2 or sa[1] != sb[0] or sa[0] * sb[1] != _numel(shape):
            raise CheckpointError(label, f"{what}factors {_quote(a)} {list(sa)} and {_quote(b)} {list(sb)} do not "
                                         f"multiply into shape {shape}")
        if not all(part.dtypes[f].startswith(("float", "bfloat")) for f in (a, b)):
            raise CheckpointError(label, f"{what}factors of {shown} are not floating point")
        if _numel(shape) * 4 > MEMORY_BUDGET:
            raise CheckpointError(label, f"{what}matrix {shown} would take {_human_bytes(_numel(shape) * 4)} as a "
                                         f"dense float32 tensor, over the {_human_bytes(MEMORY_BUDGET)} budget "
                                         "(SPECTRA_MEMORY_BUDGET)")
        names = (name, *aliases)
        if used & {a, b, *names} or len(set(names)) != len(names):
            raise CheckpointError(label, f"{what}entry {shown} reuses a factor or a name of another entry")
        used.update((a, b, *names))
        matrices.append(_Factorised(a, b, tuple(shape), names))
    clash = [n for m in matrices for n in m.names if n in part.shapes]
    if clash:
        raise CheckpointError(label, f"{what}{_quote(clash[0])} is both a stored tensor and a factorised matrix")
    factors = {f for m in matrices for f in (m.a, m.b)}
    if len(part.order) - len(factors) + sum(len(m.names) for m in matrices) > MAX_TENSORS:
        raise CheckpointError(label, f"{what}too many tensors once densified, over the bound of {MAX_TENSORS:,} "
                              "(SPECTRA_MAX_TENSORS)")
    # the factorisation is consumed (a cut of this checkpoint saved again holds dense tensors); the note stays
    kept = _Part(kind=part.kind, metadata={k: v for k, v in part.metadata.items() if k != FACTORISED_KEY},
                 config=part.config, natural_order=part.natural_order, warnings=part.warnings)
    for name in part.order:
        if name not in factors:
            kept.add(name, part.shapes[name], part.dtypes[name], part.readers[name])
    for m in matrices:
        product = _FactorProduct(part.readers, m)
        for name in m.names:
            kept.add(name, m.shape, "float32", product)
        if len(m.names) > 1:
            kept.shared.append(list(m.names))
    part.__dict__.update(kept.__dict__)


class _FactorProduct:
    """A healed file's factorised matrix, multiplied out in float32 when read (a new tensor on each call)."""

    def __init__(self, readers: dict[str, Callable[[str], torch.Tensor]], matrix: _Factorised):
        self.readers, self.matrix = readers, matrix

    def __call__(self, name: str) -> torch.Tensor:
        m = self.matrix
        a = self.readers[m.a](m.a).to(torch.float32)
        b = self.readers[m.b](m.b).to(torch.float32)
        return (a @ b).reshape(m.shape)


def _library_agrees(label: str, path: Path) -> None:
    """The safetensors library must accept the file too (its header parse reads no tensor data)."""
    try:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt", device="cpu"):
            pass
    except Exception as e:  # noqa: BLE001 - whatever the library raises becomes a readable refusal
        raise CheckpointError(label, f"unreadable safetensors file: {_first_line(e)}") from None


def _parse_safetensors_header(label: str, size: int, read: Callable[[int, int], bytes],
                              budget: _Budget) -> tuple[dict, int]:
    """Check a safetensors header against the file; returns the header and where the tensor data starts.

    Layout of https://github.com/huggingface/safetensors: 8 bytes little-endian header length N, N bytes of JSON
    {name: {dtype, shape, data_offsets}, __metadata__: {str: str}}, then the tensor data, which the data_offsets must
    cover exactly, contiguously, each span matching shape x dtype size. Everything the library refuses is refused
    (NaN, duplicate keys, lone surrogates, "-0", nesting past scalars, sizes overflowing 64 bits), and more: at most
    MAX_TENSORS tensors, and a header whose parse could outgrow the memory budget is refused before it is parsed."""
    if size < 8:
        raise CheckpointError(label, f"truncated file: {size} bytes, shorter than the 8-byte header length")
    n = int.from_bytes(read(0, 8), "little")  # never quoted in a message: it is the file's first 8 bytes
    data_len = size - 8 - n
    if n < 2:
        raise CheckpointError(label, "bogus header: the header length is too small to hold a header")
    if data_len < 0:
        raise CheckpointError(label, f"header past end: the header length is larger than the {size - 8} bytes "
                                     "after it")
    if n > SAFETENSORS_MAX_HEADER:
        raise CheckpointError(label, f"bogus header: the header length is over the {SAFETENSORS_MAX_HEADER} byte "
                                     "limit")
    raw = read(8, n)
    declared = raw.count(b'"data_offsets"')
    if declared > MAX_TENSORS:
        raise CheckpointError(label, f"too many tensors: the header declares about {declared:,}, over the bound of "
                                     f"{MAX_TENSORS:,} (SPECTRA_MAX_TENSORS)")
    header = _read_json(label, raw, "bogus header: ", strict=True, budget=budget)
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(label, "bogus header: __metadata__ must map names to strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        shown = _quote(name)
        if not (isinstance(entry, dict) and {"dtype", "shape", "data_offsets"} <= set(entry)):
            raise CheckpointError(label, f"bogus header: entry {shown} needs dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str):
            raise CheckpointError(label, f"bogus header: tensor {shown} has a dtype that is a "
                                         f"{type(dtype).__name__}, not a name")
        if any(isinstance(v, (dict, list)) for k, v in entry.items() if k not in ("shape", "data_offsets")):
            raise CheckpointError(label, f"bogus header: entry {shown} nests a structure where a value belongs")
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(label, f"unsupported dtype {_quote(dtype)} for tensor {shown}")
        if not (isinstance(shape, list) and all(_is_count(d) and d < 2 ** 63 for d in shape)):
            raise CheckpointError(label, f"bogus header: tensor {shown} has shape {_quote(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise CheckpointError(label, f"bogus header: tensor {shown} has data_offsets {_quote(offsets)}")
        count = 1
        for d in shape:  # in the library's order, so an overflow it would see is seen here too
            count *= d
            if count >= 2 ** 64:
                raise CheckpointError(label, f"bogus header: tensor {shown} has a shape whose size overflows 64 bits")
        need = count * SAFETENSORS_DTYPES[dtype][1]
        if offsets[1] - offsets[0] != need:
            raise CheckpointError(label, f"bogus header: tensor {shown} of shape {shape} {dtype} needs {need} bytes, "
                                         f"its data_offsets {offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    if not spans:
        raise CheckpointError(label, "no tensors in the file")
    if len(spans) > MAX_TENSORS:
        raise CheckpointError(label, f"too many tensors: {len(spans):,}, over the bound of {MAX_TENSORS:,} "
                                     "(SPECTRA_MAX_TENSORS)")
    spans.sort()
    end = 0
    for begin, stop, name in spans:
        if begin != end:  # a gap or an overlap: the header does not describe the data as written
            if stop > data_len:
                raise CheckpointError(label, f"offsets past end: tensor {_quote(name)} has data_offsets [{begin}, "
                                             f"{stop}] beyond the {data_len} bytes of tensor data")
            raise CheckpointError(label, f"bogus header: tensor {_quote(name)} starts at byte {begin} of the data, "
                                         f"expected {end} (gap or overlap)")
        end = stop
    if end > data_len:
        raise CheckpointError(label, f"truncated file: header says {end} bytes of tensor data, file has {data_len}")
    if end < data_len:
        raise CheckpointError(label, f"corrupt file: {data_len - end} bytes after the last tensor "
                                     f"(header accounts for {end} of {data_len} bytes of tensor data)")
    return header, 8 + n


class _SafetensorsPath:
    """Tensors of a safetensors file on disk: one descriptor, opened at load and kept, read by offset (pread), so a
    read costs one copy whatever the header's size and threads never share a file position. Each call hands out a
    new tensor; a file changed on disk since it was opened is refused rather than read."""

    def __init__(self, path: Path, label: str, fd: int):
        self.path, self.label, self.fd = path, label, fd
        self.spans: dict[str, _Span] = {}
        stat = os.fstat(fd)
        self.stamp = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
        self._closer = weakref.finalize(self, os.close, fd)

    def __call__(self, name: str) -> torch.Tensor:
        span = self.spans[name]
        stat = os.fstat(self.fd)
        if (stat.st_size, stat.st_mtime_ns, stat.st_ino) != self.stamp:
            raise CheckpointError(self.label, "changed on disk since it was opened; open it again")
        out = torch.empty(span.nbytes, dtype=torch.uint8)
        try:
            _pread_into(self.fd, memoryview(out.numpy()), span.start)
        except OSError as e:
            raise CheckpointError(self.label, f"cannot read tensor {_quote(name)}: {e.strerror or e}") from None
        return out.view(span.dtype).reshape(span.shape)


class _SafetensorsBytes:
    """Tensors of an uploaded safetensors file, each copied out of the upload's bytes when asked for."""

    def __init__(self, data: bytes, label: str):
        self.data, self.label = data, label
        self.spans: dict[str, _Span] = {}

    def __call__(self, name: str) -> torch.Tensor:
        span = self.spans[name]
        out = torch.empty(span.nbytes, dtype=torch.uint8)
        if span.nbytes:
            memoryview(out.numpy())[:] = memoryview(self.data)[span.start:span.start + span.nbytes]
        return out.view(span.dtype).reshape(span.shape)


def _pread(fd: int, start: int, n: int) -> bytes:
    out = bytearray(n)
    got = _pread_into(fd, memoryview(out), start)
    return bytes(out[:got])


def _pread_into(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill `buffer` from the file at `offset` (positional reads, in chunks; the kernel caps one at ~2 GiB)."""
    buffer = buffer.cast("B")
    done = 0
    while done < len(buffer):
        chunk = buffer[done:done + READ_CHUNK]
        if hasattr(os, "preadv"):
            got = os.preadv(fd, [chunk], offset + done)
        else:  # pragma: no cover - platforms without preadv
            piece = os.pread(fd, len(chunk), offset + done)
            chunk[:len(piece)] = piece
            got = len(piece)
        if got == 0:
            raise OSError(0, "the file ends early (truncated since it was opened?)")
        done += got
    return done


# -------------------------------------------------------------------------------------------------------- PyTorch

def _open_pytorch(label: str, size: int, *, is_zip: bool, path: Path | None, data: bytes | None,
                  budget: _Budget) -> _Part:
    """torch.load with weights_only=True: only tensors and plain containers; any other global is refused.

    Before torch.load runs, the file's declarations are checked against its bytes and the memory budget (zip entries
    stored, not compressed, and not overlapping; the pickle dry-run by `_Census`: storages within their records,
    tensors within their storages, nothing allocated by the pickle itself beyond the budget)."""
    census = _check_torch_zip(label, size, path, data, budget) if is_zip else _check_legacy(label, size, path, data,
                                                                                            budget)
    # torch.load hands any path ending in ".safetensors" to the safetensors library whatever its bytes: such a file
    # (a torch zip misnamed) goes in as an open file, without mmap
    if path is None:
        target, mmap = io.BytesIO(data), False
    elif str(path).endswith(".safetensors"):
        target, mmap = path.open("rb"), False
    else:
        target, mmap = str(path), is_zip  # torch memory-maps zip files only
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = torch.load(target, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - every failure of an untrusted file becomes one readable line
        raise CheckpointError(label, _explain_torch_load_error(e)) from None
    finally:
        if not isinstance(target, str):
            target.close()
    del census
    part = _Part(kind="pytorch")
    state = _find_state_dict(label, obj)
    if isinstance(obj, dict):
        part.metadata, part.config = _pytorch_extras(obj, state)
        if part.config is not None and _json_depth(part.config) > MAX_JSON_DEPTH:
            part.warnings.append(f"{label}: its model config nests more than {MAX_JSON_DEPTH} levels deep; ignored")
            part.config = None
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        if value.layout != torch.strided or value.device.type != "cpu":
            part.warnings.append(f"{label}: tensor {_quote(key)} is {value.layout}/{value.device}; skipped")
            continue
        _check_extent(label, str(key), value)
        tensors[str(key)] = value
    if not tensors:
        raise CheckpointError(label, "no tensors found in the state dict")
    tensors = _strip_prefixes(tensors)
    reader = _StateDictReader(tensors)
    for name, value in tensors.items():
        part.add(name, tuple(value.shape), _dtype_name(value.dtype), reader)
    part.shared = _shared_storage_groups(tensors)
    return part


def _check_extent(label: str, name: str, value: torch.Tensor) -> None:
    """A tensor may not claim more elements than its storage holds (stride-0 "expanded" views would inflate to their
    full size on the first copy): a few bytes must not become gigabytes when read."""
    nbytes = value.numel() * value.element_size()
    held = value.untyped_storage().nbytes()
    if nbytes > max(held, EXPANDED_ALLOWANCE):
        raise CheckpointError(label, f"tensor {_quote(name)} claims {_human_bytes(nbytes)} over a storage of "
                                     f"{_human_bytes(held)} (overlapping strides); refused")


def _check_torch_zip(label: str, size: int, path: Path | None, data: bytes | None, budget: _Budget) -> _Dry:
    """A torch zip's entries and pickle, checked before torch.load: stored entries only (torch never compresses;
    an inflating entry is how a 1 MB file becomes gigabytes), each lying whole inside the file without overlap, the
    pickle within the budget, and every storage it declares within its record."""
    with (path.open("rb") if path is not None else contextlib.nullcontext(io.BytesIO(data))) as f:
        entries = _zip_entry_count(label, f, size)
        if entries > MAX_TENSORS + 64:
            raise CheckpointError(label, f"too many zip entries: {entries:,}, over the bound of {MAX_TENSORS + 64:,}")
        try:
            archive = zipfile.ZipFile(f)
        except Exception as e:  # noqa: BLE001 - zipfile parsing untrusted bytes: any failure is damage
            raise CheckpointError(label, f"corrupt PyTorch file: damaged zip archive ({type(e).__name__})") from None
        with archive:
            infos = archive.infolist()
            if not infos:
                raise CheckpointError(label, "corrupt PyTorch file: an empty zip archive")
            regions = sorted(infos, key=lambda i: i.header_offset)
            for info, following in zip(regions, regions[1:] + [None]):
                shown = _quote(info.filename)
                if info.compress_type != zipfile.ZIP_STORED:
                    raise CheckpointError(label, f"refused: zip entry {shown} is compressed (PyTorch stores entries "
                                                 "as they are; a compressed one could inflate far past the file)")
                if info.file_size != info.compress_size:
                    raise CheckpointError(label, f"corrupt PyTorch file: zip entry {shown} declares "
                                                 f"{info.file_size} bytes but stores {info.compress_size}")
                limit = following.header_offset if following is not None else size
                if info.header_offset + 30 + len(info.orig_filename.encode("utf-8")) + info.compress_size > limit:
                    raise CheckpointError(label, f"corrupt PyTorch file: zip entry {shown} overlaps the next or runs "
                                                 "past the end")
            prefix = infos[0].filename.split("/", 1)[0]
            records = {i.filename: i for i in infos}
            pickle_info = records.get(f"{prefix}/data.pkl")
            if pickle_info is None:
                raise CheckpointError(label, "corrupt PyTorch file: no data.pkl in the zip archive")
            _pickle_within_budget(label, pickle_info.file_size, budget)
            try:
                raw = archive.read(pickle_info)
            except Exception as e:  # noqa: BLE001 - a bad CRC, a mangled local header: the archive is damaged
                raise CheckpointError(label, f"corrupt PyTorch file: damaged zip archive ({type(e).__name__})") \
                    from None
    census = _Census.run(label, io.BytesIO(raw))
    _has_tensors(label, census)
    decoded = 0
    for key, nbytes in census.storages.items():
        record = records.get(f"{prefix}/data/{key}")
        if record is None:
            raise CheckpointError(label, f"corrupt PyTorch file: storage {_quote(key)} has no record in the archive")
        if nbytes > record.file_size:
            raise CheckpointError(label, f"refused: storage {_quote(key)} declares {_human_bytes(nbytes)}, its record "
                                         f"holds {_human_bytes(record.file_size)}")
        decoded += record.file_size
    # a path is memory-mapped (its storages stay on disk); an upload's storages are decoded into memory
    budget.spend(label, kept=(0 if path is not None else decoded) + census.allocated,
                 passing=len(raw) * PICKLE_AMPLIFICATION, what="loading it")
    return census


def _check_legacy(label: str, size: int, path: Path | None, data: bytes | None, budget: _Budget) -> _Dry:
    """A legacy (pre-1.6) torch file: magic number, protocol, system info, the pickle, its storage keys, then the raw
    storages, which torch.load allocates whole in memory. Declared storages must fit in the bytes that follow."""
    cap = MEMORY_BUDGET // PICKLE_AMPLIFICATION
    with (path.open("rb") if path is not None else contextlib.nullcontext(io.BytesIO(data))) as f:
        stream = _CappedStream(f, label, cap)
        if _Census.run(label, stream).root != LEGACY_MAGIC:
            raise CheckpointError(label, "corrupt PyTorch file: a pickle that torch.save did not write (no magic "
                                         "number)")
        _Census.run(label, stream)  # protocol version
        _Census.run(label, stream)  # system info
        census = _Census.run(label, stream)
        keys = _Census.run(label, stream).root
        after = stream.consumed
    _has_tensors(label, census)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise CheckpointError(label, "corrupt PyTorch file: the storage key list is damaged")
    declared = sum(census.storages.get(k, 0) for k in keys)
    if declared + 8 * len(keys) > size - after:
        raise CheckpointError(label, f"refused: the pickle declares {_human_bytes(declared)} of storages, the file "
                                     f"holds {_human_bytes(max(size - after, 0))} after it")
    budget.spend(label, kept=declared + census.allocated, passing=after * PICKLE_AMPLIFICATION,
                 what="loading it (the legacy format reads every storage into memory)")
    return census


def _has_tensors(label: str, census: _Dry) -> None:
    """A pickle that rebuilds no tensor holds no weights: said now, before torch.load unpickles it for nothing."""
    if census.tensors == 0:
        raise CheckpointError(label, "no tensors found in the state dict")


def _pickle_within_budget(label: str, nbytes: int, budget: _Budget) -> None:
    if nbytes * PICKLE_AMPLIFICATION > MEMORY_BUDGET:
        raise CheckpointError(label, f"refused: its pickle is {_human_bytes(nbytes)}; unpickling may take "
                                     f"{PICKLE_AMPLIFICATION}x that, over the {_human_bytes(MEMORY_BUDGET)} budget "
                                     "(SPECTRA_MEMORY_BUDGET)")
    budget.spend(label, passing=nbytes * PICKLE_AMPLIFICATION, what="unpickling it")


def _zip_entry_count(label: str, f, size: int) -> int:
    """Entries in a zip archive, from its end-of-central-directory record (zip64 too), before zipfile reads them."""
    tail_start = max(0, size - 65_557)  # the record (22 bytes) follows at most a 65,535-byte comment
    f.seek(tail_start)
    tail = f.read(size - tail_start)
    at = tail.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(tail):
        raise CheckpointError(label, "corrupt PyTorch file: truncated or damaged zip archive")
    count = int.from_bytes(tail[at + 10:at + 12], "little")
    if count == 0xFFFF and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
        record_at = int.from_bytes(tail[at - 12:at - 4], "little")
        if record_at + 56 > size:
            raise CheckpointError(label, "corrupt PyTorch file: damaged zip64 directory")
        f.seek(record_at)
        record = f.read(56)
        if record[:4] != b"PK\x06\x06":
            raise CheckpointError(label, "corrupt PyTorch file: damaged zip64 directory")
        count = int.from_bytes(record[32:40], "little")
    return count


class _CappedStream:
    """A file for the unpickler that counts what it reads and refuses to go past `cap` bytes."""

    def __init__(self, f, label: str, cap: int):
        self.f, self.label, self.cap, self.consumed = f, label, cap, 0

    def _take(self, data: bytes) -> bytes:
        self.consumed += len(data)
        if self.consumed > self.cap:
            raise CheckpointError(self.label, f"refused: its pickles run past {_human_bytes(self.cap)}; unpickling "
                                              f"may take {PICKLE_AMPLIFICATION}x that, over the "
                                              f"{_human_bytes(MEMORY_BUDGET)} budget (SPECTRA_MEMORY_BUDGET)")
        return data

    def read(self, n: int = -1) -> bytes:
        return self._take(self.f.read(min(n, self.cap + 1 - self.consumed) if n >= 0 else self.cap + 1))

    def readline(self, n: int = -1) -> bytes:
        return self._take(self.f.readline(self.cap + 1 - self.consumed))

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class _Placeholder:
    """What the census puts where an allowed global's result would be: it accepts every pickle operation, runs
    nothing and holds nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    def extend(self, values):
        pass


class _Dict(dict):
    """An OrderedDict in the census (a dict that also takes the BUILD of its `_metadata`)."""

    def __setstate__(self, state):
        pass


@dataclass
class _Dry:
    """What a dry run of one pickle found."""

    storages: dict[str, int]  # storage key -> declared bytes
    tensors: int  # tensors rebuilt
    allocated: int  # bytes the pickle itself would allocate
    root: int | list | None  # the unpickled object when it is an int or a list (legacy magic number, storage keys)


@dataclass
class _StorageStub:
    key: str
    nbytes: int
    itemsize: int


@dataclass
class _TensorStub:
    numel: int


class _Census(pickle.Unpickler):
    """A dry run of a torch pickle that builds nothing: globals torch's weights_only loader allows become stubs
    (any other is refused, naming it), storages are recorded with their declared sizes, tensors are counted and
    held to their storages, and what the pickle itself would allocate (bytearray(n), legacy tensor constructors,
    dtype conversions) is added up. Memory is bounded by the pickle's size, which the caller bounds."""

    _REBUILDERS = frozenset({"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2",
                             "torch._utils._rebuild_tensor_v3", "torch._utils._rebuild_qtensor"})
    _PASS_THROUGH = frozenset({"torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state",
                               "torch.nn.parameter.Parameter"})

    def __init__(self, stream, label: str):
        super().__init__(stream)
        self.label = label
        self.storages: dict[str, int] = {}  # key -> declared bytes
        self.tensors = 0
        self.allocated = 0
        self._stubs: dict[str, type] = {}

    @classmethod
    def run(cls, label: str, stream) -> _Dry:
        """Dry-run one pickle from `stream`; the unpickler (whose stack and memo hold every object it built) is
        dropped before returning, so its memory is free again before torch.load unpickles for real."""
        census = cls(stream, label)
        try:
            root = census.load()
        except CheckpointError:
            raise
        except RecursionError:
            raise CheckpointError(label, "corrupt PyTorch file: the pickle nests too deeply") from None
        except MemoryError:
            raise CheckpointError(label, "refused: unpickling it runs out of memory") from None
        except Exception as e:  # noqa: BLE001 - a damaged pickle, whatever the opcode that broke
            raise CheckpointError(label, f"corrupt PyTorch file: damaged pickle ({type(e).__name__})") from None
        return _Dry(census.storages, census.tensors, census.allocated, root if isinstance(root, (int, list)) else None)

    def find_class(self, module: str, name: str):
        # Python 2 spellings ("__builtin__"), mapped as the standard unpickler's fix_imports does
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        qualified = f"{module}.{name}"
        real = _allowed_globals().get(qualified)
        if real is None:
            raise CheckpointError(self.label, f"refused: the pickle tries to load {_clip(qualified)} (code execution "
                                              "is never allowed)")
        if qualified not in self._stubs:
            census = weakref.ref(self)  # no cycle: the unpickler and all it built go as soon as the run ends

            def construct(cls, *args, **kwargs):
                return census()._called(qualified, args)

            self._stubs[qualified] = type("Stub", (_Placeholder,), {"__new__": construct,
                                                                     "itemsize": _itemsize(real)})
        return self._stubs[qualified]

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(self.label, "corrupt PyTorch file: a persistent id that is not a storage")
        storage_type, key, _, numel = pid[1:5]
        itemsize = getattr(storage_type, "itemsize", None)
        if not (isinstance(itemsize, int) and _is_count(numel)):
            raise CheckpointError(self.label, "corrupt PyTorch file: a storage without a type or size")
        key = str(key)
        self.storages[key] = max(self.storages.get(key, 0), numel * itemsize)
        return _StorageStub(key, numel * itemsize, itemsize)

    def _called(self, qualified: str, args: tuple):
        result = _Placeholder()
        if qualified in self._REBUILDERS:
            result = self._tensor(qualified, args)
        elif qualified in self._PASS_THROUGH:
            result = args[0] if args else result
        elif qualified == "torch._tensor._rebuild_from_type_v2" and len(args) >= 3 and isinstance(args[2], tuple):
            function = args[0]
            if isinstance(function, type) and issubclass(function, _Placeholder):
                result = function(*args[2])
        elif qualified == "torch._utils._rebuild_device_tensor_from_cpu_tensor" and len(args) >= 2:
            if isinstance(args[0], _TensorStub):
                self._allocate(args[0].numel * (getattr(args[1], "itemsize", None) or 8))
        elif qualified == "builtins.bytearray" and args and isinstance(args[0], int):
            self._allocate(args[0])
        elif qualified.startswith("torch.") and qualified.endswith(("Tensor", "Storage")) and args \
                and all(isinstance(a, int) for a in args):  # legacy constructors: torch.FloatTensor(n, m)
            self._allocate(math.prod(args) * (_itemsize(_allowed_globals()[qualified]) or 8))
        elif qualified == "collections.OrderedDict":
            result = _Dict()
        return result

    def _tensor(self, qualified: str, args: tuple) -> _TensorStub:
        self.tensors += 1
        if self.tensors > MAX_TENSORS:
            raise CheckpointError(self.label, f"too many tensors: over the bound of {MAX_TENSORS:,} "
                                              "(SPECTRA_MAX_TENSORS)")
        if len(args) < 3 or not isinstance(args[0], _StorageStub):
            return _TensorStub(0)
        storage, shape = args[0], args[2]
        if not (isinstance(shape, tuple) and all(isinstance(d, int) and d >= 0 for d in shape)):
            return _TensorStub(0)
        numel = math.prod(shape)
        itemsize = storage.itemsize
        if qualified.endswith("_v3") and len(args) >= 7:
            itemsize = getattr(args[6], "itemsize", None) or itemsize
        if numel * itemsize > max(storage.nbytes, EXPANDED_ALLOWANCE):
            raise CheckpointError(self.label, f"refused: a tensor claims {_human_bytes(numel * itemsize)} over a "
                                              f"storage of {_human_bytes(storage.nbytes)} (overlapping strides)")
        return _TensorStub(numel)

    def _allocate(self, nbytes: int) -> None:
        self.allocated += max(int(nbytes), 0)
        if self.allocated > MEMORY_BUDGET:
            raise CheckpointError(self.label, f"refused: the pickle would allocate {_human_bytes(self.allocated)} "
                                              f"itself, over the {_human_bytes(MEMORY_BUDGET)} budget "
                                              "(SPECTRA_MEMORY_BUDGET)")


def _allowed_globals() -> dict[str, object]:
    """What torch's weights_only unpickler allows: its own list plus what the program added with add_safe_globals."""
    global _ALLOWED
    if _ALLOWED is None:
        try:
            from torch import _weights_only_unpickler as wou
            allowed = dict(wou._get_allowed_globals())
            allowed.update(wou._get_user_allowed_globals())
        except (ImportError, AttributeError):  # a torch without these: tensor rebuilders, storages, dtypes, containers
            allowed = {f"torch.{n}": getattr(torch, n) for n in dir(torch)
                       if n.endswith("Storage") or isinstance(getattr(torch, n, None), torch.dtype)}
            allowed.update({f"torch._utils.{n}": getattr(torch._utils, n) for n in dir(torch._utils)
                            if n.startswith("_rebuild")})
            allowed.update({"collections.OrderedDict": OrderedDict, "torch.Size": torch.Size})
        _ALLOWED = allowed
    return _ALLOWED


_ALLOWED: dict[str, object] | None = None


def _itemsize(real) -> int | None:
    """Bytes per element of a dtype or a storage class the pickle names (UntypedStorage: 1); None for the rest."""
    if isinstance(real, torch.dtype):
        return real.itemsize
    if real is torch.UntypedStorage:
        return 1
    dtype = getattr(real, "dtype", None)  # torch.FloatStorage is a StorageType(dtype=torch.float32)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else None


def _explain_torch_load_error(error: Exception) -> str:
    text = str(error)
    if "Weights only load failed" in text or "Unsupported global" in text:
        detail = next((line.strip() for line in text.splitlines() if "Unsupported" in line), "unsupported pickle")
        return f"refused: the pickle uses something the safe loader does not allow ({_clip(detail)})"
    if "PytorchStreamReader" in text or "zip archive" in text:
        return "corrupt PyTorch file: truncated or damaged zip archive"
    if isinstance(error, EOFError):
        return "corrupt PyTorch file: it ends too early"
    if isinstance(error, pickle.UnpicklingError):
        return "corrupt PyTorch file: damaged pickle"
    # anything else torch.load raises on a file it cannot parse (bad magic number, damaged pickle, missing storage)
    return f"corrupt PyTorch file: {type(error).__name__}: {_first_line(error)}"


def _find_state_dict(label: str, obj) -> dict:
    """The state dict itself, or one nested under 'state_dict'/'model'/'model_state_dict'/'module'."""
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        # a dict under a nesting key wins over stray tensors beside it (nanoGPT keeps best_val_loss as a tensor)
        nested = next((obj[k] for k in STATE_DICT_KEYS if isinstance(obj.get(k), dict)), None)
        if nested is None:
            if any(isinstance(v, torch.Tensor) for v in obj.values()):
                return obj
            break
        obj = nested
    if not isinstance(obj, dict):
        raise CheckpointError(label, f"no state dict: the file holds a {type(obj).__name__}, expected a dict of "
                                     "tensors")
    keys = ", ".join(map(str, list(obj)[:8])) or "none"
    raise CheckpointError(label, "no tensors found: expected a state dict, or one nested under 'model', "
                                 f"'state_dict' or 'module' (top-level keys: {keys})")


def _pytorch_extras(top: dict, state: dict) -> tuple[dict[str, str], dict | None]:
    """Scalar top-level entries as metadata (nanoGPT's iter_num, best_val_loss) and the model config, if any."""
    metadata: dict[str, str] = {}
    for key, value in top.items():
        if value is state:
            continue
        if isinstance(value, (int, float, str, bool)):
            metadata[str(key)] = str(value)
        elif isinstance(value, torch.Tensor) and value.dim() == 0 and top is not state:
            metadata[str(key)] = str(value.item())
    config = None
    for key in ("model_args", "config"):  # nanoGPT stores the architecture as model_args
        if isinstance(top.get(key), dict) and top.get(key) is not state:
            config = dict(top[key])
            break
    return metadata, config


def _strip_prefixes(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop leading '_orig_mod.' / 'module.' (torch.compile, DDP), unless that would make two names collide."""
    def strip(name: str) -> str:
        changed = True
        while changed:
            changed = False
            for prefix in STRIPPED_PREFIXES:
                if name.startswith(prefix) and len(name) > len(prefix):
                    name, changed = name[len(prefix):], True
        return name
    stripped = {strip(k): v for k, v in tensors.items()}
    return stripped if len(stripped) == len(tensors) else tensors


class _StateDictReader:
    """Tensors already unpickled (memory-mapped for zip files); each call hands out an independent copy."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def __call__(self, name: str) -> torch.Tensor:
        return self.tensors[name].detach().clone()


def _shared_storage_groups(tensors: dict[str, torch.Tensor]) -> list[list[str]]:
    """Names whose tensors are the same view of the same storage (`lm_head.weight = tok_emb.weight`)."""
    groups: dict[tuple, list[str]] = {}
    for name, t in tensors.items():
        if t.numel() == 0:
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        groups.setdefault(key, []).append(name)
    return [names for names in groups.values() if len(names) > 1]


# ------------------------------------------------------------------------------------------------------ assembling

def _assemble(part: _Part, *, source: str, fmt: str, sha256: str, files: list[str]) -> Checkpoint:
    order = sorted(part.order, key=_natural_key) if part.natural_order else list(part.order)
    shapes = {n: part.shapes[n] for n in order}
    dtypes = {n: part.dtypes[n] for n in order}
    ckpt = Checkpoint(source=source, format=fmt, sha256=sha256, shapes=shapes, dtypes=dtypes, config=part.config,
                      metadata=dict(part.metadata), files=list(files), warnings=list(part.warnings),
                      quantization={n: part.quantization[n] for n in order if n in part.quantization},
                      tokenizer=part.tokenizer, left_out=dict(part.left_out),
                      _readers={n: part.readers[n] for n in order})
    ckpt.tied_groups = _tied_groups(ckpt, part.shared)
    return ckpt


def _tied_groups(ckpt: Checkpoint, shared: list[list[str]]) -> list[tuple[str, ...]]:
    """Groups of names holding one matrix: shared storage, then equal values among candidate pairs of equal shape.

    Candidates are names listed in metadata "tied" (comma-separated; groups separated by ';') and known
    embedding/LM-head names (tok_emb/lm_head, wte/lm_head, embed_tokens/lm_head, word_embeddings/decoder,
    shared/lm_head, ...). All pairs are never compared: only those of equal shape and dtype."""
    position = {n: i for i, n in enumerate(ckpt.shapes)}
    parent = {n: n for n in ckpt.shapes}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb, key=position.get)] = min(ra, rb, key=position.get)

    for group in shared:
        for other in group[1:]:
            union(group[0], other)

    declared = []
    for chunk in ckpt.metadata.get("tied", "").split(";"):
        names = [n.strip() for n in chunk.split(",") if n.strip() in ckpt.shapes]
        declared += [(a, b, True) for a, b in itertools.pairwise(names)]
    embeddings = [n for n in ckpt.shapes if _EMBEDDING_NAME.search(n)]
    heads = [n for n in ckpt.shapes if _HEAD_NAME.search(n) and n not in embeddings]
    known = [(a, b, False) for i, a in enumerate(embeddings) for b in embeddings[i + 1:] + heads]
    for a, b, is_declared in declared + known:
        if find(a) == find(b):
            continue
        if ckpt.shapes[a] != ckpt.shapes[b] or ckpt.dtypes[a] != ckpt.dtypes[b]:
            if is_declared:
                ckpt.warnings.append(f"{ckpt.source}: metadata says {a} and {b} are tied, but their shapes or dtypes "
                                     "differ; analysed separately")
            continue
        if _same_bits(ckpt.tensor(a), ckpt.tensor(b)):
            union(a, b)
        elif is_declared:
            ckpt.warnings.append(f"{ckpt.source}: metadata says {a} and {b} are tied, but their values differ; "
                                 "analysed separately")

    members: dict[str, list[str]] = {}
    for n in ckpt.shapes:
        members.setdefault(find(n), []).append(n)
    groups = []
    for names in members.values():
        if len(names) > 1:  # the embedding name first (canonical), then checkpoint order
            names.sort(key=lambda n: (not _EMBEDDING_NAME.search(n), position[n]))
            groups.append(tuple(names))
    groups.sort(key=lambda g: position[g[0]])
    return groups


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (so NaNs in equal copies still match)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


# --------------------------------------------------------------------------------------------------------- helpers

@contextlib.contextmanager
def _reading(label: str):
    """Turn what reading a file can raise into one CheckpointError line naming `label`; nothing else escapes."""
    try:
        yield
    except CheckpointError:
        raise
    except PermissionError:
        raise CheckpointError(label, "cannot read: permission denied") from None
    except OSError as e:
        raise CheckpointError(label, f"cannot read: {e.strerror or type(e).__name__}") from None
    except RecursionError:
        raise CheckpointError(label, "nested too deeply to read") from None
    except MemoryError:
        raise CheckpointError(label, "ran out of memory while reading it") from None

def _check_size(label: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise CheckpointError(label, f"too large: {_human_bytes(size)}, over the {_human_bytes(max_bytes)} limit")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _combined_sha256(file_digests: dict[str, str]) -> str:
    """sha256 over the sorted (relative name, file sha256) pairs, one "name\\tdigest\\n" line each."""
    digest = hashlib.sha256()
    for name in sorted(file_digests):
        digest.update(f"{name}\t{file_digests[name]}\n".encode())
    return digest.hexdigest()


def _read_json(label: str, raw: bytes, problem: str = "", *, strict: bool = False,
               budget: _Budget | None = None) -> dict:
    """A JSON object from bytes, or a CheckpointError ("<problem>not valid JSON ..." / "...expected an object").

    Its parse is bounded before it starts: values (at most commas + brackets + 1, an upper bound whatever the
    strings hold) times JSON_VALUE_BYTES must fit the memory budget. Nesting Python cannot parse, or deeper than
    MAX_JSON_DEPTH, is refused. `strict` (safetensors headers) also refuses what the safetensors library refuses:
    duplicate keys, NaN/Infinity, lone surrogates, and negative integers (so "-0" cannot pass for a count)."""
    values = raw.count(b",") + raw.count(b"{") + raw.count(b"[") + 1
    cost = values * JSON_VALUE_BYTES + 2 * len(raw)
    (budget or _Budget()).spend(label, passing=cost, what=f"parsing its {problem.rstrip(': ') or 'JSON'}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(label, f"{problem}not valid JSON (not UTF-8 text at byte {e.start})") from None
    hooks = {"object_pairs_hook": _strict_object, "parse_constant": _no_constant, "parse_int": _strict_int} \
        if strict else {}
    try:
        value = json.loads(text, **hooks)
    except RecursionError:
        raise CheckpointError(label, f"{problem}not valid JSON (nested too deeply to read)") from None
    except _JSONRefusal as e:
        raise CheckpointError(label, f"{problem}{e}") from None
    except ValueError as e:  # JSONDecodeError, and integers past Python's digit limit
        raise CheckpointError(label, f"{problem}not valid JSON ({_first_line(e)})") from None
    if not isinstance(value, dict):
        raise CheckpointError(label, f"{problem}JSON {type(value).__name__}, expected an object")
    if not strict and _json_depth(value) > MAX_JSON_DEPTH:
        raise CheckpointError(label, f"{problem}nested more than {MAX_JSON_DEPTH} levels deep")
    return value


class _JSONRefusal(ValueError):
    """Valid JSON for Python that the safetensors library (serde_json) refuses."""


def _strict_object(pairs: list[tuple[str, object]]) -> dict:
    seen = set()
    for key, value in pairs:
        if key in seen:
            raise _JSONRefusal(f"duplicate key {_quote(key)}")
        seen.add(key)
        for text in (key, value) if isinstance(value, str) else (key,):
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise _JSONRefusal("a string with a lone surrogate (not UTF-8)") from None
    return dict(pairs)


def _no_constant(name: str):
    raise _JSONRefusal(f"{name} is not JSON")


def _strict_int(text: str) -> int | _Negative:
    return _Negative(text) if text.startswith("-") else int(text)


class _Negative:
    """A negative JSON integer ("-0" included), which serde refuses as a count: not an int, so never a count."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


def _json_depth(value) -> int:
    """Nesting depth of parsed JSON, walked without recursion; stops counting past MAX_JSON_DEPTH."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > MAX_JSON_DEPTH:
            break
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return deepest


_REPR = reprlib.Repr()
_REPR.maxstring, _REPR.maxother, _REPR.maxlist, _REPR.maxdict, _REPR.maxlevel = 60, 60, 8, 4, 2


def _quote(value) -> str:
    """repr() of something read from a file, cut short: a name or a shape, never a megabyte of it."""
    return _REPR.repr(value)


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _natural_key(name: str) -> list:
    """'blocks.2.x' before 'blocks.10.x'."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _numel(shape) -> int:
    count = 1
    for d in shape:
        count *= int(d)
    return count


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def _human_bytes(n: int) -> str:
    """Binary units, as the budgets are set: 1 GiB is 1073741824 bytes."""
    if n < 1024:
        return f"{n} bytes"
    value, unit = float(n), "bytes"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024:
            break
    return f"{value:.1f} {unit}"
