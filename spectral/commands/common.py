"""Helpers shared by the subcommands: the checkpoint argument, a stderr progress bar, writing outputs."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm


class UsageError(Exception):
    """A bad argument found after parsing (exit code 2)."""


def add_checkpoint_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="a .safetensors/.pt/.pth/.bin file, a Hugging Face folder, or the word 'demo'")


def probability(text: str) -> float:
    """argparse type: a number strictly between 0 and 1 (confidence) or in (0, 1] (energy)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not in (0, 1]")
    return value


class StderrProgress:
    """A tqdm bar on stderr fed by the engine's progress(i, total, label) callbacks. It appears only on a terminal
    and only once the work has taken more than a second, so short runs and pipes stay clean."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None

    def __call__(self, i: int, total: int, label: str) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, file=sys.stderr, unit="matrix", leave=False,
                            disable=None, delay=1.0, mininterval=0.5)
        self.bar.n = i
        self.bar.set_postfix_str(label[-40:], refresh=False)
        self.bar.refresh()
        if i >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write_text(path: str | None, text: str) -> None:
    """Write to PATH, or stdout when PATH is None or '-'."""
    if path in (None, "-"):
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    else:
        Path(path).write_text(text)
