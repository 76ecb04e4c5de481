"""What edged exports to Prometheus (velo.runtime.metrics): request outcomes and stage latencies as
they happen, and at each scrape the counters GetStats reports."""

from __future__ import annotations

import math
from collections.abc import Callable

from edged.config import EdgeConfig
from edged.decision import StageTimes
from velo.core.qos import Action
from velo.runtime.metrics import Metrics, Reading

SIMILARITY = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.975, 0.99, 1.0)
ACTION_LABELS = {Action.REUSE: "reuse", Action.FORWARD: "forward", Action.AUGMENT: "augment"}


class EdgeMetrics:
    def __init__(self, metrics: Metrics) -> None:
        self.requests = metrics.counter(
            "velo_edge_requests_total", "Requests by action (reuse/forward/augment; none when "
            "refused) and status (ok or the gRPC status code)", ["action", "status"])
        self.stage_seconds = metrics.histogram(
            "velo_edge_stage_seconds", "Time spent per stage of the request path "
            "(embed, search, state, policy, cloud)", ["stage"])
        # The whole delay by action, so that "p95 of reuses vs forwards" can be drawn. A
        # pass-through (no decision) is a forward here, as in velo_edge_requests_total and in
        # GetStats: the LLM answered it.
        self.request_seconds = metrics.histogram(
            "velo_edge_request_seconds", "Delay of each answered request (eq. 3's d) by the "
            "action that answered it (reuse/forward/augment; pass-through requests count as "
            "forward)", ["action"])
        self.bypasses = metrics.counter(
            "velo_edge_bypassed_total", "Requests no cached answer could serve, by reason "
            "(tools, tool_messages, logprobs: passed through to the LLM, never cached; "
            "no-cache; max_tokens: the nearest answer did not fit the token limit)", ["reason"])
        self.reuse_similarity = metrics.histogram(
            "velo_edge_reuse_similarity", "Similarity c^s of the cached entry each reuse (A) "
            "served", buckets=SIMILARITY)
        # Bound once: a labels() lookup per observation would cost on every request.
        self._answered = {action: self.requests.labels(label, "ok")
                          for action, label in ACTION_LABELS.items()}
        self._stages = {stage: self.stage_seconds.labels(stage) for stage in
                        ("embed", "search", "state", "policy", "cloud")}
        self._delays = {action: self.request_seconds.labels(label)
                        for action, label in ACTION_LABELS.items()}

    def answered(self, action: Action, times: StageTimes, cloud_s: float, delay_s: float,
                 similarity: float | None) -> None:
        self._answered[action].inc()
        stages = self._stages
        stages["embed"].observe(times.embed_s)
        stages["search"].observe(times.search_s)
        stages["state"].observe(times.state_s)
        stages["policy"].observe(times.policy_s)
        self._delays[action].observe(delay_s)
        if action is not Action.REUSE:
            stages["cloud"].observe(cloud_s)
        elif similarity is not None:
            self.reuse_similarity.observe(similarity)

    def passed_through(self, delay_s: float, cloud_s: float) -> None:
        """A pass-through request (no decision: only its forward and its delay count)."""
        self._answered[Action.FORWARD].inc()
        self._delays[Action.FORWARD].observe(delay_s)
        self._stages["cloud"].observe(cloud_s)

    def bypassed(self, reasons: tuple[str, ...]) -> None:
        for reason in reasons:
            self.bypasses.labels(reason).inc()

    def refused(self, status: str) -> None:
        self.requests.labels("none", status).inc()


