"""Rebuild the bundled demo: a byte-pair tokenizer and a weight-tied GPT trained on CPython's pydoc_data.topics.

    python -m models.train_demo            # about 15 minutes on 2 CPU cores; writes models/demo/
    python -m models.train_demo --snapshots models/demo/trajectory --snapshot-steps 0,10,30,100,300 --threads 1
                                           # the same run's first 300 steps as fp16 snapshots; models/demo/ untouched

The text is CPython's own documentation topics, so no download is needed. The last 10% of the text (by characters,
topics in sorted order) is held out; it is saved as models/demo/heldout.txt so evaluation does not depend on the
Python version that runs the app.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from models.gpt import GPT, GPTConfig

DEMO_DIR = Path(__file__).resolve().parent / "demo"
HELDOUT_FRACTION = 0.1
SNAPSHOT_NAME = "step-{:06d}.safetensors"  # the step in the name and the metadata (spectral/trajectory.py reads both)


def corpus_text() -> tuple[str, str]:
    """(train, held-out) text from pydoc_data.topics, split at 90% of the characters."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    cut = int(len(text) * (1 - HELDOUT_FRACTION))
    cut = text.index("\n", cut) + 1  # split on a line boundary
    return text[:cut], text[cut:]


def train_tokenizer(train_text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 style) trained on the training text only."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([train_text], trainer=trainer)
    return tok


