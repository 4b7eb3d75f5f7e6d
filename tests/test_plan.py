"""Plans: token buckets over 1..infinity, per-bucket resolutions, measured ranking, the layout
policy, and layers that dispatch per call. Properties over the problem space and token counts,
with backends whose variants have token ranges and layouts of their own, and synthetic tuning
caches (ranking must follow whatever they say)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from quantoracle.backends.base import KernelBackend, Kernels
from quantoracle.backends.reference.linear import linear as reference_linear
from quantoracle.backends.reference.moe import fused_moe as reference_moe
from quantoracle.layers import NVFP4FusedMoE, NVFP4Linear
from quantoracle.oracle import (
    BackendSpec,
    Device,
    ForcedBackendError,
    NoBackendError,
    Problem,
    SchemeSupport,
    Variant,
    hookimpl,
    plan,
    resolve,
)
from quantoracle.oracle.engine import candidates, clear_caches
from quantoracle.oracle.fingerprint import Fingerprint
from quantoracle.oracle.rules import Context, evaluate
from quantoracle.oracle.tuning import LADDER, Measurement, TuningCache
from quantoracle.schemes import W4A16_NVFP4, W4A4_NVFP4
from quantoracle.schemes.keys import NVFP4_ACT_DYNAMIC, NVFP4_WEIGHT

from oracle_helpers import registry_with_extras
from test_oracle_properties import problems

CALLS: list[str] = []


def _recording(name: str) -> Kernels:
    """The reference kernels, recording which backend/variant ran (to see the dispatch)."""

    def linear(x, state, *, quantize_activations, variant=None):
        CALLS.append(f"{name}/{variant}" if variant else name)
        return reference_linear(x, state, quantize_activations=quantize_activations)

    def fused_moe(x, state, topk_weights, topk_ids, *, activation, quantize_activations, variant=None):
        CALLS.append(f"{name}/{variant}" if variant else name)
        return reference_moe(x, state, topk_weights, topk_ids, activation=activation,
                             quantize_activations=quantize_activations)

    return Kernels(lambda w: w, linear, lambda w: w, fused_moe)


SCHEMES = (SchemeSupport(weight=NVFP4_WEIGHT, activation=None),
           SchemeSupport(weight=NVFP4_WEIGHT, activation=NVFP4_ACT_DYNAMIC, emulated=True))


class RangedPlugin:
    """``ranged``: variants ``small`` (1..64), ``large`` (65+, its own layout) and ``hopper``
    (65+, sm90 only, N a multiple of 64, above the others in priority); ``capped``: serves
    1..1000 tokens only; both on CPU and CUDA, above ``reference`` in priority."""

    @hookimpl
    def quantoracle_backends(self):
        ranged = BackendSpec(
            name="ranged", layer_kinds={"linear", "moe"}, schemes=SCHEMES, platforms={"cpu", "cuda"},
            moe_activations={"silu", "gelu"}, priority=3,
            variants=(Variant(name="small", max_tokens=64),
                      Variant(name="large", min_tokens=65, layout="ranged_large"),
                      Variant(name="hopper", platforms={"cuda"}, capabilities="sm90", n_multiple_of=64,
                              min_tokens=65, priority=4)),
        )
        capped = BackendSpec(name="capped", layer_kinds={"linear", "moe"}, schemes=SCHEMES,
                             platforms={"cpu", "cuda"}, moe_activations={"silu", "gelu"}, max_tokens=1000, priority=2)
        return [KernelBackend(ranged, lambda: _recording("ranged")), KernelBackend(capped, lambda: _recording("capped"))]


REGISTRY = registry_with_extras()
REGISTRY.register(RangedPlugin(), name="ranged_plugin")
NAMES = sorted(REGISTRY.backends)


@st.composite
def caches(draw):
    """A capability-matched cache for sm90 measuring random candidates at random ladder points
    of the problem's shape (so every problem on sm90 has a nearest shape: its own or another)."""
    labels = sorted({label for kind in ("linear", "moe") for label in candidates(REGISTRY, kind)})
    ladder = sorted(draw(st.sets(st.sampled_from(LADDER), min_size=1, max_size=5)))
    rows = []
    for kind, shape in (("linear", dict(n=256, k=128)), ("moe", dict(n=128, k=64, experts=8, top_k=2))):
        for scheme in ("w4a16_nvfp4", "w4a4_nvfp4"):
            for label in draw(st.sets(st.sampled_from(labels), min_size=1, max_size=4)):
                for m in ladder:
                    rows.append(Measurement(kind=kind, scheme=scheme, dtype="bfloat16", tokens=m, candidate=label,
                                            us=draw(st.floats(1, 1000)), **shape))
    fp = Fingerprint(device="sm90", python="3", packages=())
    return TuningCache(fingerprint=fp, match="capability", measurements=tuple(rows))