def stats_readings(stats: Callable[[], dict[str, float]],
                   cfg: EdgeConfig) -> Callable[[], list[Reading]]:
    """Scrape-time readings of the edge's own counters (`stats()` returns them by name), and
    the settings the shipped alert rules compare them with (deploy/prometheus)."""
    described = {
        "cached_rows": ("velo_edge_cache_rows", "Rows in this edge's vector cache (two per QA "
                        "pair)", False),
        "index_rows": ("velo_edge_index_rows", "Rows in the edge's in-process index (what "
                       "searches read; Milvus holds the same rows, as the store of record)", False),
        "index_bytes": ("velo_edge_index_bytes", "Memory of the in-process index: vectors (8-bit "
                        "past 8,192 rows a scope), ids and row facts", False),
        "evicted_rows": ("velo_edge_evicted_rows_total", "Rows evicted (below-mean value, TTL, "
                         "cap)", True),
        "inflight": ("velo_edge_requests_in_flight", "Requests being answered now", False),
        "policy_version": ("velo_edge_policy_version", "Version of the learned policy in use "
                           "(0: the baseline)", False),
        "policies_rejected": ("velo_edge_policies_rejected_total", "Learned policies this edge "
                              "refused (it kept the last good one)", True),
        "experience_pending": ("velo_edge_experience_spooled", "Experience records on disk "
                               "waiting for trainerd", False),
        "experience_sent": ("velo_edge_experience_sent_total", "Experience records trainerd "
                            "acknowledged", True),
        "experience_dropped": ("velo_edge_experience_dropped_total", "Experience records "
                               "dropped (spool full, or refused by trainerd)", True),
        "shadow_verified": ("velo_edge_shadow_verified_total", "Answers re-asked to the LLM "
                            "to measure q", True),
        "shadow_skipped": ("velo_edge_shadow_skipped_total", "Shadow samples skipped (cloud or "
                           "shadow budget busy)", True),
        "bypassed": ("velo_edge_pass_through_total", "Requests passed through to the LLM "
                     "(tools, tool messages, logprobs): never served from or stored in the cache",
                     True),
        "entries_superseded": ("velo_edge_entries_superseded_total", "Cache entries replaced "
                               "by a no-cache request's fresh answer", True),
        "entries_deleted": ("velo_edge_entries_deleted_total", "Cache entries deleted by an "
                            "operator (admin API)", True),
        "prompt_vector_hits": ("velo_edge_prompt_vector_hits_total", "Requests whose prompt's "
                               "embedding was kept from an earlier request (not embedded again)",
                               True),
        "reuses_vetoed": ("velo_edge_reuses_vetoed_total", "Reuses the reuse guard turned into "
                          "forwards", True),
        "reuses_verified": ("velo_edge_reuses_verified_total", "Reuses shadow-verified against "
                            "a fresh LLM answer (with or without a reuse guard): the sample "
                            "count of velo_edge_false_hit_estimate", True),
        "reuses_judged_wrong": ("velo_edge_reuses_judged_wrong_total", "Verified reuses judged "
                                "wrong (q below [reuse] right_q)", True),
        "false_hit_estimate": ("velo_edge_false_hit_estimate", "Share of shadow-verified reuses "
                               "judged wrong since the edge started; NaN while none was "
                               "verified (velo_edge_reuses_verified_total is the sample count: "
                               "require a minimum of it before alerting)", False),
        "reuse_threshold": ("velo_edge_reuse_threshold", "The reuse guard's threshold in force "
                            "(rises with the cached questions when taken from a verifier for "
                            "[reuse] delta)", False),
        "reuse_threshold_questions": ("velo_edge_reuse_threshold_questions", "Cached questions "
                                      "the reuse threshold in force was taken for", False),
    }

    settings = [
        Reading("velo_edge_reuse_delta", "[reuse] delta: the false-hit rate this edge is "
                "configured to stay below (what velo_edge_false_hit_estimate is compared with)",
                cfg.reuse.delta),
        Reading("velo_edge_experience_spool_max_records", "spool_max_records: the most "
                "experience records the spool keeps before it drops the oldest "
                "(spool_max_bytes may bound it first)", cfg.spool_max_records),
    ]

    def read() -> list[Reading]:
        values = stats()
        if not values.get("reuses_verified"):
            # No sample, no estimate: NaN, as PromQL's own 0/0, so that no rule or panel reads
            # "0 % false hits" off an edge that has verified nothing.
            values["false_hit_estimate"] = math.nan
        return [*settings, *(Reading(name, help, float(value), counter)
                             for key, value in values.items() if key in described
                             for name, help, counter in [described[key]])]

    return read
