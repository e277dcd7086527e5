"""Rebuild the bundled demo: a byte-pair tokenizer and a weight-tied GPT trained on CPython's pydoc_data.topics.

    python -m models.train_demo            # about 15 minutes on 2 CPU cores; writes models/demo/

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


def corpus_text() -> tuple[str, str]:
    """(train, held-out) text from pydoc_data.topics, split at 90% of the characters."""
    import pydoc_data.topics as topics

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEMO_DIR)
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

    B, T = args.batch, config.block_size
    best, best_state, step = float("inf"), None, 0
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
        last = step == args.steps - 1 or (time.time() - start) / 60 > args.max_minutes
        if step % 100 == 0 or last:
            val = heldout_loss(model, heldout_ids, T)
            print(f"step {step:5d}  train {loss.item():.3f}  held-out {val:.3f}  {time.time() - start:6.0f}s", flush=True)
            if val < best:
                best, best_state = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if last:
            break

    seconds = time.time() - start
    unigram = unigram_loss(train_ids, heldout_ids, config.vocab_size)
    args.out.mkdir(parents=True, exist_ok=True)
    # Both names of the tied matrix are written as separate copies, as most training scripts save them;
    # the loader recognises the pair as one matrix by its equal values.
    tensors = {k: v.contiguous().clone() for k, v in best_state.items()}
    save_file(tensors, str(args.out / "model.safetensors"),
              metadata={"format": "pt", "architecture": "spectra-demo-gpt", "config": json.dumps(config.to_dict()),
                        "tied": "tok_emb.weight,lm_head.weight"})
    (args.out / "config.json").write_text(json.dumps({"architecture": "spectra-demo-gpt", **config.to_dict()}, indent=2))
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