options = st.fixed_dictionaries({
    "force": st.none() | st.sampled_from(NAMES),
    "activation_fallback": st.sampled_from(["weight_only", "emulate", "error"]),
    "layouts": st.sampled_from(["one", "fastest"]),
})


def _plan(problem, opts, tuning):
    try:
        return plan(problem, registry=REGISTRY, tuning=tuning, **opts)
    except NoBackendError as err:
        return err


def _probe_tokens(p):
    """Token counts worth checking: each bucket's ends and a point inside, and a few fixed ones."""
    points = {1, 2, 3, 63, 64, 65, 1000, 1001, 5000}
    for b in p.buckets:
        points |= {b.min_tokens, b.min_tokens + 1}
        if b.max_tokens is not None:
            points |= {b.max_tokens, (b.min_tokens + b.max_tokens) // 2}
    return sorted(points)


@settings(max_examples=40)
@given(problem=problems(), opts=options, cache=caches())
def test_plans_cover_every_token_count_and_agree_with_resolve(tmp_path_factory, problem, opts, cache):
    path = tmp_path_factory.mktemp("tuning") / "cache.json"
    cache.save(path)
    p = _plan(problem, opts, str(path))
    if isinstance(p, NoBackendError):
        if opts["force"]:
            assert isinstance(p, ForcedBackendError)
        return
    # contiguous, no gaps, no overlap, open end
    assert p.buckets[0].min_tokens == 1 and p.buckets[-1].max_tokens is None
    for a, b in zip(p.buckets, p.buckets[1:]):
        assert b.min_tokens == a.max_tokens + 1
        assert a.resolution.choice != b.resolution.choice  # neighbours that agree are joined
    if opts["layouts"] == "one":
        assert len(p.layouts) == 1
    cands = candidates(REGISTRY, problem.kind)
    for m in _probe_tokens(p):
        at = p.at(m)
        assert at.choice == resolve(problem, tokens=m, registry=REGISTRY, tuning=str(path), **opts).choice
        # the bucket's candidate passes every rule at every M it serves
        allowed = frozenset(p.layouts) if opts["layouts"] == "one" else None
        ctx = Context(allow_emulation=at.fallback == "emulate", tokens=m, variant=at.variant, layouts=allowed)
        spec = cands[at.label].spec if at.label in cands else None
        assert spec is not None and evaluate(spec, at.effective_problem, ctx) == ()
        if opts["force"]:
            assert at.name == opts["force"] and at.forced
        if opts["layouts"] == "fastest" and at.decided_by and not opts["force"]:
            measured = {c: us for c, us in at.decided_by.costs.items() if c in at.survivors}
            assert at.label in measured and measured[at.label] == min(measured.values())


@settings(max_examples=25)
@given(problem=problems(), cache=caches())
def test_a_cache_whose_fingerprint_does_not_match_changes_no_answer(tmp_path_factory, problem, cache):
    path = tmp_path_factory.mktemp("tuning") / "cache.json"
    foreign = cache.model_copy(update={"fingerprint": cache.fingerprint.model_copy(update={"device": "sm80"}),
                                       "match": "capability"})
    foreign.save(path)
    problem = problem.model_copy(update={"device": Device.parse("sm90")})
    # both consult the shipped caches too; the foreign one must add nothing
    with_cache, without = _plan(problem, {}, str(path)), _plan(problem, {}, None)
    assert type(with_cache) is type(without)
    if isinstance(without, NoBackendError):
        return
    assert [(b.min_tokens, b.resolution.choice) for b in with_cache.buckets] == \
           [(b.min_tokens, b.resolution.choice) for b in without.buckets]
    assert any("not used" in note and "sm80" in note for note in with_cache.first.notes)


def sm90(kind="linear", scheme=W4A16_NVFP4, device="sm90", **shape):
    shape = shape or (dict(n=256, k=128) if kind == "linear" else dict(n=128, k=64, experts=8, top_k=2))
    return Problem(kind=kind, scheme=scheme, device=Device.parse(device), **shape)


def cpu(**kwargs):
    """On the CPU only the test backends and ``reference`` compete."""
    return sm90(device="cpu", **kwargs)


def test_token_ranges_split_the_plan_and_layouts_one_keeps_a_single_copy():
    registry = REGISTRY
    fastest = plan(cpu(), registry=registry, layouts="fastest", tuning="none")
    assert [(b.range, b.resolution.label) for b in fastest.buckets] == [("1-64", "ranged/small"), ("65+", "ranged/large")]
    assert fastest.layouts == ("ranged", "ranged_large")
    one = plan(cpu(), registry=registry, tuning="none")
    assert len(one.layouts) == 1
    at_100 = one.at(100)
    assert {f.code for f in at_100.rejections["ranged/large"]} == {"layout"}
    # resolve for every batch size refuses what serves only some
    res = resolve(cpu(), registry=registry, tuning="none")
    assert "tokens" in {f.code for f in res.rejections["ranged/small"]}
    assert "tokens" in {f.code for f in res.rejections["capped"]}


def test_a_variant_for_one_architecture_is_a_candidate_only_there():
    """``ranged/hopper`` sets platforms, capabilities and an N multiple of its own: chosen on
    sm90 at 65+ tokens when N allows it, rejected with the rule that says why elsewhere."""
    def at_100(problem):
        return resolve(problem, tokens=100, registry=REGISTRY, force="ranged", layouts="fastest", tuning="none")

    assert at_100(sm90(n=256, k=128)).label == "ranged/hopper"
    for problem, code in ((sm90(n=256, k=128, device="sm80"), "capability"), (cpu(n=256, k=128), "platform"),
                          (sm90(n=96, k=128), "shape")):
        res = at_100(problem)
        assert res.label == "ranged/large"
        assert {f.code for f in res.rejections["ranged/hopper"]} == {code}
    # the backend itself and its other variants keep the backend's rules
    assert at_100(cpu(n=96, k=128)).label == "ranged/large"


def test_variant_fields_are_validated_like_the_backend_s():
    with pytest.raises(ValueError, match="n_multiple_of"):
        Variant(name="v", n_multiple_of=0)
    with pytest.raises(ValueError, match="sm"):
        Variant(name="v", capabilities="hopper")
    assert Variant(name="v", capabilities=("sm80+", "sm120")).capabilities == BackendSpec(
        name="b", layer_kinds={"linear"}, schemes=SCHEMES, platforms={"cuda"}, capabilities=("sm80+", "sm120")).capabilities


def test_force_pins_every_bucket_or_names_the_token_count_it_cannot_serve():
    p = plan(cpu(), registry=REGISTRY, force="ranged", layouts="fastest", tuning="none")
    assert {b.resolution.name for b in p.buckets} == {"ranged"}
    with pytest.raises(ForcedBackendError, match="1001 tokens") as err:
        plan(cpu(), registry=REGISTRY, force="capped", tuning="none")
    assert {f.code for f in err.value.rejections["capped"]} == {"tokens"}


def test_measurements_rank_and_the_explanation_names_them(tmp_path):
    rows = [Measurement(kind="linear", scheme="w4a16_nvfp4", dtype="bfloat16", n=256, k=128, tokens=m,
                        candidate=label, us=us)
            for m, costs in {1: {"capped": 5.0, "ranged/small": 9.0}, 1024: {"capped": 50.0, "ranged/large": 20.0}}.items()
            for label, us in costs.items()]
    path = tmp_path / "cache.json"
    TuningCache(fingerprint=Fingerprint(device="sm90", python="3"), match="capability", measurements=tuple(rows)).save(path)
    p = plan(sm90(n=512, k=128), registry=REGISTRY, layouts="fastest", tuning=str(path))
    assert p.at(1).label == "capped" and p.at(1).ranking == "measured"
    assert p.at(5000).label == "ranged/large"
    text = p.explain()
    assert "measured at linear 256x128, M=1" in text and "capped 5.0" in text
    # the nearest ladder point decides (32 is as near to 1 as to 1024 in log scale: the lower)
    assert p.at(32).decided_by.tokens == 1 and p.at(33).decided_by.tokens == 1024
    # from 33 on the 1024-token row ranks: capped (50 us) until ranged/large may serve (65+, 20 us)
    assert p.at(64).label == "capped" and p.at(65).label == "ranged/large"
    data = p.to_dict()
    assert data["plan"][0]["min_tokens"] == 1 and data["plan"][-1]["max_tokens"] is None


def _alone(layer, res, x, *routing):
    """``res``'s backend alone, on weights it prepares itself: what the layer must equal."""
    weights = layer._prepared[(res.layout, res.scheme.name)].state  # the reference kernels keep the weights
    prepared = res.backend.prepare(weights, res.effective_problem)
    return res.backend.apply(prepared, x, *routing, variant=res.variant)


@pytest.fixture
def clean_calls():
    CALLS.clear()
    yield CALLS
    clear_caches()


def test_a_linear_layer_dispatches_each_call_to_its_bucket(clean_calls):
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    layer = NVFP4Linear.from_float(w, dtype=torch.float32, registry=REGISTRY, layouts="fastest", tuning="none")
    assert layer.backends == ("ranged/small", "ranged/large")
    held = layer.prepared_bytes  # two layouts: two prepared copies (here the same checkpoint tensors)
    assert set(held) == {"ranged", "ranged_large"} and all(b >= layer.weight_bytes for b in held.values())
    for m, expected in ((3, "ranged/small"), (64, "ranged/small"), (65, "ranged/large"), (200, "ranged/large")):
        clean_calls.clear()
        x = torch.randn(m, 128)
        y = layer(x)
        assert clean_calls == [expected]
        assert torch.equal(y, _alone(layer, layer.plan.at(m), x))
    assert "plan=1-64:ranged/small 65+:ranged/large" in repr(layer)


def test_a_moe_layer_dispatches_each_call_to_its_bucket(clean_calls):
    torch.manual_seed(1)
    gate_up, down = torch.randn(4, 64, 32) * 0.1, torch.randn(4, 32, 32) * 0.1
    layer = NVFP4FusedMoE.from_float(gate_up, down, top_k=2, dtype=torch.float32, registry=REGISTRY,
                                     layouts="fastest", tuning="none")
    for m, expected in ((1, "ranged/small"), (70, "ranged/large")):
        clean_calls.clear()
        x, logits = torch.randn(m, 32), torch.randn(m, 4)
        y = layer(x, logits)
        assert clean_calls == [expected]
        assert torch.equal(y, _alone(layer, layer.plan.at(m), x, *layer.route(logits)))


def test_a_w4a4_layer_plans_its_fallback_per_bucket():
    p = plan(cpu(scheme=W4A4_NVFP4), registry=REGISTRY, activation_fallback="emulate", layouts="fastest", tuning="none")
    assert [(b.range, b.resolution.label, b.resolution.fallback) for b in p.buckets] == [
        ("1-64", "ranged/small", "emulate"), ("65+", "ranged/large", "emulate")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_triton_plan_dispatch_under_cuda_graph_capture():
    from quantoracle.timing import capture_graph

    torch.manual_seed(2)
    w = torch.randn(256, 512, device="cuda")
    layer = NVFP4Linear.from_float(w, force="triton_nvfp4", layouts="fastest")
    for m in (1, 300, 5000):
        x = torch.randn(m, 512, device="cuda", dtype=torch.bfloat16)
        eager = layer(x)
        out = []
        graph = capture_graph([lambda: out.append(layer(x))])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out[-1], eager)
        res = layer.plan.at(m)
        forced = NVFP4Linear.from_float(w, force=res.label, layouts="fastest", verify="off")
        assert torch.equal(forced(x), eager)
