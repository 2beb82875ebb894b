"""What lookup's draft datastore is and costs, for the benchmark report.

A datastore that matches many contexts is only worth it if a lookup is cheap next to a decode step
and the index fits in memory, so the report states, for the bundle the run used: the corpus (the
model's own answers: sequences, tokens, where they came from), the index (n-gram keys per length,
bytes), the time to build the index from the stored corpus (what the first lookup call of a process
pays), and the mean cost of one proposal over the run's own prompts (each prompt's context at every
tenth position, as the decode loop would ask it).
"""

from __future__ import annotations

import time

from exitspec.decoding.datastore import NgramStore
from exitspec.decoding.strategies.lookup import bundle_store

PROPOSAL_DRAFTS = 3  # lookup's default draft length
STRIDE = 10  # context positions between two timed proposals
MIN_PROPOSALS = 2000  # the contexts are cycled until this many proposals were timed


def measure_datastore(model, contexts: list[list[int]]) -> dict | None:
    """Facts of the attached bundle's datastore (None without one); `contexts`: the run's prompt ids."""
    bundle = model.heads
    store = bundle_store(bundle, model.lm.vocab_size) if bundle is not None else None
    if store is None:
        return None
    t = time.perf_counter()
    NgramStore(store.stream, model.lm.vocab_size, min_n=store.ns[-1], max_n=store.ns[0])  # the index, rebuilt
    build_s = time.perf_counter() - t
    queries = [ids[:j] for ids in contexts for j in range(2, len(ids) + 1, STRIDE)] or [[0, 0]]
    calls, hits, t = 0, 0, time.perf_counter()
    while calls < MIN_PROPOSALS:
        for q in queries:
            hits += bool(store.propose(q, PROPOSAL_DRAFTS)[0])
            calls += 1
    lookup_us = (time.perf_counter() - t) / calls * 1e6
    corpus = dict(getattr(bundle.config, "draft_corpus", {}) or {})
    index_bytes = sum(a.nbytes for a in store.keys.values()) + sum(a.nbytes for a in store.starts.values())
    return {"sequences": corpus.get("sequences"), "source": corpus.get("source"), "tokens": store.tokens,
            "keys": {str(n): len(store.keys[n]) for n in store.ns}, "index_mib": index_bytes / 2**20,
            "stream_mib": store.stream.nbytes / 2**20, "build_s": build_s, "lookup_us": lookup_us,
            "proposals_timed": calls, "hit_rate": hits / calls}


def describe(facts: dict) -> str:
    """One report line."""
    keys = ", ".join(f"{n}-grams {k:,}" for n, k in facts["keys"].items())
    source = f" from {facts['source']}" if facts.get("source") else ""
    seqs = f"{facts['sequences']:,} answers, " if facts.get("sequences") else ""
    return (f"Draft datastore (lookup, hybrid): {seqs}{facts['tokens']:,} tokens{source}; index {keys} "
            f"({facts['index_mib']:.1f} MiB + {facts['stream_mib']:.1f} MiB of tokens), built in "
            f"{facts['build_s']:.2f} s from the stored corpus; one proposal {facts['lookup_us']:.1f} us on average "
            f"over {facts['proposals_timed']:,} proposals at this run's prompt contexts ({facts['hit_rate']:.0%} "
            "found a match).")
