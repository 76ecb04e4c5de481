"""velo.edge.embedder against the real exported all-MiniLM-L6-v2 (exported on first use)."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_tool
from velo.core.models import ModelNotFound, embedder_dir, minilm_source_dir
from velo.edge.embedder import Embedder

ROOT = Path(__file__).resolve().parents[1]

SENTENCES = [
    "How do I bake bread?",
    "What is the way to make bread at home?",
    "The quarterly report shows revenue grew by twelve percent.",
    "ok",
    "Explain the difference between TCP and UDP and when each one is the better choice.",
]


@pytest.fixture(scope="session")
def model_dir() -> Path:
    """The exported embedder; exported here (a few seconds) if missing or incomplete."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    tool = load_tool("export_embedder")
    out = embedder_dir()
    if not tool.is_complete(out):
        tool.export(out)
    return out


@pytest.fixture(scope="session")
def embedder(model_dir: Path) -> Embedder:
    return Embedder(model_dir, threads=1)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_dim_and_unit_norm(embedder: Embedder) -> None:
    assert embedder.dim == 384
    vecs = embedder.embed(SENTENCES)
    assert vecs.shape == (len(SENTENCES), 384)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    one = embedder.embed_one(SENTENCES[0])
    assert one.shape == (384,) and one.dtype == np.float32


def test_empty_batch(embedder: Embedder) -> None:
    empty = embedder.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32


def test_bare_string_is_rejected(embedder: Embedder) -> None:
    with pytest.raises(TypeError):
        embedder.embed("How do I bake bread?")


def test_paraphrase_closer_than_unrelated(embedder: Embedder) -> None:
    bake, paraphrase, unrelated = embedder.embed(
        [
            "How do I bake bread?",
            "What is the way to make bread at home?",
            "The quarterly report shows revenue grew by twelve percent.",
        ]
    )
    close, far = _cos(bake, paraphrase), _cos(bake, unrelated)
    assert close > far + 0.3, (close, far)


def test_batch_equals_one_by_one(embedder: Embedder) -> None:
    # Padding to the longest text must not change any row (the pooling mask ignores pads).
    batch = embedder.embed(SENTENCES)
    single = np.stack([embedder.embed_one(s) for s in SENTENCES])
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_long_text_is_truncated(embedder: Embedder) -> None:
    long = "bread " * 1000  # far past 256 tokens
    vec = embedder.embed_one(long)
    assert vec.shape == (384,) and np.isfinite(vec).all()
    np.testing.assert_allclose(vec, embedder.embed_one("bread " * 600), atol=1e-5)


def test_matches_torch_sentence_transformers_pipeline(embedder: Embedder) -> None:
    """Independent reference: HF tokenizer + AutoModel + mean pooling + normalise, in torch."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    source = minilm_source_dir()
    tok = transformers.AutoTokenizer.from_pretrained(str(source))
    model = transformers.AutoModel.from_pretrained(str(source)).eval()
    batch = tok(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        tokens = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    ref = torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()

    got = embedder.embed(SENTENCES)
    cos = np.sum(ref * got, axis=1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
    assert cos.min() >= 0.9999, cos
    assert np.abs(ref - got).max() < 1e-4


def test_missing_model_dir_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound, match="export_embedder"):
        Embedder(tmp_path / "no-such-embedder")


def test_missing_model_file_raises(tmp_path: Path, model_dir: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((model_dir / "tokenizer.json").read_bytes())
    with pytest.raises(ModelNotFound, match="export_embedder"):
        Embedder(tmp_path)


def test_runtime_does_not_import_torch(model_dir: Path) -> None:
    # The edge daemon ships without PyTorch: loading and using the embedder must not need it.
    code = (
        "import sys; from velo.edge.embedder import Embedder; "
        f"Embedder({str(model_dir)!r}).embed_one('hi'); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_int8_embedder_stays_close_to_float32_and_batches_like_one_by_one(
        model_dir: Path, embedder: Embedder) -> None:
    """The int8 file edges may opt into (embedder_file): same width, unit rows, close to
    float32; and runs of mixed lengths (sorted, padded per run) equal one-by-one results."""
    int8 = Embedder(model_dir, threads=1, model_file="model-int8.onnx")
    texts = ["How do I bake bread?", "What is the way to make bread at home?",
             "Explain TCP versus UDP with an example of when each is preferable. " * 3, "ok"]
    fp32, q8 = embedder.embed(texts), int8.embed(texts)
    assert q8.shape == fp32.shape
    np.testing.assert_allclose(np.linalg.norm(q8, axis=1), 1.0, atol=1e-4)
    assert np.min(np.sum(fp32 * q8, axis=1)) > 0.95
    singles = np.stack([int8.embed_one(t) for t in texts])
    np.testing.assert_allclose(q8, singles, atol=1e-4)
    many = texts * 20  # more than one run of RUN_SIZE texts, out of length order
    np.testing.assert_allclose(embedder.embed(many), np.tile(fp32, (20, 1)), atol=1e-5)
    with pytest.raises(ModelNotFound):
        Embedder(model_dir, model_file="no-such.onnx")


def test_runs_that_overlap_use_the_busy_session_and_give_the_same_vectors(
        model_dir: Path, embedder: Embedder) -> None:
    """edged's two workers: a lone run gets every thread; a run that starts while another runs
    gets the busy session (one thread). Either way a text's vector is the same, and
    `embed_parts` hands back every position once with the rows `embed` gives."""
    two = Embedder(model_dir, threads=2, busy_threads=1)
    one = Embedder(model_dir, threads=1, busy_threads=1)
    assert two._busy_session is not two._session and one._busy_session is one._session
    used: list[str] = []
    busy_run = two._busy_session.run

    def counted(*args: object, **kwargs: object) -> object:
        used.append("busy")
        return busy_run(*args, **kwargs)

    two._busy_session.run = counted  # type: ignore[method-assign]
    many = SENTENCES * 8
    expected = embedder.embed(many)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(two.embed, [many] * 8))
    for rows in results:
        np.testing.assert_allclose(rows, expected, atol=1e-5)
    assert used, "eight overlapping batches and not one run on the busy session"
    parts = list(two.embed_parts(many))
    positions = [i for pos, _ in parts for i in pos]
    assert sorted(positions) == list(range(len(many))) and len(parts) > 1
    for pos, rows in parts:
        np.testing.assert_allclose(rows, expected[list(pos)], atol=1e-5)
