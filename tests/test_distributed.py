"""The spectra map on a real Ray cluster (spectral/distributed.py) and the device choice (spectral/devices.py).

The cluster is real: `ray start --head` on 127.0.0.1 with two worker CPUs, shared by the module and stopped in the
fixture's finalizer. Oracles: the local run (`Workspace.spectra` / `Workspace.factors`) on the same checkpoint, and
numpy's float64 SVD for the device routes.
"""
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # Ray gives this machine 127.0.0.1 (read at import)
os.environ.setdefault("RAY_AUTH_MODE", "token")  # the driver presents the cluster's token (Ray's default auth)

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectral.analysis import Spectrum
from spectral.checkpoint import load_checkpoint, load_checkpoint_bytes, open_in_folder
from spectral.devices import (
    CPU,
    Device,
    DeviceError,
    device_note,
    float32_error,
    resolve_device,
    singular_values_on,
)
from spectral.distributed import TASK_NAME, DistributedError, Job, RayMap, resolve_address
from spectral.spectra import singular_values
from spectral.workspace import Workspace

try:  # Ray is optional (pip install "ray[default]", in the test requirements); psutil comes with it
    import psutil
    import ray
    import ray.util.state
except ImportError:
    psutil = ray = None
needs_ray = pytest.mark.skipif(ray is None, reason='Ray is not installed: pip install "ray[default]"')

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")


# ------------------------------------------------------------------------------------------------ helpers

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_same_spectra(remote: dict, local: dict[str, Spectrum], *, exact: bool = False) -> None:
    """Every field of every Spectrum equal; floats and arrays to 1e-10 of the largest value (bit for bit when
    `exact`): the cluster runs the local route, only its thread count may sum in another order."""
    assert list(remote) == list(local)
    for name, want in local.items():
        assert isinstance(remote[name], Spectrum), f"{name}: {remote[name]}"
        assert_same(remote[name], want, name, exact)


def assert_same(got, want, where: str, exact: bool) -> None:
    if dataclasses.is_dataclass(want):
        assert type(got) is type(want), where
        for f in dataclasses.fields(want):
            assert_same(getattr(got, f.name), getattr(want, f.name), f"{where}.{f.name}", exact)
    elif isinstance(want, np.ndarray):
        assert isinstance(got, np.ndarray) and got.dtype == want.dtype and got.shape == want.shape, where
        scale = float(np.max(np.abs(want))) if want.size else 0.0
        assert np.allclose(got, want, rtol=0, atol=0 if exact else 1e-10 * scale, equal_nan=True), where
    elif isinstance(want, float):
        assert isinstance(got, float) and (math.isnan(got) and math.isnan(want) or
                                           math.isclose(got, want, rel_tol=0 if exact else 1e-10)), where
    elif isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]", exact)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and list(got) == list(want), where
        for key in want:
            assert_same(got[key], want[key], f"{where}[{key!r}]", exact)
    else:
        assert got == want, where


def local_run(checkpoint) -> tuple[dict[str, Spectrum], dict[str, str]]:
    ws = Workspace(checkpoint, cache=None)
    spectra = ws.spectra()
    return spectra, {item["name"]: item["reason"] for item in ws.skipped}


def split(remote: dict) -> tuple[dict, dict]:
    return ({k: v for k, v in remote.items() if not isinstance(v, str)},
            {k: v for k, v in remote.items() if isinstance(v, str)})


def mixed_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Matrices of several kinds: wide/tall float32, bf16, a conv kernel, a tied pair, a NaN matrix, a bias."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(300, 64, generator=g)
    nan = torch.randn(40, 50, generator=g)
    nan[3, 7] = float("nan")
    return {
        "tok_emb.weight": emb, "lm_head.weight": emb.clone(),
        "blocks.0.attn.c_attn.weight": torch.randn(192, 64, generator=g),
        "blocks.0.mlp.c_fc.weight": torch.randn(256, 64, generator=g).to(torch.bfloat16),
        "blocks.0.mlp.c_proj.weight": torch.randn(64, 256, generator=g),
        "blocks.0.mlp.c_proj.bias": torch.randn(64, generator=g),
        "conv.weight": torch.randn(16, 8, 3, 3, generator=g),
        "broken.weight": nan,
    }


