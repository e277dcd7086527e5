"""A tiny demo-architecture GPT saved as safetensors, shared by the what-if tests."""
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.gpt import GPT, GPTConfig

TINY_CONFIG = GPTConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=2, block_size=32)


def save_tiny_gpt(path: Path, *, config: GPTConfig = TINY_CONFIG, seed: int = 0, declare_tied: bool = True) -> Path:
    """Write a randomly initialised GPT (seeded) with the metadata the registry reads; returns the path."""
    torch.manual_seed(seed)
    model = GPT(config).eval()
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    metadata = {"architecture": "spectra-demo-gpt", "config": json.dumps(config.to_dict())}
    if declare_tied:
        metadata["tied"] = "tok_emb.weight,lm_head.weight"
    save_file(tensors, str(path), metadata=metadata)
    return path
