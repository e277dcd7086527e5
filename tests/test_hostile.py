"""Hostile inputs (issue 17): a server folder that points outside itself, memory bombs, lying headers, deep JSON,
many tensors. Every case is built here; each must end in one `CheckpointError` line that quotes nothing of a file
outside the folder, within a memory and a time bound where the issue sets one."""
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from spectral import checkpoint as ck
from spectral.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, open_in_folder

SECRET = "root:*:20228:0:99999:7:::"  # what /etc/shadow starts with, in a file outside the server folder


def refusal(fn, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, "a refusal is one line"
    return message


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(30, 8, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g)}


def hf_folder(folder: Path, *, sharded: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    state = small_state()
    if sharded:
        names = list(state)
        save_file({names[0]: state[names[0]]}, str(folder / "model-00001-of-00002.safetensors"))
        save_file({names[1]: state[names[1]]}, str(folder / "model-00002-of-00002.safetensors"))
        weight_map = {names[0]: "model-00001-of-00002.safetensors", names[1]: "model-00002-of-00002.safetensors"}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    else:
        save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.fixture
def server(tmp_path):
    """A server folder `models/` and, beside it, a secret file the server must never read."""
    root = tmp_path / "models"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_text(SECRET + "\n" * 40)
    return root, secret


def assert_no_leak(message: str, root: Path) -> None:
    assert SECRET[:6] not in message and "20228" not in message, "file contents outside the folder leaked"
    assert str(root) not in message and str(root.resolve()) not in message, "an absolute server path leaked"


# -------------------------------------------------------------------------------------------------- listing

def test_listing_offers_weight_files_and_hf_folders_two_levels_deep(server):
    root, _ = server
    save_file(small_state(), str(root / "a.safetensors"))
    torch.save(small_state(), root / "b.pt")
    (root / "c.gguf").write_bytes(b"GGUF" + b"\x00" * 60)
    (root / "notes.txt").write_text("not a checkpoint")
    hf_folder(root / "llama")
    hf_folder(root / "family" / "sharded", sharded=True)
    (root / "family" / "loose.bin").write_bytes(b"\x80\x02")
    hf_folder(root / "family" / "sharded" / "too-deep")  # depth 3: not offered
    assert list_checkpoints(root) == ["a.safetensors", "b.pt", "c.gguf", "family/loose.bin", "family/sharded/",
                                      "llama/"]


def test_listing_skips_hidden_entries_and_names_weights_of_a_folder_only_through_it(server):
    root, _ = server
    hf_folder(root / ".cache")
    save_file(small_state(), str(root / ".hidden.safetensors"))
    folder = hf_folder(root / "bert")
    (folder / "extra.gguf").write_bytes(b"GGUF")  # GGUF files carry their own config: offered alone
    assert list_checkpoints(root) == ["bert/", "bert/extra.gguf"]


def test_listing_does_not_offer_a_symlink_out_of_the_folder(server):
    root, secret = server
    (root / "shadow.safetensors").symlink_to(secret)
    (root / "escape").symlink_to(secret.parent, target_is_directory=True)
    folder = hf_folder(root / "poisoned")
    (folder / "tokenizer.json").symlink_to(secret)  # a folder with any file pointing outside is not offered
    sub = root / "sub"
    sub.mkdir()
    (sub / "model.pt").symlink_to(secret)
    assert list_checkpoints(root) == []


def test_listing_follows_symlinks_that_stay_inside_the_folder(server):
    """A Hugging Face cache keeps snapshot files as symlinks to blobs/ in the same tree."""
    root, _ = server
    blobs = root / "blobs"
    hf_folder(blobs)
    snapshot = root / "snapshot"
    snapshot.mkdir()
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).symlink_to(Path("..") / "blobs" / name)
    assert list_checkpoints(root) == ["blobs/", "snapshot/"]
    ckpt = open_in_folder(root, "snapshot/")
    assert set(ckpt.names()) == set(small_state())


def test_listing_of_a_missing_folder_is_empty(tmp_path):
    assert list_checkpoints(tmp_path / "nowhere") == []


# ------------------------------------------------------------------------------------------------- opening

def test_open_in_folder_opens_a_listed_file_and_a_listed_folder(server):
    root, _ = server
    save_file(small_state(), str(root / "a.safetensors"))
    hf_folder(root / "llama")
    single = open_in_folder(root, "a.safetensors")
    folder = open_in_folder(root, "llama/")
    assert single.source == "a.safetensors" and folder.source == "llama/"
    assert single.root == folder.root == str(root.resolve())
    assert folder.format == "huggingface" and folder.config["model_type"] == "llama"
    assert torch.equal(folder.tensor("model.embed_tokens.weight"), small_state()["model.embed_tokens.weight"])
    assert single.sha256 == load_checkpoint(root / "a.safetensors").sha256


@pytest.mark.parametrize("relative", ["../outside/shadow", "/etc/shadow", "llama/../../outside/shadow", ".hidden.pt",
                                      "a/b/c/d.pt", "", "C:/Windows/win.ini"])
def test_open_in_folder_refuses_paths_that_leave_it(server, relative):
    root, _ = server
    hf_folder(root / "llama")
    message = refusal(open_in_folder, root, relative)
    assert_no_leak(message, root)