def write_sharded_folder(folder: Path, state: dict[str, torch.Tensor], shards: list[list[str]]) -> Path:
    """A Hugging Face layout: model-0000i-of-0000n.safetensors shards and their index."""
    folder.mkdir()
    weight_map = {}
    for i, names in enumerate(shards, start=1):
        shard = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: state[n] for n in names}, str(folder / shard))
        weight_map.update({n: shard for n in names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


# ------------------------------------------------------------------------------------------------ the cluster

@pytest.fixture(scope="module")
def cluster():
    """`ray start --head` on 127.0.0.1 with 2 CPUs (and its dashboard, for the state API); stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # Ray's socket paths must stay short
    port, dashboard = free_port(), free_port()
    # a dashboard slower than Ray's 60 s start-up timeout (a loaded CI machine) would fail `ray start`
    env = {**os.environ, "RAY_task_events_report_interval_ms": "100", "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "240"}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}",
         "--disable-usage-stats"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        rmap = connect(f"127.0.0.1:{port}", head)
        yield rmap
        rmap.close()
    finally:
        stop(head)
        shutil.rmtree(temp, ignore_errors=True)


def connect(address: str, head: subprocess.Popen) -> RayMap:
    """A RayMap on the cluster once its GCS port answers (ray.init on a port not yet open waits long)."""
    host, port = address.split(":")
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                break
        except OSError:
            if head.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"ray start --head did not open {address}") from None
            time.sleep(0.2)
    rmap = RayMap(address)
    rmap.wait_until_warm()  # every worker has imported torch and spectral before the first test is timed
    return rmap


def stop(head: subprocess.Popen) -> None:
    """SIGTERM to `ray start --block` stops the processes it started; any left in its session are killed by pid."""
    session = head.pid
    head.send_signal(signal.SIGTERM)
    try:
        head.wait(timeout=40)
    except subprocess.TimeoutExpired:
        head.kill()
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == session:
                proc.kill()
        except (ProcessLookupError, psutil.Error):
            pass


# ------------------------------------------------------------------------------------------ address and Ray

def test_address_comes_from_the_argument_then_ray_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.1.2.3:6379")
    assert resolve_address("local") == "local"
    assert resolve_address(None) == "10.1.2.3:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(DistributedError) as info:
        resolve_address(None)
    assert "--ray ADDRESS" in str(info.value) and "RAY_ADDRESS" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_without_ray_the_error_names_the_pip_command():
    code = ("import sys; sys.modules['ray'] = None\n"
            "from spectral.distributed import RayMap, DistributedError\n"
            "try:\n    RayMap('local')\nexcept DistributedError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.stdout.strip().endswith('pip install "ray[default]"'), out.stdout + out.stderr
    assert len(out.stdout.strip().splitlines()) == 1


@pytest.mark.slow
@needs_ray
def test_a_local_cluster_whose_dashboard_does_not_start_still_computes():
    """Ray's dashboard is best-effort: CI once saw it miss Ray's 60 s start-up timeout, which failed the whole run.
    A zero timeout makes it miss for certain; the spectra must still come back, equal to the local ones (to 1e-10 of
    the largest, as `assert_same_spectra`: the task's one thread sums the Gram matrix in another order)."""
    code = ("import numpy as np\n"
            "from spectral.checkpoint import load_checkpoint\n"
            "from spectral.distributed import RayMap\n"
            "from spectral.workspace import Workspace\n"
            "checkpoint = load_checkpoint('demo')\n"
            "with RayMap('local', workers=1, dashboard=True) as m:\n"
            "    remote = m.spectra(checkpoint)\n"
            "local = Workspace(checkpoint, cache=None).spectra()\n"
            "print(sorted(remote) == sorted(local) and all(np.allclose(remote[k].singular_values, "
            "local[k].singular_values, rtol=0, atol=1e-10 * local[k].singular_values[0]) for k in local))\n")
    env = {**os.environ, "RAY_DASHBOARD_STARTUP_TIMEOUT_S": "0"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "True", out.stdout + out.stderr[-3000:]
    assert "Failed to start the dashboard" in out.stderr  # the dashboard really did not come up


# ---------------------------------------------------------------------------------------------------- devices

def test_cpu_and_auto_resolve_without_a_gpu():
    assert resolve_device("cpu") == CPU and CPU.dtype == torch.float64
    if not torch.cuda.is_available():
        assert resolve_device("auto") == CPU
        assert resolve_device(" AUTO ") == CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_asked_for_and_absent_is_one_clear_line():
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda")
    message = str(info.value)
    assert "\n" not in message and "no CUDA GPU" in message and "--device cpu" in message


def test_unknown_device_names_the_choices():
    with pytest.raises(DeviceError, match="auto, cpu, cuda"):
        resolve_device("tpu")


def test_cpu_device_is_the_local_route_itself():
    w = torch.randn(70, 130, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(singular_values_on(w, CPU), singular_values(w))


def test_float64_device_route_matches_numpy_svd_including_near_singular_matrices():
    g = torch.Generator().manual_seed(2)
    full = torch.randn(90, 60, generator=g, dtype=torch.float64)
    low = torch.randn(90, 5, generator=g, dtype=torch.float64) @ torch.randn(5, 60, generator=g, dtype=torch.float64)
    generic = Device("cpu", torch.float64, "the device route, run on the CPU")  # not CPU: takes the GPU code path
    for w in (full, low):  # `low` has s_min/s_max ~ 1e-16: the Gram route hands over to the SVD
        want = np.linalg.svd(w.numpy(), compute_uv=False)
        got = singular_values_on(w, generic)
        assert np.max(np.abs(got - want)) <= 1e-12 * want[0]
    assert np.max(np.abs(singular_values_on(low, generic)[5:])) < 1e-12 * np.linalg.norm(low.numpy(), 2)


def test_float32_route_error_is_measured_against_float64():
    w = torch.randn(200, 120, generator=torch.Generator().manual_seed(3))
    single = Device("cpu", torch.float32, "float32 route on the CPU")
    want = np.linalg.svd(w.double().numpy(), compute_uv=False)
    error = float32_error(w, single)
    assert error == pytest.approx(np.max(np.abs(singular_values_on(w, single) - want)) / want[0], rel=1e-6, abs=1e-12)
    assert 0 < error < 1e-5  # float32 carries ~7 digits of s_max, float64 ~16
    assert single.describe() == "cpu (float32 route on the CPU, float32)"
    note = device_note(single, w)
    assert note.startswith(single.describe()) and f"{error:.1e}" in note
    assert device_note(CPU, w) == "cpu (CPU, float64)"  # float64: nothing to state


# ---------------------------------------------------------------------------------------------- the cluster

@pytest.mark.slow
@needs_ray
def test_demo_on_the_cluster_equals_the_local_run(cluster):
    ws = Workspace.open("demo")
    local = ws.spectra()
    seen = []
    remote = cluster.spectra(ws.checkpoint, ws.matrices, progress=lambda i, n, label: seen.append((i, n)))
    assert_same_spectra(remote, local)
    assert seen[-1] == (len(ws.matrices), len(ws.matrices))
    assert [i for i, _ in seen] == sorted(i for i, _ in seen)
    torch_threads = torch.get_num_threads()
    try:  # the workers run one thread each: with the same thread count the local route gives the same bits
        torch.set_num_threads(1)
        single = Workspace(load_checkpoint("demo"), cache=None).spectra()  # computed here, not read back
    finally:
        torch.set_num_threads(torch_threads)
    assert_same_spectra(remote, single, exact=True)
    assert "2 CPUs on 1 node" in cluster.describe()


@pytest.mark.slow
@needs_ray
def test_a_written_safetensors_file_equals_the_local_run_with_skips_and_factors(cluster, tmp_path):
    path = tmp_path / "mixed.safetensors"
    save_file(mixed_state(), str(path))
    checkpoint = load_checkpoint(path)
    local, local_skipped = local_run(checkpoint)
    spectra, skipped = split(cluster.spectra(checkpoint))
    assert_same_spectra(spectra, local)
    assert skipped == local_skipped == {"broken.weight": "1 NaN/Inf values: matrix skipped"}
    assert spectra["tok_emb.weight"].tied_with == ("lm_head.weight",) and "conv.weight" in spectra

    ws = Workspace(checkpoint, cache=None)
    wanted = [ws.info("blocks.0.attn.c_attn.weight"), ws.info("conv.weight")]
    factors = cluster.factors(checkpoint, wanted)
    for info in wanted:
        U, S, Vh = factors[info.name]
        U0, S0, Vh0 = ws.factors(info.name)
        assert U.dtype == S.dtype == Vh.dtype == torch.float32 and U.shape == U0.shape and Vh.shape == Vh0.shape
        assert torch.allclose(S, S0, rtol=1e-6)
        assert torch.allclose(U @ torch.diag(S) @ Vh, ws.weight(info.name).float(), atol=1e-4)


@pytest.mark.slow
@needs_ray
def test_an_upload_travels_through_the_object_store(cluster, tmp_path):
    path = tmp_path / "upload.safetensors"
    save_file(mixed_state(seed=5), str(path))
    data = path.read_bytes()
    path.unlink()  # nothing on disk: the workers can only get the bytes from Ray's object store
    upload = load_checkpoint_bytes(data, "upload.safetensors")
    local, local_skipped = local_run(upload)
    for remote in (cluster.spectra(upload, upload=data),  # one ray.put of the file's bytes
                   cluster.spectra(upload)):  # no bytes given: one ray.put per tensor
        spectra, skipped = split(remote)
        assert_same_spectra(spectra, local)
        assert skipped == local_skipped


@pytest.mark.slow
@needs_ray
def test_several_checkpoints_in_one_map(cluster, tmp_path):
    demo = load_checkpoint("demo")
    paths = []
    for seed in (1, 2):
        state = {name: demo.tensor(name) for name in demo.names()}
        state["blocks.0.mlp.c_fc.weight"] = state["blocks.0.mlp.c_fc.weight"] + 0.01 * seed
        paths.append(tmp_path / f"step{seed}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(paths[-1]))
    checkpoints = [demo] + [load_checkpoint(p) for p in paths]
    opened = (Job(c) if i % 2 else c for i, c in enumerate(checkpoints))  # a generator: opened while workers run
    remote = cluster.spectra_many(opened)
    assert len(remote) == 3
    for got, checkpoint in zip(remote, checkpoints):
        assert_same_spectra(got, local_run(checkpoint)[0])
    assert not np.array_equal(remote[1]["blocks.0.mlp.c_fc.weight"].singular_values,
                              remote[2]["blocks.0.mlp.c_fc.weight"].singular_values)


@pytest.mark.slow
@needs_ray
def test_an_unreadable_shard_is_reported_for_its_matrix_and_the_rest_complete(cluster, tmp_path):
    state = mixed_state(seed=7)
    del state["broken.weight"]
    names = list(state)
    folder = write_sharded_folder(tmp_path / "sharded", state, [names[:-1], names[-1:]])
    checkpoint = open_in_folder(tmp_path, "sharded")  # as the app opens the server folder's entries
    local, _ = local_run(checkpoint)
    last = folder / "model-00002-of-00002.safetensors"
    last.write_bytes(last.read_bytes()[:-100])  # cut short after the driver opened the folder
    spectra, failed = split(cluster.spectra(checkpoint))
    assert list(failed) == ["conv.weight"]
    reason = failed["conv.weight"]
    assert "sharded/model-00002-of-00002.safetensors" in reason and "truncated" in reason
    assert str(tmp_path) not in reason  # the server's own paths stay private
    assert_same_spectra(spectra, {k: v for k, v in local.items() if k != "conv.weight"})


@pytest.mark.slow
@needs_ray
def test_a_worker_killed_mid_run_does_not_lose_the_job(cluster, tmp_path):
    g = torch.Generator().manual_seed(11)
    # big enough that each task runs for seconds: the killer must find a busy worker before the map ends
    state = {f"layers.{i}.mlp.up_proj.weight": torch.randn(2400, 2000, generator=g) for i in range(4)}
    path = tmp_path / "big.safetensors"
    save_file(state, str(path))
    checkpoint = load_checkpoint(path)
    local, _ = local_run(checkpoint)
    killed: list[int] = []

    def kill_one_busy_worker():
        deadline = time.monotonic() + 30
        while not killed and time.monotonic() < deadline:
            busy = cluster.busy_workers()
            if busy:
                os.kill(busy[0], signal.SIGKILL)
                killed.append(busy[0])
            time.sleep(0.1)

    killer = threading.Thread(target=kill_one_busy_worker)
    killer.start()
    remote = cluster.spectra(checkpoint)
    killer.join()
    assert killed and not psutil.pid_exists(killed[0])
    assert_same_spectra(remote, local)
    assert retried_tasks() >= 1  # the task on the killed worker ran again


def retried_tasks() -> int:
    """How many spectra tasks Ray ran more than once (its state API; task events arrive within a second)."""
    deadline = time.monotonic() + 15
    while True:
        tasks = ray.util.state.list_tasks(filters=[("name", "=", TASK_NAME)], limit=10_000, raise_on_missing_output=False)
        retried = {t.task_id for t in tasks if t.attempt_number >= 1}
        if retried or time.monotonic() > deadline:
            return len(retried)
        time.sleep(0.5)


@pytest.mark.slow
@needs_ray
def test_nulls_on_the_cluster_equal_the_local_ones(cluster, tmp_path):
    g = torch.Generator().manual_seed(13)
    path = tmp_path / "small.safetensors"
    save_file({"a.weight": torch.randn(60, 90, generator=g), "b.weight": torch.randn(120, 50, generator=g) ** 3},
              str(path))
    checkpoint = load_checkpoint(path)
    for null in ("biwhitened", "permutation"):
        local = Workspace(checkpoint, cache=None).null_spectra(null)
        assert_same_spectra(cluster.spectra(checkpoint, null=null), local)  # spectrum and null in one task
        plain = cluster.spectra(checkpoint)
        assert_same_spectra(cluster.null_spectra(checkpoint, plain.values(), null), local)  # the null added later
    with pytest.raises(ValueError, match="unknown null"):
        cluster.spectra(checkpoint, null="gaussian")


# ------------------------------------------------------------------------------------ the command line (--ray)

def perturbed_demo_files(folder: Path, seeds) -> list[Path]:
    """Copies of the demo with one matrix shifted per seed: distinct checkpoints (and sha256) of the same model."""
    demo = load_checkpoint("demo")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        state = {name: demo.tensor(name).clone() for name in demo.names()}
        state["blocks.1.mlp.c_proj.weight"] += 0.003 * seed
        paths.append(folder / f"step-{seed:04d}.safetensors")
        save_file({k: v.contiguous() for k, v in state.items()}, str(paths[-1]))
    return paths


def spectra_tasks() -> int:
    """Spectra tasks the cluster has run so far (Ray's state API; task events arrive within a second)."""
    time.sleep(1.5)
    return len(ray.util.state.list_tasks(filters=[("name", "=", TASK_NAME)], limit=10_000,
                                         raise_on_missing_output=False))


@pytest.mark.slow
@needs_ray
def test_analyze_maps_a_folder_of_checkpoints_on_the_cluster_like_the_local_run(cluster, tmp_path, capsys):
    from spectral.cli import main

    paths = perturbed_demo_files(tmp_path / "run", (101, 102, 103))
    before = spectra_tasks()
    out = tmp_path / "all.json"
    assert main(["analyze", str(tmp_path / "run"), "--ray", cluster.address, "--json", str(out)]) == 0
    assert spectra_tasks() > before  # the spectra were computed on the cluster, not here
    documents = json.loads(out.read_text())
    assert [d["checkpoint"]["path"] for d in documents] == [str(p) for p in paths]
    for doc, path in zip(documents, paths):
        local = json.loads(Workspace(load_checkpoint(path), cache=None).analyze().to_json())
        doc["summary"].pop("seconds"), local["summary"].pop("seconds")
        assert_same(doc, local, str(path), exact=False)
    assert "## " in capsys.readouterr().out  # with --json, one table per checkpoint on stdout


@pytest.mark.slow
@needs_ray
def test_prune_and_nulls_take_the_cluster_for_their_spectra(cluster, tmp_path, capsys):
    from spectral.cli import main

    from spectral.checkpoint import DEMO_DIR

    path = tmp_path / "model"  # the demo's folder (config, tokenizer, held-out text) with changed weights
    shutil.copytree(DEMO_DIR, path, ignore=shutil.ignore_patterns("trajectory", "model.safetensors"))
    perturbed_demo_files(tmp_path, (201,))[0].rename(path / "model.safetensors")
    before = spectra_tasks()
    assert main(["prune", str(path), "--strategy", "mp", "--ray", cluster.address, "--positions", "256",
                 "--json", str(tmp_path / "p.json")]) == 0
    assert spectra_tasks() > before
    remote = json.loads((tmp_path / "p.json").read_text())
    assert main(["prune", str(path), "--strategy", "mp", "--positions", "256", "--json", str(tmp_path / "l.json")]) == 0
    local = json.loads((tmp_path / "l.json").read_text())
    assert (remote["agreement"], remote["kl"], remote["params_after"]) == (local["agreement"], local["kl"],
                                                                           local["params_after"])


@pytest.mark.slow
@needs_ray
def test_the_dashboard_sends_its_spectra_to_the_cluster_and_says_so(cluster, tmp_path, monkeypatch):
    """`streamlit run app.py -- --ray ADDRESS`: the Overview card names the cluster, and an uploaded checkpoint's
    spectra are tasks on it (through the object store: the workers cannot see an upload), equal to the local run."""
    from tests.test_app import new_app, upload
    from ui import state

    path = perturbed_demo_files(tmp_path, (301,))[0]
    monkeypatch.setattr(sys, "argv", ["app.py", "--ray", cluster.address])
    state.library.clear()  # the process-wide library is built from the options of the run that first needs it
    try:
        before = spectra_tasks()
        at = upload(new_app().run(), "step.safetensors", path.read_bytes())
        assert not at.exception and not at.error, [e.value for e in at.error]
        assert any(f"spectra computed on: Ray cluster {cluster.address}" in c.value for c in at.caption)
        assert spectra_tasks() > before
        library = state.library()
        opened = library.get(load_checkpoint(path).sha256)
        local = json.loads(Workspace(load_checkpoint(path), cache=None).analyze().to_json())
        shown = json.loads(opened.workspace.analyze().to_json())
        shown["summary"].pop("seconds"), local["summary"].pop("seconds")
        shown["checkpoint"].pop("path"), local["checkpoint"].pop("path")
        assert_same(shown, local, "app", exact=False)
    finally:
        state.library.clear()
