"""Thread settings: SPECTRA_THREADS wins, an interactive server leaves a core free, the first call decides."""
import subprocess
import sys

import pytest


def threads_in_fresh_process(code: str, env_threads: str | None = None) -> int:
    env = {"PATH": "/usr/bin:/bin"}
    if env_threads is not None:
        env["SPECTRA_THREADS"] = env_threads
    out = subprocess.run([sys.executable, "-c", "import torch\nfrom spectral.threads import *\n" + code],
                         capture_output=True, text=True, env=env, check=True, cwd=str(__import__("pathlib").Path(
                             __file__).resolve().parent.parent))
    return int(out.stdout.strip())


def test_environment_variable_wins():
    assert threads_in_fresh_process("configure_threads(); print(torch.get_num_threads())", "1") == 1


@pytest.mark.parametrize("interactive", [False, True])
def test_batch_takes_all_cores_and_interactive_leaves_one(interactive):
    import os

    cores = len(os.sched_getaffinity(0))
    expected = max(1, cores - 1) if interactive else cores
    code = f"configure_threads(interactive={interactive}); print(torch.get_num_threads())"
    assert threads_in_fresh_process(code) == expected


def test_first_call_decides_until_an_explicit_count():
    code = "configure_threads(1); configure_threads(); print(torch.get_num_threads())"
    assert threads_in_fresh_process(code) == 1


def test_numpy_blas_is_capped_at_one_thread():
    code = ("import numpy\nconfigure_threads()\nfrom threadpoolctl import threadpool_info\n"
            "print(max([p['num_threads'] for p in threadpool_info() if p['user_api'] == 'blas'] or [1]))")
    assert threads_in_fresh_process(code) == 1


def test_mkl_thread_limit_binds_only_the_thread_that_sets_it():
    """`mkl_threads_in_this_thread` changes MKL's count for calls from this thread, inside the block only; another
    thread keeps torch's process-wide count (MKL reports both through `MKL_Get_Max_Threads`)."""
    import os

    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs two cores to tell one MKL thread from the process-wide count")
    code = (
        "import ctypes, os, threading\n"
        "lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), 'lib', 'libtorch_cpu.so'))\n"
        "get = lib.MKL_Get_Max_Threads\n"
        "configure_threads(2)\n"
        "seen = {'before': get()}\n"
        "with mkl_threads_in_this_thread(1):\n"
        "    seen['inside'] = get()\n"
        "    t = threading.Thread(target=lambda: seen.update(other=get())); t.start(); t.join()\n"
        "seen['after'] = get()\n"
        "print(seen['before'] * 1000 + seen['inside'] * 100 + seen['other'] * 10 + seen['after'])")
    assert threads_in_fresh_process(code) == 2122


def test_map_single_threaded_returns_every_item_once_in_the_callers_thread_with_errors_handed_back():
    """Workers run one OpenMP thread each; results and exceptions come back to the calling thread (where the
    dashboard's progress widgets must be called), each item exactly once."""
    import threading

    import torch

    from spectral.threads import configure_threads, map_single_threaded, openmp_pools

    configure_threads(2)  # as on the 2-core CI machine, whatever this one has
    caller = threading.current_thread()

    def work(i: int) -> tuple[int, list[int]]:
        if i == 3:
            raise ValueError("three")
        x = torch.randn(1 << 16)
        float((x * x).sum())  # a parallel op first: torch's per-thread initialisation must not undo the limit
        pools = [p["num_threads"] for p in openmp_pools().info() if p["user_api"] == "openmp"]
        return i * i, pools + [torch.get_num_threads()]

    seen = {}
    for item, result, error in map_single_threaded(work, range(8), workers=2):
        assert threading.current_thread() is caller
        seen[item] = (result, error)
    assert sorted(seen) == list(range(8))
    assert isinstance(seen[3][1], ValueError) and seen[3][0] is None
    for i in set(range(8)) - {3}:
        square, pools = seen[i][0]
        assert square == i * i and seen[i][1] is None
        assert all(n == 1 for n in pools)  # each worker limited to one thread


def test_map_single_threaded_with_one_worker_runs_in_the_caller():
    import threading

    from spectral.threads import map_single_threaded

    names = [r for _, r, _ in map_single_threaded(lambda _: threading.current_thread().name, range(3), workers=1)]
    assert names == [threading.current_thread().name] * 3
