"""Trust what was chosen (issue 14): the numerics check on first use against deliberately wrong
backends, the quarantine as data (shipped, user file, run time), and the fingerprint.

The wrong backends are real test plugins on platform "cpu" with a priority above ``reference``:
their kernels run the reference kernels and then corrupt the output (a small scale, NaN, or a
scale only from some batch size on), so the layers, the check, the quarantine and the re-plan
all run as they would on a GPU with a broken kernel.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import re
from fnmatch import fnmatchcase
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from packaging.version import Version

from quantoracle.backends.base import KernelBackend, Kernels
from quantoracle.backends.reference.linear import linear as reference_linear
from quantoracle.backends.reference.moe import fused_moe as reference_moe
from quantoracle.errors import NumericsCheckError, OptionError, QuarantineError
from quantoracle.layers import NVFP4FusedMoE, NVFP4Linear
from quantoracle.oracle import BackendSpec, Device, Problem, Registry, SchemeSupport, hookimpl, resolve
from quantoracle.oracle.engine import ForcedBackendError, clear_caches
from quantoracle.oracle.fingerprint import Fingerprint
from quantoracle.oracle.quarantine import (
    ENV_QUARANTINE,
    SHIPPED,
    QuarantineEntry,
    add_runtime_entry,
    clear_runtime_entries,
    load_entries,
)
from quantoracle.oracle.tuning import Measurement, TuningCache
from quantoracle.schemes import W4A4_NVFP4, W4A16_NVFP4
from quantoracle.schemes.keys import NVFP4_WEIGHT
from quantoracle.verify import ENV_VERIFY, PROBE_TOKENS, Check, check_layer

DOC = Path(__file__).parents[1] / "docs/trust.md"


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    """No run-time quarantine entry, verify policy, user quarantine or forced backend leaks
    into or out of a test."""
    for name in (ENV_VERIFY, ENV_QUARANTINE, "QUANTORACLE_BACKEND", "QUANTORACLE_TUNING"):
        monkeypatch.delenv(name, raising=False)
    clear_runtime_entries()
    yield
    clear_runtime_entries()


# ---------------------------------------------------------------------------------------------
# wrong backends


def corrupted(how):
    """Kernels that run the reference and then pass (x, y) through ``how``."""

    def wrap(kernel):
        def run(x, *args, **kwargs):
            return how(x, kernel(x, *args, **kwargs))

        return run

    return lambda: Kernels(lambda w: w, wrap(reference_linear), lambda w: w, wrap(reference_moe))


WRONG = {
    "scaled": lambda x, y: y * 1.05,
    "nan": lambda x, y: torch.full_like(y, math.nan),
    "below4": lambda x, y: y if x.shape[0] < 4 else y * 1.5,  # right only for M < 4
}
EXACT = lambda x, y: y  # noqa: E731


class Plugin:
    """One CPU backend per (name, corruption); no token limit, so the engine trusts it for every M."""

    def __init__(self, how: dict, tolerance: float | None = None, schemes=(W4A16_NVFP4,)) -> None:
        self.backends = [
            KernelBackend(BackendSpec(
                name=name, layer_kinds={"linear", "moe"}, platforms={"cpu"}, moe_activations={"silu", "gelu"},
                schemes=tuple(SchemeSupport(weight=NVFP4_WEIGHT, activation=s.activation, tolerance=tolerance)
                              for s in schemes),
                priority=10 + i,
            ), corrupted(fn))
            for i, (name, fn) in enumerate(how.items())
        ]

    @hookimpl
    def quantoracle_backends(self):
        return self.backends


def registry_with(how: dict, **plugin) -> Registry:
    registry = Registry(entry_points=False)
    registry.register(Plugin(how, **plugin), name="trust_test_plugin")
    return registry


E, H, I, TOP_K = 8, 64, 32, 2


def linear_layer(registry, verify, dtype=torch.float32, **options) -> NVFP4Linear:
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    return NVFP4Linear.from_float(w, dtype=dtype, registry=registry, verify=verify, **options)


def moe_layer(registry, verify, dtype=torch.float32, **options) -> NVFP4FusedMoE:
    g = torch.Generator().manual_seed(1)
    gate_up, down = torch.randn(E, 2 * I, H, generator=g), torch.randn(E, H, I, generator=g)
    return NVFP4FusedMoE.from_float(gate_up, down, top_k=TOP_K, dtype=dtype, registry=registry, verify=verify,
                                    **options)


BUILDERS = {"linear": linear_layer, "moe": moe_layer}


def layer_output(layer) -> torch.Tensor:
    """The layer on a batch of 9 tokens (the MoE routed by fixed logits)."""
    g = torch.Generator().manual_seed(7)
    if isinstance(layer, NVFP4Linear):
        return layer(torch.randn(9, layer.in_features, generator=g).to(layer.dtype)).float()
    return layer(torch.randn(9, H, generator=g).to(layer.dtype), torch.randn(9, E, generator=g)).float()


def reference_output(kind: str, dtype: torch.dtype) -> torch.Tensor:
    return layer_output(BUILDERS[kind](Registry(entry_points=False), "off", dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("kind", ["linear", "moe"])
@pytest.mark.parametrize("bad", sorted(WRONG))
def test_first_use_catches_a_wrong_backend_and_serves_a_correct_one(bad, kind, dtype):
    layer = BUILDERS[kind](registry_with({bad: WRONG[bad]}), "first_use", dtype)

    assert layer.backends == ("reference",)
    (failed,) = layer.verification
    assert (failed.label, failed.passed, failed.replaced_by, failed.tolerance) == (bad, False, "reference", 1e-2)
    assert failed.error > failed.tolerance
    assert failed.tokens == (17 if bad == "below4" else 1)  # the first probed M where it is wrong
    if bad == "nan":
        assert failed.error == math.inf and "NaN/Inf" in failed.describe()
    else:
        assert failed.error == pytest.approx(0.05 if bad == "scaled" else 0.5, rel=1e-2)
    (rejection,) = layer.plan.first.rejections[bad]
    assert rejection.code == "quarantined"
    assert rejection.message.startswith(
        f"quarantined by the numerics check on first use: {dataclasses.replace(failed, replaced_by=None).describe()};")
    torch.testing.assert_close(layer_output(layer), reference_output(kind, dtype))


@pytest.mark.parametrize("kind", ["linear", "moe"])
@pytest.mark.parametrize("bad", sorted(WRONG))
def test_strict_raises_with_backend_tokens_error_and_tolerance(bad, kind):
    with pytest.raises(NumericsCheckError) as raised:
        BUILDERS[kind](registry_with({bad: WRONG[bad]}), "strict")
    message = str(raised.value)
    m = 17 if bad == "below4" else 1
    error = {"scaled": "5.00e-02", "nan": "NaN/Inf", "below4": "5.00e-01"}[bad]
    assert f"{bad} at M={m}: rel. error {error} (tolerance 1e-02) FAILED" in message
    assert f"exclude=[{bad!r}]" in message


@pytest.mark.parametrize("kind", ["linear", "moe"])
@pytest.mark.parametrize("bad", sorted(WRONG))
def test_off_does_not_check_and_the_wrong_backend_serves(bad, kind):
    layer = BUILDERS[kind](registry_with({bad: WRONG[bad]}), "off")
    assert layer.backends == (bad,) and layer.verification == ()
    got, want = layer_output(layer), reference_output(kind, torch.float32)
    assert not torch.allclose(got, want, equal_nan=False)


@pytest.mark.parametrize("kind", ["linear", "moe"])
def test_a_backend_equal_to_reference_passes_every_probe(kind):
    layer = BUILDERS[kind](registry_with({"exact": EXACT}), "first_use")
    assert layer.backends == ("exact",)
    assert [(c.label, c.tokens, c.passed, c.error, c.replaced_by) for c in layer.verification] == [
        ("exact", m, True, 0.0, None) for m in PROBE_TOKENS]
    assert all(c.seconds >= 0 for c in layer.verification)


def test_the_tolerance_is_the_one_the_backend_declares():
    loose = linear_layer(registry_with({"scaled": WRONG["scaled"]}, tolerance=0.1), "strict")
    assert loose.backends == ("scaled",)
    assert {(c.tolerance, c.passed) for c in loose.verification} == {(0.1, True)}
    assert all(c.error == pytest.approx(0.05, rel=1e-2) for c in loose.verification)


def test_the_next_candidate_is_checked_too():
    """Two wrong backends: the first is quarantined, the second (next by priority) is checked
    and quarantined in turn, and reference serves; both failures are recorded."""
    layer = linear_layer(registry_with({"scaled": WRONG["scaled"], "nan": WRONG["nan"]}), "first_use")
    assert layer.backends == ("reference",)
    assert [(c.label, c.replaced_by) for c in layer.verification] == [("nan", "reference"), ("scaled", "reference")]
    assert {f.code for label in ("nan", "scaled") for f in layer.plan.first.rejections[label]} == {"quarantined"}


def test_a_weight_only_fallback_is_quarantined_for_the_scheme_it_served():
    """A W4A4 layer served weight-only by a wrong backend: the quarantine entry names the scheme
    served (w4a16), so the re-plan rejects it and the layer ends on reference (it would plan the
    same wrong backend forever if the entry named the asked scheme)."""
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(0))
    layer = NVFP4Linear.from_float(w, scheme=W4A4_NVFP4, input_amax=4.0, dtype=torch.float32,
                                   registry=registry_with({"scaled": WRONG["scaled"]}), verify="first_use")
    assert layer.backends == ("reference",) and layer.resolution.fallback == "weight_only"
    assert [f.code for f in layer.plan.first.rejections["scaled"]] == ["quarantined"]


def test_the_run_time_entry_holds_for_later_layers_of_the_same_problem_only():
    registry = registry_with({"scaled": WRONG["scaled"]})
    linear_layer(registry, "first_use")
    again = linear_layer(registry, "off")  # no check: the quarantine alone keeps it off
    assert again.backends == ("reference",)
    other = NVFP4Linear.from_float(torch.randn(16, 64), dtype=torch.float32, registry=registry, verify="off")
    assert other.backends == ("scaled",)  # another shape: not quarantined
    clear_runtime_entries()
    assert linear_layer(registry, "off").backends == ("scaled",)


def test_check_layer_collects_without_policy():
    """The function behind ``quantoracle verify``: every probe, failures included, nothing
    quarantined, nothing raised."""
    g = torch.Generator().manual_seed(0)
    from quantoracle.schemes.tensors import NVFP4Tensor

    weight = NVFP4Tensor.quantize(torch.randn(48, 64, generator=g))
    layer = NVFP4Linear(weight, dtype=torch.float32, registry=registry_with({"below4": WRONG["below4"]}), verify="off")
    checks = check_layer(layer, weight)
    assert [(c.tokens, c.passed) for c in checks] == [(1, True), (17, False), (128, False)]
    assert linear_layer(registry_with({"below4": WRONG["below4"]}), "off").backends == ("below4",)
    assert check_layer(NVFP4Linear(weight, dtype=torch.float32, verify="off"), weight) == ()  # reference only


def test_the_environment_variable_sets_the_policy(monkeypatch):
    registry = registry_with({"scaled": WRONG["scaled"]})
    monkeypatch.setenv(ENV_VERIFY, "strict")
    with pytest.raises(NumericsCheckError):
        linear_layer(registry, None)
    assert linear_layer(registry, "off").backends == ("scaled",)  # the keyword wins
    monkeypatch.setenv(ENV_VERIFY, "off")
    assert linear_layer(registry, None).backends == ("scaled",)
    monkeypatch.delenv(ENV_VERIFY)
    assert linear_layer(registry, None).backends == ("reference",)  # the default: first_use


def test_a_bad_policy_is_an_option_error(monkeypatch):
    with pytest.raises(OptionError, match=r"verify='sometimes': use one of off, first_use, strict"):
        linear_layer(Registry(entry_points=False), "sometimes")
    monkeypatch.setenv(ENV_VERIFY, "always")
    with pytest.raises(OptionError, match=r"\$QUANTORACLE_VERIFY='always'"):
        linear_layer(Registry(entry_points=False), None)


# ---------------------------------------------------------------------------------------------
# quarantine: shipped entry, user files, force, persistence, bad files

LINEAR = Problem(kind="linear", scheme=W4A16_NVFP4, device=Device.parse("cpu"), dtype="float32", n=64, k=64)


def test_the_shipped_entry_rejects_quarantine_selftest_and_nothing_else():
    registry = registry_with({"quarantine_selftest": EXACT, "exact": EXACT})
    res = resolve(LINEAR, registry=registry)
    (failure,) = res.rejections["quarantine_selftest"]
    assert failure.code == "quarantined" and failure.found == "quarantine_selftest"
    (shipped,) = [e for e in load_entries(SHIPPED) if e.backend == "quarantine_selftest"]
    assert f"quarantined by shipped quarantine: {shipped.reason} ({shipped.link})" in failure.message
    assert res.name == "exact" and "exact" not in res.rejections and "reference" in res.survivors
    assert "shipped" in res.quarantine_sources
    allowed = resolve(LINEAR, registry=registry, allow_quarantined=True)
    assert "quarantine_selftest" in allowed.survivors and allowed.quarantine_sources == ()


def test_the_shipped_humming_entry_keeps_humming_out_of_dense_layers_from_two_tokens_on_sm90():
    (entry,) = [e for e in load_entries(SHIPPED) if e.backend == "humming"]
    dense = Problem(kind="linear", scheme=W4A16_NVFP4, device=Device.parse("sm90"), n=4096, k=4096)
    moe = Problem(kind="moe", scheme=W4A16_NVFP4, device=Device.parse("sm90"), n=512, k=2048, experts=256, top_k=8)
    assert not entry.matches("humming", None, dense, 1, None, None)
    assert entry.matches("humming", None, dense, 2, None, None) and entry.matches("humming", None, dense, None, None, None)
    assert not entry.matches("humming", None, moe, 64, None, None)
    assert not entry.matches("humming", None, dense.model_copy(update={"device": Device.parse("sm100")}), 64, None, None)


def test_force_of_a_quarantined_backend_is_an_error_unless_allowed():
    registry = registry_with({"quarantine_selftest": EXACT})
    with pytest.raises(ForcedBackendError, match=r"quarantined") as raised:
        resolve(LINEAR, force="quarantine_selftest", registry=registry)
    assert [f.code for f in raised.value.rejections["quarantine_selftest"]] == ["quarantined"]
    res = resolve(LINEAR, force="quarantine_selftest", allow_quarantined=True, registry=registry)
    assert res.name == "quarantine_selftest" and res.forced


JSON_FILE = {"entries": [{"backend": "exact", "kinds": ["moe"], "reason": "wrong MoE", "link": "https://x/1"}]}
TOML_FILE = '[[entry]]\nbackend = "exact"\nkinds = ["moe"]\nreason = "wrong MoE"\nlink = "https://x/1"\n'
MOE = Problem(kind="moe", scheme=W4A16_NVFP4, device=Device.parse("cpu"), dtype="float32", n=32, k=64,
              experts=8, top_k=2)


@pytest.mark.parametrize("how", ["option", "environment"])
@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_a_user_file_rejects_what_it_matches(tmp_path, monkeypatch, suffix, how):
    path = tmp_path / f"quarantine{suffix}"
    path.write_text(json.dumps(JSON_FILE) if suffix == ".json" else TOML_FILE)
    option = {"quarantine": str(path)} if how == "option" else {}
    if how == "environment":
        monkeypatch.setenv(ENV_QUARANTINE, str(path))
    registry = registry_with({"exact": EXACT})
    moe = resolve(MOE, registry=registry, **option)
    (failure,) = moe.rejections["exact"]
    assert failure.code == "quarantined" and f"quarantined by {path}: wrong MoE (https://x/1)" in failure.message
    assert moe.quarantine_sources == ("shipped", str(path))
    linear = resolve(LINEAR, registry=registry, **option)
    assert linear.name == "exact" and "exact" not in linear.rejections


def test_persisted_run_time_entries_are_read_again(tmp_path):
    path = tmp_path / "mine.json"
    entry = QuarantineEntry(backend="exact", n=64, k=64, reason="found wrong", source="numerics check")
    add_runtime_entry(entry, persist_to=path)
    add_runtime_entry(entry.model_copy(update={"n": 32}), persist_to=path)
    clear_runtime_entries()
    assert [e.n for e in load_entries(path)] == [64, 32]
    assert load_entries(path)[0] == entry.model_copy(update={"source": str(path)})
    registry = registry_with({"exact": EXACT})
    assert resolve(LINEAR, registry=registry).name == "exact"  # the process forgot it
    assert [f.code for f in resolve(LINEAR, registry=registry, quarantine=path).rejections["exact"]] == ["quarantined"]


def test_run_time_entries_are_persisted_as_json_only(tmp_path):
    entry = QuarantineEntry(backend="exact", reason="found wrong")
    with pytest.raises(QuarantineError, match=r"persist_to=.*q.toml.*name a .json file"):
        add_runtime_entry(entry, persist_to=tmp_path / "q.toml")
    assert resolve(LINEAR, registry=registry_with({"exact": EXACT})).name == "exact"  # nothing was added
    assert not (tmp_path / "q.toml").exists()


def test_first_use_can_persist_through_a_quarantine_file(tmp_path):
    """A layer given ``quarantine=`` reads that file; the entry the check adds stays in memory."""
    path = tmp_path / "q.json"
    path.write_text(json.dumps({"entries": []}))
    layer = linear_layer(registry_with({"scaled": WRONG["scaled"]}), "first_use", quarantine=str(path))
    assert layer.backends == ("reference",)
    assert layer.plan.first.quarantine_sources == ("shipped", str(path), "run time")


@pytest.mark.parametrize("text, suffix, where", [
    ("{not json", ".json", "not valid json"),
    ('{"entries": {"backend": "x"}}', ".json", 'expected {"entries": [...]} or a list of entries'),
    ('[{"backend": "x"}]', ".json", "entry 0: field reason: Field required"),
    ('[{"backend": "x", "reason": "r"}, {"backend": "x", "reason": "r", "colour": 1}]', ".json",
     "entry 1: field colour: Extra inputs are not permitted"),
    ('[{"backend": "x", "reason": "r", "capabilities": ["gpu9"]}]', ".json", "entry 0: field capabilities"),
    ('[{"backend": "x", "reason": "r", "versions": "newest"}]', ".json",
     "entry 0: field versions: Value error, versions='newest': write a PEP 440 specifier"),
    ('[{"backend": "x", "reason": "r", "n": "wide"}]', ".json", "entry 0: field n:"),
    ("[[entry]]\nbackend = 1\n", ".toml", "entry 0: field backend"),
    ("[[entry]\n", ".toml", "not valid toml"),
    ('{"entry": [{"backend": "x", "reason": "r"}]}', ".json", "unknown top-level key 'entry'"),
    ('[[entries]]\nbackend = "x"\nreason = "r"\n', ".toml", "unknown top-level key 'entries'; write [[entry]] tables"),
    ('["x"]', ".json", "entry 0: expected an object of fields, not 'x'"),
])
def test_bad_files_name_file_entry_and_field(tmp_path, text, suffix, where):
    path = tmp_path / f"q{suffix}"
    path.write_text(text)
    with pytest.raises(QuarantineError) as raised:
        load_entries(path)
    assert str(raised.value).startswith(f"quarantine file {path}") and where in str(raised.value)
    with pytest.raises(QuarantineError):
        resolve(LINEAR, quarantine=path, registry=Registry(entry_points=False))


def test_a_missing_file_is_a_quarantine_error(tmp_path):
    with pytest.raises(QuarantineError, match="cannot read it"):
        resolve(LINEAR, quarantine=tmp_path / "absent.json", registry=Registry(entry_points=False))


# ---------------------------------------------------------------------------------------------
# quarantine: a property over entries x problems, against a predicate written here


def capability_of(text: str) -> tuple[int, int]:
    digits = text.removeprefix("sm")
    return int(digits[:-1]), int(digits[-1])


def capability_in(text: str, cap: tuple[int, int]) -> bool:
    if text.endswith("+"):
        return cap >= capability_of(text[:-1])
    low, _, high = text.partition("-")
    return capability_of(low) <= cap <= capability_of(high or low)


def glob_matches(pattern: str, name: str) -> bool:
    regex = ".*".join(re.escape(part) for part in pattern.lower().split("*"))
    return re.fullmatch(regex, name.lower()) is not None


VERSION_RANGES = {
    "<0.2": lambda v: v < Version("0.2"),
    ">=0.2,<0.3": lambda v: Version("0.2") <= v < Version("0.3"),
    "==0.1.*": lambda v: v.release[:2] == (0, 1),
    ">=1.0": lambda v: v >= Version("1.0") or v.release >= (1, 0),  # pre-releases count
}


def expected_match(e: QuarantineEntry, backend, variant, p: Problem, tokens, gpu_name, version) -> bool:
    if e.backend != backend or (e.variant is not None and e.variant != variant):
        return False
    cap = p.device.capability
    if e.capabilities and not (cap is not None and any(capability_in(c, cap) for c in e.capabilities)):
        return False
    if e.gpu_name is not None and not (gpu_name is not None and glob_matches(e.gpu_name, gpu_name)):
        return False
    if e.versions is not None and not (version is not None and VERSION_RANGES[e.versions](Version(version))):
        return False
    wanted = [(e.schemes, p.scheme.name), (e.kinds, p.kind), (e.dtypes, p.dtype)]
    if any(values and found not in values for values, found in wanted):
        return False
    if any(want is not None and want != found
           for want, found in [(e.n, p.n), (e.k, p.k), (e.experts, p.experts), (e.top_k, p.top_k)]):
        return False
    if tokens is None:
        return True
    return (e.min_tokens is None or tokens >= e.min_tokens) and (e.max_tokens is None or tokens <= e.max_tokens)


def maybe(values):
    return st.one_of(st.none(), st.sampled_from(values))


def subset(values):
    return st.lists(st.sampled_from(values), unique=True, max_size=2).map(tuple)


DEVICES = ["cpu", "sm80", "sm89", "sm90", "sm100", "sm103", "sm120"]


@st.composite
def entries(draw, backends=("suspect", "other")):
    low = draw(maybe([1, 4, 16, 64]))
    high = draw(maybe([3, 16, 100, 1000]))
    if low is not None and high is not None and high < low:
        low, high = high, low
    return QuarantineEntry(
        backend=draw(st.sampled_from(backends)), variant=draw(maybe(["fused", "dequantize"])),
        capabilities=draw(subset(["sm90", "sm80+", "sm100-sm103", "sm120"])),
        gpu_name=draw(maybe(["*H200*", "nvidia h100*", "*A100*"])),
        versions=draw(maybe(sorted(VERSION_RANGES))),
        schemes=draw(subset(["w4a16_nvfp4", "w4a4_nvfp4"])), kinds=draw(subset(["linear", "moe"])),
        dtypes=draw(subset(["bfloat16", "float16", "float32"])),
        n=draw(maybe([32, 64])), k=draw(maybe([64, 128])), experts=draw(maybe([8, 16])), top_k=draw(maybe([2, 4])),
        min_tokens=low, max_tokens=high, reason="property",
    )


@st.composite
def problems(draw, schemes=(W4A16_NVFP4, W4A4_NVFP4)):
    kind = draw(st.sampled_from(["linear", "moe"]))
    moe = dict(experts=draw(st.sampled_from([8, 16])), top_k=draw(st.sampled_from([2, 4]))) if kind == "moe" else {}
    return Problem(kind=kind, scheme=draw(st.sampled_from(schemes)), device=Device.parse(draw(st.sampled_from(DEVICES))),
                   dtype=draw(st.sampled_from(["bfloat16", "float16", "float32"])),
                   n=draw(st.sampled_from([32, 64])), k=draw(st.sampled_from([64, 128])), **moe)


TOKENS = st.one_of(st.none(), st.sampled_from([1, 2, 3, 4, 5, 15, 16, 17, 63, 64, 65, 100, 101, 1000, 1001]),
                   st.integers(1, 2000))  # the bounds entries use, and either side of them


GPU_NAMES = ["NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"]
VERSIONS = ["0.1.0", "0.1.5", "0.2.1", "1.0", "1.2rc1"]


@st.composite
def near(draw, backend, variant, problem: Problem, tokens, gpu_name, version) -> QuarantineEntry:
    """An entry for this very combination: each predicate left out, built from the combination
    (so it holds), or drawn at random (so it may not): the cases where one predicate decides."""
    random = draw(entries())
    choice = lambda: draw(st.sampled_from(["absent", "same", "random"]))  # noqa: E731
    fields: dict = {"backend": backend, "reason": "property"}
    cap = problem.device.capability
    same = {
        "variant": variant,
        "capabilities": None if cap is None else draw(st.sampled_from(
            [(str(problem.device),), (f"{problem.device}+",), (f"sm80-{problem.device}",), (f"{problem.device}-sm121",)])),
        "gpu_name": None if gpu_name is None else draw(st.sampled_from(
            [f"*{w}*" for w in gpu_name.split()] + [f"*{w.lower()}*" for w in gpu_name.split()] + [gpu_name.upper()])),
        "versions": None if version is None else draw(st.sampled_from(sorted(VERSION_RANGES))),
        "schemes": (problem.scheme.name,), "kinds": (problem.kind,), "dtypes": (problem.dtype,),
        "n": problem.n, "k": problem.k, "experts": problem.experts, "top_k": problem.top_k,
    }
    for field, value in same.items():
        how = choice()
        if how == "same" and value is not None:
            fields[field] = value
        elif how == "random":
            fields[field] = getattr(random, field)
    if tokens is not None and choice() != "absent":
        low, high = draw(st.sampled_from([(tokens, None), (tokens + 1, None), (None, tokens), (None, tokens - 1),
                                          (tokens, tokens), (max(tokens - 1, 1), tokens + 1)]))
        if high is None or high >= 1:
            fields["min_tokens"], fields["max_tokens"] = low, high
    return QuarantineEntry.model_validate(fields)


@settings(max_examples=300)
@given(data=st.data(), backend=st.sampled_from(["suspect", "other"]), variant=maybe(["fused", "dequantize"]),
       problem=problems(), tokens=TOKENS, gpu_name=maybe(GPU_NAMES), version=maybe(VERSIONS))
def test_an_entry_matches_exactly_the_combinations_its_predicates_name(data, backend, variant, problem, tokens,
                                                                      gpu_name, version):
    entry = data.draw(st.one_of(entries(), near(backend, variant, problem, tokens, gpu_name, version)))
    assert entry.matches(backend, variant, problem, tokens, gpu_name, version) == \
        expected_match(entry, backend, variant, problem, tokens, gpu_name, version)


SUSPECT = Registry(entry_points=False)
SUSPECT.register(type("SuspectPlugin", (), {"quantoracle_backends": hookimpl(lambda self: [KernelBackend(
    BackendSpec(name="suspect", layer_kinds={"linear", "moe"}, platforms={"cpu", "cuda", "rocm"},
                schemes=(SchemeSupport(weight=NVFP4_WEIGHT, activation=None),), moe_activations={"silu"},
                priority=50), corrupted(EXACT))])})(), name="suspect_plugin")
_files = itertools.count()


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(chosen=st.lists(entries(backends=("suspect", "reference")), max_size=3), problem=problems(schemes=(W4A16_NVFP4,)),
       tokens=TOKENS, suffix=st.sampled_from([".json", ".toml"]))
def test_resolve_rejects_with_quarantined_exactly_when_an_entry_matches(tmp_path, chosen, problem, tokens, suffix):
    path = tmp_path / f"q{next(_files)}{suffix}"
    fields = [e.model_dump(mode="json", exclude={"source"}, exclude_none=True, exclude_defaults=True) for e in chosen]
    path.write_text(json.dumps(fields) if suffix == ".json" else "".join(toml_table(f) for f in fields))
    res = resolve(problem, tokens=tokens, layouts="fastest", quarantine=path, registry=SUSPECT)
    for backend in ("suspect", "reference"):
        hit = any(expected_match(e, backend, None, problem, tokens, None, None) for e in chosen)
        codes = [f.code for f in res.rejections.get(backend, ())]
        assert codes == (["quarantined"] if hit else [])  # and no other rule: both serve every problem here


def toml_table(fields: dict) -> str:
    return "[[entry]]\n" + "".join(f"{key} = {json.dumps(value)}\n" for key, value in fields.items())


# ---------------------------------------------------------------------------------------------
# the documented examples


def doc_blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), re.S)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_the_documented_quarantine_files_load_and_reject(tmp_path, suffix):
    (text,) = [b for b in doc_blocks(suffix[1:]) if "reason" in b]
    path = tmp_path / f"quarantine{suffix}"
    path.write_text(text)
    loaded = load_entries(path)
    assert loaded and all(e.source == str(path) for e in loaded)
    json_entries = load_entries(_write(tmp_path / "other.json", [b for b in doc_blocks("json") if "reason" in b][0]))
    assert [e.model_dump(exclude={"source"}) for e in loaded] == [e.model_dump(exclude={"source"}) for e in json_entries]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# fingerprint


def test_same_problem_options_and_fingerprint_give_the_same_answer():
    registry = registry_with({"exact": EXACT, "scaled": WRONG["scaled"]})
    answers = []
    for _ in range(2):
        clear_caches()
        res = resolve(MOE, tokens=5, registry=registry, exclude=("scaled",))
        answers.append(res)
    first, second = answers
    assert first is not second and first.fingerprint == second.fingerprint
    assert first.to_dict() == second.to_dict() and first.explain() == second.explain()
    assert first.to_dict()["fingerprint"] == first.fingerprint.model_dump(mode="json")


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A distribution ``trustfake`` 0.3.1 with an entry point in group ``quantoracle``, on sys.path."""
    (tmp_path / "trustfake_plugin.py").write_text(
        "from quantoracle.backends.base import KernelBackend\n"
        "from quantoracle.backends.reference.plugin import SPEC, _kernels\n"
        "from quantoracle.oracle import hookimpl\n"
        "@hookimpl\n"
        "def quantoracle_backends():\n"
        "    return [KernelBackend(SPEC.model_copy(update={'name': 'trustfake', 'priority': 5}), _kernels)]\n")
    info = tmp_path / "trustfake-0.3.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trustfake\nVersion: 0.3.1\n")
    (info / "entry_points.txt").write_text("[quantoracle]\ntrustfake = trustfake_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_the_fingerprint_lists_quantoracle_and_every_plugin_distribution(installed_plugin):
    registry = Registry()
    res = resolve(LINEAR, registry=registry)
    packages = dict(res.fingerprint.packages)
    assert packages["trustfake"] == "0.3.1" and "quantoracle" in packages
    assert {(d, v or "unknown") for d, v in registry.distributions().items()} <= set(res.fingerprint.packages)
    assert res.name == "trustfake" and res.fingerprint.device == "cpu" and res.fingerprint.gpu_name is None
    assert "trustfake 0.3.1" in res.fingerprint.describe()


@pytest.mark.parametrize("versions, hit", [("<0.4", True), (">=0.3.2", False), ("==0.3.1", True)])
def test_a_version_range_matches_the_plugin_distribution(installed_plugin, tmp_path, versions, hit):
    path = tmp_path / "q.json"
    path.write_text(json.dumps([{"backend": "trustfake", "versions": versions, "reason": "bad release"}]))
    res = resolve(LINEAR, registry=Registry(), quarantine=path)
    assert ("trustfake" in res.rejections) == hit and (res.name == "trustfake") != hit


def tuning_cache(path: Path, fp: Fingerprint, faster: str) -> Path:
    measurements = tuple(Measurement(kind="linear", scheme="w4a16_nvfp4", dtype="float32", n=64, k=64, tokens=m,
                                     candidate=c, us=1.0 if c == faster else 9.0)
                         for m in (1, 16) for c in ("exact", "reference"))
    TuningCache(fingerprint=fp, measurements=measurements).save(path)
    return path


def test_a_tuning_cache_of_another_fingerprint_is_not_used_and_the_notes_say_so(tmp_path):
    registry = registry_with({"exact": EXACT})
    here = resolve(LINEAR, tokens=1, registry=registry, tuning="none")
    assert here.name == "exact" and here.ranking == "priority"

    same = tuning_cache(tmp_path / "same.json", here.fingerprint, faster="reference")
    measured = resolve(LINEAR, tokens=1, registry=registry, tuning=same)
    assert (measured.name, measured.ranking) == ("reference", "measured")
    assert not any(str(same) in note for note in measured.notes)

    other_fp = here.fingerprint.model_copy(update={"torch": "0.0.1"})
    other = tuning_cache(tmp_path / "other.json", other_fp, faster="reference")
    res = resolve(LINEAR, tokens=1, registry=registry, tuning=other)
    assert res.name == "exact" and res.ranking == "priority" and res.decided_by is None
    assert f"tuning cache {other} not used: its fingerprint does not match (torch 0.0.1 != {here.fingerprint.torch} here)" \
        in res.notes
    assert res.to_dict()["notes"] == list(res.notes) and "not used" in res.explain()