def unigram_loss(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab_size: int) -> float:
    """Held-out cross-entropy (nats/token) of an add-one-smoothed unigram model fitted on the training tokens."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[heldout_ids].mean())


@torch.no_grad()
def heldout_loss(model: GPT, ids: torch.Tensor, block_size: int) -> float:
    """Mean next-token cross-entropy over the held-out ids, in non-overlapping windows."""
    model.eval()
    n = (len(ids) - 1) // block_size
    x = ids[: n * block_size].view(n, block_size)
    y = ids[1 : n * block_size + 1].view(n, block_size)
    total = 0.0
    for i in range(0, n, 64):
        logits = model(x[i : i + 64])
        total += F.cross_entropy(logits.flatten(0, 1), y[i : i + 64].flatten(), reduction="sum").item()
    model.train()
    return total / (n * block_size)


def save_snapshot(model: GPT, folder: Path, step: int, heldout: float | None = None) -> Path:
    """The model at `step` as an fp16 safetensors file for a training trajectory (spectral/trajectory.py).

    Only `tok_emb.weight` is written for the tied embedding/head pair (the registry re-ties `lm_head`), so a
    snapshot is half the size of the fp32 demo minus the duplicate. The step is in the file name and metadata."""
    tensors = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()
               if k != "lm_head.weight"}
    metadata = {"format": "pt", "architecture": "spectra-demo-gpt", "config": json.dumps(model.config.to_dict()),
                "step": str(step)}
    if heldout is not None:
        metadata["heldout_loss"] = f"{heldout:.4f}"
    path = folder / SNAPSHOT_NAME.format(step)
    save_file(tensors, str(path), metadata=metadata)
    return path


def parse_steps(text: str) -> list[int]:
    """'0,10,30' -> [0, 10, 30] (sorted, unique, non-negative)."""
    try:
        steps = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of steps") from None
    if not steps or steps[0] < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give one or more steps >= 0")
    return steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None,
                        help="where the trained model goes (default models/demo/, or nowhere with --snapshots)")
    parser.add_argument("--snapshots", type=Path, default=None,
                        help="write fp16 snapshots of the model during training into this folder; without --out the "
                             "run stops after the last snapshot step and writes nothing else (models/demo/ untouched)")
    parser.add_argument("--snapshot-steps", type=parse_steps, default=None, metavar="N,N,...",
                        help="steps to snapshot (step 0 is the initialisation); default every --snapshot-every steps")
    parser.add_argument("--snapshot-every", type=int, default=100, help="snapshot interval without --snapshot-steps")
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--dropout", type=float, default=0.2, help="the corpus is small (about 0.1M tokens)")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-minutes", type=float, default=50.0, help="stop early, keeping the best checkpoint")
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    args = parser.parse_args(argv)
    if args.out is None and args.snapshots is None:
        args.out = DEMO_DIR
    if args.snapshot_every < 1:
        parser.error("--snapshot-every must be at least 1")
    snapshot_steps = set(args.snapshot_steps or range(0, args.steps + 1, args.snapshot_every))
    stop_after = max(snapshot_steps) if args.out is None else None  # snapshots only: no need to train further

    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.time()
    train_text, heldout_text = corpus_text()
    tok = train_tokenizer(train_text, args.vocab)
    train_ids = torch.tensor(tok.encode(train_text).ids, dtype=torch.long)
    heldout_ids = torch.tensor(tok.encode(heldout_text).ids, dtype=torch.long)
    config = GPTConfig(vocab_size=tok.get_vocab_size(), n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head,
                       dropout=args.dropout)
    model = GPT(config)
    print(f"{len(train_ids)} train / {len(heldout_ids)} held-out tokens; {model.n_params()} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warmup = 100

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.1 * args.lr + 0.45 * args.lr * (1 + math.cos(math.pi * (step - warmup) / (args.steps - warmup)))

    if args.snapshots is not None:
        args.snapshots.mkdir(parents=True, exist_ok=True)
        tok.save(str(args.snapshots / "tokenizer.json"))  # so each snapshot runs (registry side files)
        (args.snapshots / "heldout.txt").write_text(heldout_text)

    def snapshot(done: int) -> None:
        """The model after `done` optimiser steps, if asked for."""
        if args.snapshots is not None and done in snapshot_steps:
            val = heldout_loss(model, heldout_ids, config.block_size)
            path = save_snapshot(model, args.snapshots, done, val)
            print(f"snapshot {path.name}  held-out {val:.3f}", flush=True)

    B, T = args.batch, config.block_size
    best, best_state, step = float("inf"), None, 0
    snapshot(0)
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        starts = torch.randint(0, len(train_ids) - T - 1, (B,))
        x = torch.stack([train_ids[s : s + T] for s in starts])
        y = torch.stack([train_ids[s + 1 : s + T + 1] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        snapshot(step + 1)
        last = step == args.steps - 1 or (time.time() - start) / 60 > args.max_minutes
        if stop_after is not None and step + 1 >= stop_after:
            print(f"stopping after step {step + 1}: the last snapshot is written", flush=True)
            return
        if step % 100 == 0 or last:
            val = heldout_loss(model, heldout_ids, T)
            print(f"step {step:5d}  train {loss.item():.3f}  held-out {val:.3f}  {time.time() - start:6.0f}s",
                  flush=True)
            if val < best:
                best, best_state = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if last:
            break
    if args.out is None:  # snapshots only, and the time limit came first
        print(f"stopped at step {step + 1} by --max-minutes before the last snapshot step {stop_after}", flush=True)
        return

    seconds = time.time() - start
    unigram = unigram_loss(train_ids, heldout_ids, config.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    # Both names of the tied matrix are written as separate copies, as most training scripts save them;
    # the loader recognises the pair as one matrix by its equal values.
    tensors = {k: v.contiguous().clone() for k, v in best_state.items()}
    save_file(tensors, str(args.out / "model.safetensors"),
              metadata={"format": "pt", "architecture": "spectra-demo-gpt", "config": json.dumps(config.to_dict()),
                        "tied": "tok_emb.weight,lm_head.weight"})
    (args.out / "config.json").write_text(json.dumps({"architecture": "spectra-demo-gpt", **config.to_dict()},
                                                     indent=2))
    tok.save(str(args.out / "tokenizer.json"))
    (args.out / "heldout.txt").write_text(heldout_text)
    stats = {"train_tokens": len(train_ids), "heldout_tokens": len(heldout_ids), "parameters": model.n_params(),
             "steps": step + 1, "seconds": round(seconds), "heldout_loss": round(best, 4),
             "heldout_perplexity": round(math.exp(best), 2), "unigram_loss": round(unigram, 4),
             "unigram_perplexity": round(math.exp(unigram), 2), "torch": torch.__version__,
             "threads": torch.get_num_threads()}
    (args.out / "training.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