def test_an_entry_that_is_a_symlink_out_of_the_folder_is_refused(server):
    root, secret = server
    (root / "shadow.safetensors").symlink_to(secret)
    message = refusal(open_in_folder, root, "shadow.safetensors")
    assert message == "shadow.safetensors: resolves outside the server's checkpoint folder (a symlink?); refused"
    assert_no_leak(message, root)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_file_inside_a_listed_folder_that_points_outside_is_refused(server, name):
    """Issue 17 item 1: confinement used to stop at the entry, and the page showed the secret's first bytes."""
    root, secret = server
    folder = hf_folder(root / "llama")
    (folder / name).unlink(missing_ok=True)
    (folder / name).symlink_to(secret)
    message = refusal(open_in_folder, root, "llama/")
    assert message.startswith(f"llama/{name}: resolves outside the server's checkpoint folder")
    assert_no_leak(message, root)


def test_an_index_listed_shard_that_points_outside_is_refused(server):
    root, secret = server
    folder = hf_folder(root / "sharded", sharded=True)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(secret)
    message = refusal(open_in_folder, root, "sharded/")
    assert message.startswith("sharded/model-00002-of-00002.safetensors: resolves outside")
    assert_no_leak(message, root)


def test_side_files_read_later_are_held_to_the_folder_too(server):
    """models/ reads sentence-transformers side files through `Checkpoint.side_file`, which keeps to `root`."""
    root, secret = server
    folder = hf_folder(root / "minilm")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_cls_token": true}')
    (folder / "sentence_bert_config.json").symlink_to(secret)
    ckpt = open_in_folder(root, "minilm/")
    assert json.loads(ckpt.side_file("1_Pooling/config.json")) == {"pooling_mode_cls_token": True}
    assert ckpt.side_file("heldout.txt") is None
    message = refusal(ckpt.side_file, "sentence_bert_config.json")
    assert message.startswith("minilm/sentence_bert_config.json: resolves outside")
    assert_no_leak(message, root)
    assert "../" not in message
    refusal(ckpt.side_file, "../../outside/shadow")


def test_errors_inside_the_folder_name_the_relative_path_and_quote_no_bytes(server):
    root, _ = server
    (root / "notes.pt").write_text(SECRET)  # a text file under a weights name, inside the folder
    (root / "lying.safetensors").write_bytes(struct.pack("<Q", 20228) + b"{")  # header length past the end
    for name in ("notes.pt", "lying.safetensors"):
        message = refusal(open_in_folder, root, name)
        assert message.startswith(f"{name}: ")
        assert_no_leak(message, root)


def test_a_folder_from_the_command_line_is_not_confined(tmp_path):
    """Only the server folder confines: a path the user types is theirs to follow."""
    elsewhere = hf_folder(tmp_path / "real")
    link = tmp_path / "link"
    link.mkdir()
    for name in ("config.json", "model.safetensors"):
        (link / name).symlink_to(elsewhere / name)
    ckpt = load_checkpoint(link)
    assert ckpt.root is None and set(ckpt.names()) == set(small_state())


def test_known_sha256_skips_hashing(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    digest = load_checkpoint(path).sha256
    monkeypatch.setattr(ck, "_sha256_file", lambda p: pytest.fail("hashed a file whose sha256 was given"))
    assert load_checkpoint(path, known_sha256=digest).sha256 == digest
    with pytest.raises(ValueError):
        load_checkpoint(path, known_sha256="not-a-digest")


def test_quantization_is_empty_for_unquantised_formats(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(small_state(), str(path))
    assert load_checkpoint(path).quantization == {}


class OpenWatch:
    """Counts opens of one file by anyone in this process (Python, torch, safetensors' Rust) through Linux inotify."""

    IN_OPEN, IN_NONBLOCK = 0x20, 0o4000

    def __init__(self, path: Path):
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(self.IN_NONBLOCK)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, str(path).encode(), self.IN_OPEN) < 0:
            pytest.skip("inotify is not available here")

    def opens(self) -> int:
        count = 0
        while True:
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                return count
            while chunk:  # struct inotify_event: wd, mask, cookie, len, then `len` bytes of name
                _, mask, _, length = struct.unpack_from("iIII", chunk)
                count += bool(mask & self.IN_OPEN)
                chunk = chunk[16 + length:]


def test_listing_and_opening_never_open_the_secret(server):
    """Belt and braces: whatever is listed or opened, the secret file is never opened at all, by any library."""
    root, secret = server
    folder = hf_folder(root / "llama")
    (folder / "tokenizer.json").symlink_to(secret)
    (root / "evil.pt").symlink_to(secret)
    sub = hf_folder(root / "sub")
    (sub / "model.safetensors").unlink()
    (sub / "model.safetensors").symlink_to(secret)
    watch = OpenWatch(secret)
    secret.read_bytes()
    assert watch.opens() == 1, "the watch sees an open"
    assert list_checkpoints(root) == []
    for relative in ("llama/", "evil.pt", "sub/"):
        with pytest.raises(CheckpointError):
            open_in_folder(root, relative)
    assert watch.opens() == 0
