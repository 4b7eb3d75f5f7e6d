"""``quantoracle tune`` ranks only what computes the right numbers: each candidate is checked
against ``reference`` at every token count before it is timed, and one that fails anywhere is
measured nowhere. Run on the CPU with the deliberately wrong backends of ``test_trust``; only
the GPU timing is replaced (by a fixed cost per token count), the checks and the bookkeeping
are tune's own."""

from __future__ import annotations

import pytest
import torch

from quantoracle import tune as tune_module
from quantoracle.oracle import Device, Problem
from quantoracle.schemes import W4A16_NVFP4

from test_trust import EXACT, WRONG, registry_with

LADDER = (1, 2, 4, 8)
PROBLEMS = {
    "linear": dict(kind="linear", n=48, k=64),
    "moe": dict(kind="moe", n=32, k=64, experts=8, top_k=2),
}


@pytest.mark.parametrize("kind", sorted(PROBLEMS))
def test_tune_measures_only_candidates_that_pass_the_numerics_check(monkeypatch, kind):
    monkeypatch.setattr(tune_module, "_time", lambda backend, states, problem, m, *rest: 10.0 + m)
    registry = registry_with({"exact": EXACT, **WRONG})
    problem = Problem(scheme=W4A16_NVFP4, device=Device.parse("cpu"), dtype="float32", **PROBLEMS[kind])
    report = tune_module.TuneReport(cache=None)
    rows = tune_module._tune_problem(problem, LADDER, registry, 0.1, report, tune_module._progress(0, False),
                                     l2=1 << 20, device="cpu")

    assert {(r.candidate, r.tokens) for r in rows} == {("exact", m) for m in LADDER}
    assert all(r.us == 10.0 + r.tokens for r in rows)
    by_label = {label: [c for c in report.checks if c.label == label] for label in ("exact", *WRONG)}
    assert [c.tokens for c in by_label["exact"]] == list(LADDER) and all(c.passed for c in by_label["exact"])
    # a wrong candidate stops at its first failing check: scaled and nan at once, below4 at M = 4
    # (its passing M = 1, 2 are measured nowhere either)
    assert [(c.tokens, c.passed) for c in by_label["scaled"]] == [(1, False)]
    assert [(c.tokens, c.passed) for c in by_label["nan"]] == [(1, False)]
    assert [(c.tokens, c.passed) for c in by_label["below4"]] == [(1, True), (2, True), (4, False)]
    assert len(report.failures) == 3
    for label in WRONG:
        assert any(f" {label}: numerics: {label} at M=" in failure for failure in report.failures), report.failures
    assert all("not measured at any M" in failure for failure in report.failures)
