"""Reuse that knows when it is right (issue 12): the verifier's features and ONNX contract,
per-row calibration, conversation-aware keys, and the edge's reuse guard against real parts
(Milvus, the ONNX embedder, cloudd and an OpenAI-compatible HTTP LLM on loopback)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from edged.config import PolicyConfig, ReuseConfig
from edged.server import Edged, reuse_guard
from lab import feedback, multiturn
from lab.sim import EmbeddedTexts
from lab.verifier import train_verifier, with_thresholds
from tests.conftest import ask, edge_client, running
from tests.test_edged import LLM_ANSWER, QUESTION, seed
from velo.core.conversation import Turn, cache_scope, context_key, history_problem
from velo.core.names import valid_scope
from velo.core.qos import Action
from velo.core.verifier import FEATURES, OnnxVerifier, VerifierError, pair_features
from velo.edge.calibration import RowCalibration
from velo.edge.embedder import Embedder
from velo.v1 import chat_pb2, edge_pb2, trainer_pb2

from .conftest import SHARED_DATA

PARAPHRASE = "How can I reset my router to its factory settings?"


# -- the verifier's features and file ---------------------------------------------------------
def test_pair_features_see_what_a_similarity_cannot() -> None:
    f = dict(zip(FEATURES, pair_features("How do I learn Python?", "How do I learn Java?", 0.8),
                 strict=True))
    assert f["similarity"] == pytest.approx(0.8) and f["exact"] == 0
    assert f["new_only"] == f["cached_only"] == pytest.approx(0.5)  # python vs java
    same = dict(zip(FEATURES, pair_features("How do I learn Python?", "how do i LEARN python",
                                            0.99), strict=True))
    assert same["exact"] == 1 and same["new_only"] == 0
    numbers = dict(zip(FEATURES, pair_features("Is 2 + 2 = 4?", "Is 2 + 2 = 5?", 0.97),
                       strict=True))
    assert numbers["numbers_differ"] == 1
    negated = dict(zip(FEATURES, pair_features("Why can't I sleep?", "Why can I sleep?", 0.95),
                       strict=True))
    assert negated["negation_differs"] == 1


NEGATED_QUESTIONS = [  # (cached, asked): the asked one means the opposite
    ("How do I enable 2FA on my account?", "How do I disable 2FA on my account?"),
    ("Why does the price increase in winter?", "Why does the price decrease in winter?"),
    ("Is it easier to learn Python than Java?", "Is it harder to learn Python than Java?"),
    ("Should I keep my bike inside the house?", "Should I keep my bike outside the house?"),
    ("What are the arguments in favour of nuclear power?",
     "What are the arguments against nuclear power?"),
    ("Why is sleep important for students?", "Why is sleep unimportant for students?"),
    ("Why is this medicine not unsafe for children?", "Why is this medicine unsafe for children?"),
    ("How do I install Docker on Ubuntu?", "How do I uninstall Docker on Ubuntu?"),
    ("How do I lock my car remotely?", "How do I unlock my car remotely?"),
    ("How can I import contacts to my phone?", "How can I export contacts from my phone?"),
]
RESTATED_QUESTIONS = [  # (cached, asked): the same question in other words
    ("How do I enable 2FA on my account?", "How can I turn on 2FA for my account?"),
    ("How do I install Docker on Ubuntu?", "What is the way to install Docker on Ubuntu?"),
    ("Why does the price increase in winter?", "Why do prices go up in winter?"),
]


def test_negation_and_antonyms_are_features_of_the_pair() -> None:
    """One side negated by a prefix, an antonym from the lexicon, an opposed affix, a double
    negation: each is seen, and a restatement is not taken for one."""
    for cached, asked in NEGATED_QUESTIONS:
        f = dict(zip(FEATURES, pair_features(asked, cached, 0.9), strict=True))
        assert f["antonym"] == 1 or f["negation_differs"] == 1, (cached, asked)
    f = dict(zip(FEATURES, pair_features("It is not unimportant.", "It is unimportant.", 0.9),
                 strict=True))
    assert f["negation_differs"] == 1  # "not" on one side only, whatever else the words say
    for cached, asked in RESTATED_QUESTIONS:
        f = dict(zip(FEATURES, pair_features(asked, cached, 0.9), strict=True))
        assert f["antonym"] == 0 and f["negation_differs"] == 0, (cached, asked)
    swap = dict(zip(FEATURES, pair_features("Talmon is situated on land.",
                                            "Talmon is located on land.", 0.95), strict=True))
    assert swap["synonym_swaps"] == 1  # WordNet: a synonym replaced the only changed word


def test_the_shipped_verifier_refuses_negated_questions_and_serves_restated_ones(
        exported_embedder) -> None:
    """docs/reuse/verifier.onnx at its δ = 0.05 threshold for a small cache, on questions (the
    negation corpus it learned from holds statements only)."""
    from velo.core.models import ROOT

    verifier = OnnxVerifier(ROOT / "docs" / "reuse" / "verifier.onnx")
    threshold = verifier.threshold_for(0.05, 1000)
    embedder = Embedder(exported_embedder)

    def p_same(cached: str, asked: str) -> float:
        a, b = embedder.embed([cached, asked])
        return verifier.score(asked, cached, 1 - float(np.linalg.norm(a - b)) / 2)  # c^s

    served = [pair for pair in NEGATED_QUESTIONS if p_same(*pair) >= threshold]
    assert served == []
    assert all(p_same(*pair) >= threshold for pair in RESTATED_QUESTIONS[:2])


def test_the_shipped_verifier_serves_an_exact_repeat_at_every_delta(exported_embedder) -> None:
    """A repeated question, or the same words in another case and punctuation, passes the
    guard at every calibrated δ (the model alone scored an exact repeat 0.44: a guarded edge
    never served a repeated question)."""
    from velo.core.models import ROOT

    verifier = OnnxVerifier(ROOT / "docs" / "reuse" / "verifier.onnx")
    embedder = Embedder(exported_embedder)
    repeats = [(q, q) for q, _ in RESTATED_QUESTIONS] + [
        ("What is the capital of France?", "what is the capital of france"),
        ("Write a poem about the sea", "Write a poem about the sea!")]
    for cached, asked in repeats:
        a, b = embedder.embed([cached, asked])
        p = verifier.score(asked, cached, 1 - float(np.linalg.norm(a - b)) / 2)
        for delta in verifier.thresholds:
            assert p >= verifier.threshold_for(delta, 1000), (cached, asked, delta)


def _tiny_verifier() -> bytes:
    """A verifier trained on synthetic pairs: right when similar and the words agree."""
    rng = np.random.default_rng(0)
    rows, labels = [], []
    for _ in range(400):
        sim = rng.uniform(0.5, 1.0)
        same = rng.random() < 0.5
        words = "how do i learn python" if same else "how do i learn java"
        rows.append(pair_features("how do i learn python", words, sim))
        labels.append(float(same and sim > 0.7))
    from lab.verifier import VerifierConfig

    return train_verifier(np.stack(rows), np.array(labels, np.float32),
                          VerifierConfig(epochs=30))


def test_the_verifier_file_carries_its_features_and_calibrated_thresholds(tmp_path) -> None:
    model = with_thresholds(_tiny_verifier(), {0.05: [(1_000, 0.7), (10_000, 0.8)]})
    verifier = OnnxVerifier(model)
    right = verifier.score("how do i learn python", "How do I learn Python", 0.95)
    wrong = verifier.score("how do i learn python", "how do i learn java", 0.95)
    assert 0 <= wrong < right <= 1
    assert verifier.threshold_for(0.05, 10) == pytest.approx(0.7)  # held below the smallest
    assert 0.7 < verifier.threshold_for(0.05, 3_000) < 0.8  # between, in log(rows)
    assert verifier.threshold_for(0.05, 10**6) == pytest.approx(0.8)  # held above the largest
    assert verifier.calibrated_rows(0.05) == 10_000
    with pytest.raises(VerifierError, match=r"not calibrated for delta = 0\.01"):
        verifier.threshold_for(0.01)
    import onnx

    graph = onnx.load_from_string(model)
    for prop in graph.metadata_props:
        if prop.key == "velo.verifier.features":
            prop.value = "similarity,something_else"
    with pytest.raises(VerifierError, match="retrain"):
        OnnxVerifier(graph.SerializeToString())
    with pytest.raises(VerifierError, match="not a usable verifier"):
        OnnxVerifier(b"not onnx")


# -- per-row calibration ----------------------------------------------------------------------
def test_the_threshold_for_delta_rises_with_the_rows_the_wrong_hits_grow_with() -> None:
    """Calibration caches of 100 and 1,100 questions: in the larger one a distractor outranks
    the right row for the queries scoring 0.6-0.62 and for the two best ones. Extrapolated, a
    10x bigger cache needs a threshold inside that band, and at 10⁶ rows even the best scores
    would be wrong too often: no threshold holds."""
    from lab.pairs import wilson_upper
    from lab.verifier import NEVER, SizeRun, thresholds_by_rows

    scores = np.linspace(0, 1, 2000)
    base = SizeRun(100, scores, scores < 0.3)
    crowded = SizeRun(1_100, scores, base.wrong | ((scores >= 0.6) & (scores < 0.62))
                      | (scores > 0.9995))
    table = dict(thresholds_by_rows([base, crowded], 0.05, rows=(100, 1_100, 11_000, 10**6)))
    assert table[100] <= table[1_100] < table[11_000] < table[10**6]
    assert wilson_upper(np.sum((scores >= table[100]) & base.wrong), 2000) <= 0.05
    assert table[100] < 0.6 < table[11_000] < 0.62 and table[10**6] == NEVER


def test_the_guard_takes_its_threshold_for_the_cache_it_has(edge_config, tmp_path) -> None:
    path = tmp_path / "verifier.onnx"
    path.write_bytes(with_thresholds(_tiny_verifier(), {0.05: [(10, 0.6), (1_000, 0.9)]}))
    cfg = edge_config(reuse=ReuseConfig(verifier=str(path), delta=0.05))
    guard = reuse_guard(cfg)
    assert guard.rows.global_threshold == pytest.approx(0.6)
    guard.rows.observe(7, 0.95, correct=False)
    guard.follow_size(1_000)
    assert guard.rows.global_threshold == pytest.approx(0.9) and guard.questions == 1_000
    assert guard.rows.threshold(8) == pytest.approx(0.9)  # rows without a record follow it
    assert guard.rows.threshold(7) == pytest.approx(0.96)  # a learned row keeps its own
    guard.save()
    again = reuse_guard(cfg)  # the same verifier and δ: learned rows survive a restart
    assert again.rows.threshold(7) == pytest.approx(0.96)


def test_a_row_stops_reusing_where_it_was_wrong_and_widens_where_it_was_right() -> None:
    rows = RowCalibration(global_threshold=0.8, step=0.01)
    assert rows.threshold(7) == 0.8
    rows.observe(7, 0.9, correct=False)  # a near-miss at 0.9: never again at or below it
    assert rows.threshold(7) == pytest.approx(0.91)
    rows.observe(7, 0.85, correct=True)  # right, but below a known wrong score: no change
    assert rows.threshold(7) == pytest.approx(0.91)
    rows.observe(8, 0.7, correct=True)  # row 8 proved right down to 0.7
    assert rows.threshold(8) == pytest.approx(0.7)
    rows.observe(8, 0.4, correct=True)  # but never below the floor (global - 0.25)
    assert rows.threshold(8) == pytest.approx(0.55)
    rows.forget([7, 8])
    assert rows.threshold(7) == rows.threshold(8) == 0.8


def test_learning_from_feedback_stops_a_recurring_wrong_reuse() -> None:
    """Intent 0 has a near-miss (intent 1) at cosine 0.9; the stream repeats it."""
    base = np.array([1.0, 0.0, 0.0], np.float32)
    near = np.array([0.9, np.sqrt(1 - 0.81), 0.0], np.float32)
    vectors = {"a": base, "b": near}
    stream = [(0, "a")] + [(1, "b")] * 20
    static = feedback.replay(stream, vectors, feedback.cosine_scorer, 0.85, learn=False)
    learned = feedback.replay(stream, vectors, feedback.cosine_scorer, 0.85, learn=True)
    assert static.wrong.sum() == 20  # every repeat served intent 0's answer
    assert learned.wrong.sum() == 1  # wrong once, verified, then forwarded and cached
    assert not learned.hit[2] and learned.hit[3:].all()  # forwarded once, then its own row


# -- conversation-aware keys ------------------------------------------------------------------
def test_context_keys_follow_the_users_context_and_never_cross_tenants() -> None:
    france = [Turn("user", "What is the capital of France?"), Turn("assistant", "Paris.")]
    assert context_key([]) == "" and cache_scope("acme", "") == "acme"
    assert context_key(france) == context_key(
        [Turn("user", "what is the  capital of France?"),
         Turn("assistant", "It is Paris, of course.")])
    assert context_key(france) != context_key([Turn("user", "What is the capital of Italy?")])
    scope = cache_scope("acme", context_key(france))
    assert scope != cache_scope("other", context_key(france)) and valid_scope(scope)
    assert not valid_scope('acme" or tenant != "x')
    assert history_problem([Turn("robot", "hi")], 100).startswith("history message 0 has role")
    assert "at most 10" in history_problem([Turn("user", "x" * 11)], 10)


def test_multiturn_followups_never_reuse_across_contexts(exported_embedder, tmp_path) -> None:
    path = SHARED_DATA / "multiturn_dev.jsonl"
    if not path.exists():
        pytest.skip("needs ../shared/data/multiturn_dev.jsonl")
    turns = multiturn.load_turns(path)
    texts = {t["question"] for t in turns} | {p for t in turns for p in t.get("paraphrases") or ()}
    vectors = EmbeddedTexts(texts, Embedder(), tmp_path)
    last_message = multiturn.run(turns, vectors, context_aware=False, threshold=0.8)
    aware = multiturn.run(turns, vectors, context_aware=True, threshold=0.8)
    assert last_message["foreign_wrong_reuses"] > 100  # the same follow-up, other first turn
    assert aware["foreign_wrong_reuses"] == 0
    assert aware["restated_hit_rate"] > 0.4  # restated turns still hit


def _history(*turns: tuple[str, str]) -> list[chat_pb2.ChatMessage]:
    return [chat_pb2.ChatMessage(role=r, content=c) for r, c in turns]


async def test_a_followup_is_reused_only_after_the_same_first_turn(edge_config, cloud,
                                                                   fake_llm) -> None:
    france = _history(("system", "Be brief."), ("user", "What is the capital of France?"),
                      ("assistant", "Paris."))
    italy = _history(("user", "What is the capital of Italy?"), ("assistant", "Rome."))
    followup = "Name a famous landmark there."
    async with running(Edged(edge_config(cloud=cloud))) as edge, \
            edge_client(edge.grpc.address) as stub:
        first = await stub.Ask(ask(followup, history=france))
        assert first.action == edge_pb2.ACTION_FORWARD
        messages = fake_llm.requests[-1]["messages"]  # the LLM saw the conversation
        assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
        assert messages[1]["content"] == "What is the capital of France?"
        other = await stub.Ask(ask(followup, history=italy))
        assert other.action == edge_pb2.ACTION_FORWARD  # never France's answer
        again = await stub.Ask(ask(followup, history=france))
        assert again.action == edge_pb2.ACTION_REUSE and again.cached_question == followup
        alone = await stub.Ask(ask(followup))  # no history: the tenant's own scope, empty
        assert alone.action == edge_pb2.ACTION_FORWARD
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.Ask(ask(followup, history=_history(("robot", "beep"))))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "role" in bad.value.details()


# -- the reuse guard at the edge --------------------------------------------------------------
async def test_the_guard_turns_untrusted_reuses_into_forwards_and_learns(edge_config,
                                                                         cloud) -> None:
    cfg = edge_config(cloud=cloud, policy=PolicyConfig(shadow_rate=1.0),
                      reuse=ReuseConfig(threshold=0.99))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        vetoed = await stub.Ask(ask(PARAPHRASE))  # cache-0.5 says A; cosine ~0.95 < 0.99
        assert vetoed.action == edge_pb2.ACTION_FORWARD and vetoed.answer == LLM_ANSWER
        exact = await stub.Ask(ask(QUESTION))
        assert exact.action == edge_pb2.ACTION_REUSE
        stats = await stub.GetStats(edge_pb2.GetStatsRequest())
        assert stats.reuses_vetoed == 1
        # The learner sees what the edge did: a forward, taken with certainty.
        (_, body), *_ = edge.spool.pending(1)
        record = trainer_pb2.Experience.FromString(body)
        assert record.action == Action.FORWARD and list(record.action_probs) == [0, 1, 0]
        for _ in range(50):  # the shadow check of the reuse and the forward's free check
            if edge.pipeline.counters.reuses_verified == 1 and \
                    len(edge.pipeline.guard.rows.rows) >= 1:
                break
            await asyncio.sleep(0.1)
        stats = await stub.GetStats(edge_pb2.GetStatsRequest())
        # The seeded answer differs from the LLM's: the verified reuse was judged wrong.
        assert stats.reuses_verified == 1 and stats.reuses_judged_wrong == 1
        assert stats.false_hit_estimate == pytest.approx(1.0)
    saved = json.loads((Path(cfg.data_dir) / "reuse_rows.json").read_text())
    assert saved["basis"] == "fixed 0.99" and saved["rows"]  # learned rows survive a restart
    assert stats.reuse_threshold == pytest.approx(0.99)
    guard = reuse_guard(cfg)
    assert guard.rows.rows.keys() == {int(k) for k in saved["rows"]}


async def test_the_guard_forgets_the_thresholds_of_deleted_entries(edge_config, cloud) -> None:
    """A per-row threshold lives as long as its row: an entry an operator deletes takes its
    learned threshold with it (before, the table kept every row ever verified)."""
    cfg = edge_config(cloud=cloud, reuse=ReuseConfig(threshold=0.99))
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        await seed(edge, "t1")
        await stub.Ask(ask(PARAPHRASE))  # vetoed: the forward's free check judges the row
        guard = edge.pipeline.guard
        for _ in range(50):
            if guard.rows.rows:
                break
            await asyncio.sleep(0.1)
        (pair,) = guard.rows.rows
        deleted = await stub.DeleteEntries(edge_pb2.DeleteEntriesRequest(ids=[pair]))
        assert deleted.deleted == 1
        for _ in range(50):
            if pair not in guard.rows.rows:
                break
            await asyncio.sleep(0.1)
        assert pair not in guard.rows.rows


async def test_a_running_edge_fits_its_threshold_to_the_questions_it_holds(edge_config,
                                                                            tmp_path) -> None:
    """Real Milvus: the edge counts its cached questions at start and takes the verifier's
    threshold for that many (here 0.5 for an empty cache, 0.9 from 4 questions up)."""
    path = tmp_path / "verifier.onnx"
    path.write_bytes(with_thresholds(_tiny_verifier(), {0.05: [(1, 0.5), (4, 0.9)]}))
    cfg = edge_config(reuse=ReuseConfig(verifier=str(path), delta=0.05))
    async with running(Edged(cfg)) as edge:
        for n in range(4):
            await seed(edge, "t1", f"{QUESTION} ({n})")
    async with running(Edged(cfg)) as edge, edge_client(edge.grpc.address) as stub:
        stats = await stub.GetStats(edge_pb2.GetStatsRequest())
        assert stats.reuse_threshold_questions == stats.cached_rows // 2 == 4
        assert stats.reuse_threshold == pytest.approx(0.9)


def test_an_edge_with_a_verifier_not_calibrated_for_its_delta_says_so(edge_config,
                                                                      tmp_path) -> None:
    path = tmp_path / "verifier.onnx"
    path.write_bytes(with_thresholds(_tiny_verifier(), {0.05: [(1_000, 0.7)]}))
    ok = reuse_guard(edge_config(reuse=ReuseConfig(verifier=str(path), delta=0.05)))
    assert ok.rows.global_threshold == pytest.approx(0.7) and ok.verifier is not None
    with pytest.raises(VerifierError, match=r"delta = 0\.02"):
        reuse_guard(edge_config(reuse=ReuseConfig(verifier=str(path), delta=0.02)))


# -- LRS on the verified state, the correctness-aware reward ------------------------------------
def test_the_verified_state_puts_p_same_where_the_similarity_was() -> None:
    from velo.core.state import CachedRow, build_state

    rows = [CachedRow(i, i, 1, q, "answer", 0, -1.0, 0.0, d)
            for i, (q, d) in enumerate([("How do I learn Java?", 0.3),
                                        ("How do I learn Python?", 0.5)])]
    f = np.ones(4, np.float32)
    paper = build_state(f, rows, 3)
    verifier = OnnxVerifier(_tiny_verifier())
    verified = build_state(f, rows, 3, verifier.scorer_for("how do i learn python"))
    assert np.allclose(paper.correlation[1:], verified.correlation[1:])  # c^k, c^r unchanged
    assert paper.correlation[0, 0] > paper.correlation[0, 1]  # Java is nearer by cosine...
    assert verified.correlation[0, 1] > verified.correlation[0, 0]  # ...Python means the same
    assert verified.correlation[0, 2] == 0  # padding stays padding


def test_an_edge_without_a_verifier_refuses_a_verified_state_policy(tmp_path) -> None:
    import hashlib

    from edged.trainer_link import PolicyFollower
    from lab.verifier import mark_state
    from trainerd.export import export_mlp_policy
    from velo.core.policy import OnnxPolicy, PolicyRejected, RandomPolicy

    body = mark_state(export_mlp_policy(), "verified")
    assert OnnxPolicy(body, 1, "v", top_p=5, embed_dim=384).state == "verified"
    digest = hashlib.sha256(body).hexdigest()
    args = dict(top_p=5, embed_dim=384, sample=False, seed=0, max_bytes=1 << 22)
    without = PolicyFollower(None, RandomPolicy(), tmp_path, **args)
    with pytest.raises(PolicyRejected, match="no verifier"):
        without._verify(body, 1, "v", digest)
    with_verifier = PolicyFollower(None, RandomPolicy(), tmp_path, **args, has_verifier=True)
    assert with_verifier._verify(body, 1, "v", digest).state == "verified"
    with pytest.raises(PolicyRejected, match="wants state"):
        OnnxPolicy(mark_state(export_mlp_policy(), "psychic"), 2, "x", top_p=5, embed_dim=384)


def test_the_correctness_aware_reward_charges_every_wrong_answer(exported_embedder,
                                                                 tmp_path) -> None:
    from lab.sim import SimConfig, SimEnv
    from lab.train import evaluate
    from velo.core.models import ROOT
    from velo.core.policy import CachePolicy
    from velo.core.records import load_qa

    items = load_qa(ROOT / "data" / "oasst1_dev.jsonl")[:40]
    results = {}
    for penalty in (0.0, 1.0):
        env = SimEnv(SimConfig(edges=1, seed=0, edge_s=0.01, false_hit_penalty=penalty), items,
                     Embedder(exported_embedder), None, ROOT / "data" / "llm_latency_llmperf.jsonl",
                     tmp_path)
        results[penalty] = evaluate(env, CachePolicy(2.0), 60, 7)  # reuse whatever is nearest
        env.close()
    paper, correct = results[0.0], results[1.0]
    assert paper["false_hit_rate"] > 0.2  # always-reuse serves other questions' answers
    wrong_share = paper["false_hit_rate"] * paper["hit_rate"]
    assert correct["reward"] == pytest.approx(paper["reward"] - wrong_share, abs=1e-6)


def test_the_reuse_benchmark_counts_serving_the_very_question_asked_as_right() -> None:
    """A pair file may hold the asked question, word for word, as another pair's `a`: serving
    its cached answer is right whatever the labels say (it counted wrong, which charged cosine
    for every exact repeat and taught the verifier to refuse them)."""
    from lab.reuse_bench import Scored

    asked = "How do I learn Python?"
    repeat = Scored(asked, frozenset(), 0.99, "how do I learn python", 1.0, "How do I learn Python")
    assert not repeat.wrong("cosine") and not repeat.wrong("verifier")
    other = Scored(asked, frozenset(), 0.9, "How do I learn Java?", 0.9, "How do I learn Java?")
    assert other.wrong("cosine") and other.wrong("verifier")
