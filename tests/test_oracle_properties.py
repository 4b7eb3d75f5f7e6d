"""Properties of resolve over the whole problem space: schemes x layer kinds x devices x dtypes x
MoE activations x shapes x TP/EP x force/exclude x fallback policy."""

from hypothesis import given
from hypothesis import strategies as st

from quantoracle.oracle import (
    Device,
    ForcedBackendError,
    NoBackendError,
    ParallelConfig,
    Problem,
    Resolution,
    resolve,
)
from quantoracle.oracle.engine import FALLBACKS, _resolve, candidates
from quantoracle.oracle.rules import Context, evaluate
from quantoracle.schemes import SCHEMES

from oracle_helpers import registry_with_extras

REGISTRY = registry_with_extras()
NAMES = sorted(REGISTRY.backends)
LABELS = sorted({label for kind in ("linear", "moe") for label in candidates(REGISTRY, kind)})


def labels_of(kind, force=None, exclude=frozenset()):
    """The candidate labels resolve judges for a layer kind under force/exclude."""
    named = lambda label, names: any(label == n or label.split("/")[0] == n for n in names)  # noqa: E731
    found = candidates(REGISTRY, kind)
    if force:
        return {label for label in found if named(label, {force})} or {force}
    return {label for label in found if not named(label, exclude)}
DEVICES = ["cpu", "rocm", "sm75", "sm80", "sm86", "sm89", "sm90", "sm100", "sm120"]


@st.composite
def problems(draw):
    kind = draw(st.sampled_from(["linear", "moe"]))
    tp = draw(st.sampled_from([1, 2, 4, 8]))
    tp_dim = draw(st.sampled_from(["column", "row"]))
    unit = st.sampled_from([8, 16, 32, 48, 64, 128, 176, 256])
    n, k = draw(unit), draw(unit)
    if kind == "moe" or tp_dim == "column":
        n *= tp
    else:
        k *= tp
    fields = dict(
        kind=kind,
        scheme=draw(st.sampled_from(sorted(SCHEMES.values(), key=str))),
        device=Device.parse(draw(st.sampled_from(DEVICES))),
        dtype=draw(st.sampled_from(["bfloat16", "float16", "float32"])),
        n=n,
        k=k,
    )
    ep = 1
    if kind == "moe":
        ep = draw(st.sampled_from([1, 2, 4]))
        experts = ep * draw(st.integers(1, 16))
        fields.update(
            experts=experts,
            top_k=draw(st.integers(1, min(experts, 8))),
            moe_activation=draw(st.sampled_from(["silu", "gelu", "relu2"])),
        )
    fields["parallel"] = ParallelConfig(
        tp_size=tp, tp_rank=draw(st.integers(0, tp - 1)), tp_dim=tp_dim,
        ep_size=ep, ep_rank=draw(st.integers(0, ep - 1)),
    )
    return Problem(**fields)


options = st.fixed_dictionaries(
    {
        "force": st.none() | st.sampled_from(NAMES + LABELS),
        "exclude": st.frozensets(st.sampled_from(NAMES + LABELS), max_size=2),
        "activation_fallback": st.sampled_from(FALLBACKS),
        "tokens": st.none() | st.integers(1, 10_000),
    }
).filter(lambda o: o["force"] is None or not ({o["force"], o["force"].split("/")[0]} & o["exclude"]))


def outcome(problem, opts):
    try:
        return resolve(problem, registry=REGISTRY, **opts)
    except NoBackendError as err:
        return err


@given(problems(), options)
def test_resolve_is_total_and_deterministic(problem, opts):
    first = outcome(problem, opts)
    assert isinstance(first, (Resolution, NoBackendError))  # any other exception fails the test
    _resolve.cache_clear()
    second = outcome(problem, opts)
    assert type(first) is type(second)
    if isinstance(first, NoBackendError):
        assert str(first) == str(second)
        assert first.rejections and all(first.rejections.values())
    else:
        assert (first.name, first.survivors, first.fallback) == (second.name, second.survivors, second.fallback)
        assert first.rejections == second.rejections


@given(problems(), options)
def test_the_chosen_backend_passes_all_its_rules(problem, opts):
    res = outcome(problem, opts)
    if isinstance(res, NoBackendError):
        return
    chosen = candidates(REGISTRY, problem.kind)[res.label]
    ctx = Context(allow_emulation=res.fallback == "emulate", tokens=opts["tokens"], variant=res.variant)
    assert evaluate(chosen.spec, res.effective_problem, ctx) == ()
    assert res.survivors[0] == res.label and res.layout == chosen.spec.layout_name
    assert set(res.survivors).isdisjoint(res.rejections)
    assert set(res.survivors) | set(res.rejections) == labels_of(problem.kind, opts["force"], opts["exclude"])


@given(problems(), options)
def test_a_forced_backend_is_chosen_or_an_error_says_why(problem, opts):
    res = outcome(problem, opts)
    if opts["force"] is None:
        return
    forced = labels_of(problem.kind, opts["force"])
    if isinstance(res, NoBackendError):
        assert isinstance(res, ForcedBackendError)
        assert set(res.rejections) == forced and all(res.rejections.values())
    else:
        assert res.label in forced and res.forced_by == "force"


@given(problems(), options)
def test_excluding_the_winner_yields_the_next_survivor(problem, opts):
    opts = {**opts, "force": None}
    res = outcome(problem, opts)
    if isinstance(res, NoBackendError) or len(res.survivors) < 2:
        return
    again = outcome(problem, {**opts, "exclude": opts["exclude"] | {res.label}})
    if isinstance(again, NoBackendError):
        # under the one-layout policy, excluding the winner may leave some token count of its
        # plan without a candidate of one layout; the unconstrained choice still exists
        again = resolve(problem, registry=REGISTRY, layouts="fastest", **{**opts, "exclude": opts["exclude"] | {res.label}})
    assert again.fallback == res.fallback or again.fallback is None or res.fallback is None
    if again.fallback == res.fallback and opts["tokens"] is None:
        assert again.label == res.survivors[1]


@given(problems(), options)
def test_w4a4_only_backends_never_serve_16bit_activations(problem, opts):
    res = outcome(problem, opts)
    if isinstance(res, NoBackendError) or res.scheme.activation is not None:
        return
    assert any(
        s.weight == res.scheme.weight and s.activation in (None, "any") for s in res.backend.spec.schemes
    )
