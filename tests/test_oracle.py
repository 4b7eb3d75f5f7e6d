"""The rules engine through the public API: the seed case and the contract of resolve."""

import pytest

from quantoracle.errors import PluginError, ProblemError
from quantoracle.oracle import (
    Device,
    ForcedBackendError,
    NoBackendError,
    ParallelConfig,
    Problem,
    Registry,
    UnknownBackendError,
    resolve,
)
from quantoracle.schemes import W4A4_NVFP4, W4A16_NVFP4, W8A8_FP8

from oracle_helpers import FP8Plugin, load_example_plugin, registry_with_extras


def moe(scheme, device="sm90", **kw):
    fields = dict(kind="moe", scheme=scheme, device=Device.parse(device), n=512, k=2048, experts=256, top_k=8)
    return Problem(**{**fields, **kw})


@pytest.fixture
def registry():
    return registry_with_extras()


def test_seed_case_w4a16_nvfp4_moe_on_hopper_runs_weight_only(registry):
    res = resolve(moe(W4A16_NVFP4), registry=registry)
    assert res.name == "triton_nvfp4"
    assert res.fallback is None and res.scheme == W4A16_NVFP4
    assert res.survivors == ("triton_nvfp4/sorted", "triton_nvfp4/unsorted", "reference")
    reasons = res.rejections["example_w4a4"]
    activation = [f for f in reasons if f.code == "activation_scheme"]
    assert activation and "activation key None" in activation[0].message
    assert "NVFP4_ACT_DYNAMIC" in activation[0].message and "W4A4" in activation[0].message
    # every rule is evaluated: the capability failure is reported too, not hidden by the first
    assert {f.code for f in reasons} >= {"activation_scheme", "capability"}


def test_seed_case_w4a4_on_blackwell_picks_the_w4a4_backend_and_w4a16_rejects_it(registry):
    res = resolve(moe(W4A4_NVFP4, "sm100"), registry=registry)
    assert res.name == "example_w4a4" and res.fallback is None
    res16 = resolve(moe(W4A16_NVFP4, "sm100"), registry=registry)
    assert res16.name == "triton_nvfp4"
    assert [f.code for f in res16.rejections["example_w4a4"]] == ["activation_scheme"]


def test_w4a4_on_hopper_follows_the_activation_fallback_policy(registry):
    problem = moe(W4A4_NVFP4)
    weight_only = resolve(problem, registry=registry)
    assert weight_only.fallback == "weight_only" and weight_only.scheme == W4A16_NVFP4
    assert weight_only.effective_problem.scheme == W4A16_NVFP4
    assert "16-bit activations" in weight_only.note
    assert "activation_scheme" in {f.code for f in weight_only.asked_rejections["triton_nvfp4/sorted"]}
    emulated = resolve(problem, registry=registry, activation_fallback="emulate")
    assert emulated.fallback == "emulate" and emulated.scheme == W4A4_NVFP4
    assert emulated.name == "triton_nvfp4"
    with pytest.raises(NoBackendError, match="activation_fallback='weight_only' or 'emulate'"):
        resolve(problem, registry=registry, activation_fallback="error")


def test_cpu_serves_nvfp4_through_the_reference(registry):
    res = resolve(moe(W4A16_NVFP4, "cpu", dtype="float32"), registry=registry)
    assert res.name == "reference"
    assert {f.code for f in res.rejections["triton_nvfp4/sorted"]} == {"platform", "dtype"}
    assert res.rejections["triton_nvfp4/unsorted"] == res.rejections["triton_nvfp4/sorted"]
    # the variants of one backend failing the same rules are shown once, under its name
    assert "  triton_nvfp4  x [platform]" in res.explain()


def test_force_never_falls_back(registry, monkeypatch):
    problem = moe(W4A16_NVFP4)
    assert resolve(problem, registry=registry, force="reference").name == "reference"
    with pytest.raises(ForcedBackendError, match="example_w4a4") as err:
        resolve(problem, registry=registry, force="example_w4a4")
    assert "activation_scheme" in {f.code for f in err.value.rejections["example_w4a4"]}
    monkeypatch.setenv("QUANTORACLE_BACKEND", "reference")
    assert resolve(problem, registry=registry).name == "reference"
    monkeypatch.setenv("QUANTORACLE_BACKEND", "nonexistent")
    with pytest.raises(UnknownBackendError, match="registered: "):
        resolve(problem, registry=registry)


def test_exclude_gives_the_next_survivor_and_unknown_names_are_errors(registry):
    problem = moe(W4A16_NVFP4)
    assert resolve(problem, registry=registry, exclude=["triton_nvfp4"]).name == "reference"
    with pytest.raises(UnknownBackendError, match="trition"):
        resolve(problem, registry=registry, exclude=["trition"])


def test_no_backend_error_lists_every_backend_with_reasons(registry):
    with pytest.raises(NoBackendError) as err:
        resolve(moe(W8A8_FP8, "sm90"), registry=registry)
    assert set(err.value.rejections) == {"triton_nvfp4/sorted", "triton_nvfp4/unsorted", "reference",
                                         "example_w4a4", "declared_fp8", "humming"}
    assert "weight_scheme" in str(err.value) and "layer_kind" in str(err.value)


def test_bad_sharding_is_explained_or_refused():
    with pytest.raises(ProblemError, match="ep_size"):
        moe(W4A16_NVFP4, experts=10, top_k=2, parallel=ParallelConfig(ep_size=4))
    with pytest.raises(ProblemError, match="out of range"):
        ParallelConfig(tp_size=2, tp_rank=2)
    # I=512 over tp=64 leaves 8 columns per shard: not a whole 16-element scale block
    with pytest.raises(NoBackendError, match="block_alignment"):
        resolve(moe(W4A16_NVFP4, parallel=ParallelConfig(tp_size=64)), registry=Registry(entry_points=False))


def test_resolution_is_cached_on_the_frozen_problem(registry):
    problem = moe(W4A16_NVFP4)
    assert resolve(problem, registry=registry) is resolve(moe(W4A16_NVFP4), registry=registry)
    registry.unregister(registry.manager.get_plugin("declared_fp8"))
    assert resolve(problem, registry=registry) is not resolve(moe(W4A16_NVFP4), registry=registry_with_extras())


def test_duplicate_backend_names_leave_the_second_plugin_out_naming_both():
    registry = Registry(entry_points=False)
    registry.register(FP8Plugin(), name="first_fp8")
    registry.register(FP8Plugin(), name="second_fp8")
    assert "declared_fp8" in registry.backends
    (error,) = registry.broken
    assert isinstance(error, PluginError) and error.plugin == "second_fp8"
    assert "'first_fp8' and 'second_fp8'" in str(error)
    strict = Registry(entry_points=False, strict=True)
    strict.register(FP8Plugin(), name="first_fp8")
    with pytest.raises(PluginError, match="first_fp8.*second_fp8"):
        strict.register(FP8Plugin(), name="second_fp8")
        strict.backends


def test_explain_and_json(registry):
    res = resolve(moe(W4A4_NVFP4), registry=registry)
    text = res.explain()
    assert "chosen  : triton_nvfp4" in text and "fallback: weight_only" in text
    data = res.to_dict()
    assert data["backend"] == "triton_nvfp4" and data["scheme"] == "w4a16_nvfp4"
    assert data["asked_rejections"]["reference"][0]["code"] == "activation_scheme"


def test_device_parsing():
    assert Device.parse("sm90").capability == (9, 0)
    assert Device.parse("sm_100a").capability == (10, 0)
    assert str(Device.parse("SM120")) == "sm120"
    assert Device.parse("cpu").capability is None
    with pytest.raises(ValueError, match="sm90"):
        Device.parse("hopper")
    assert Device.current().platform in ("cpu", "cuda", "rocm")


def test_example_plugin_is_a_complete_backend():
    module = load_example_plugin()
    (backend,) = module.quantoracle_backends()
    assert backend.spec.name == "example_w4a4"


def test_bad_arguments_are_typed_errors_not_tracebacks_from_inside(registry, monkeypatch):
    from quantoracle.errors import DeviceError, OptionError, SchemeError
    from quantoracle.schemes.scheme import Scheme

    for text in ("sm00", "sm0", None, 90):
        with pytest.raises(DeviceError, match="sm90"):
            Device.parse(text)
    with pytest.raises(SchemeError, match="not a string"):
        Scheme.from_name(None)
    problem = moe(W4A16_NVFP4)
    assert resolve(problem, registry=registry, exclude=None).name == "triton_nvfp4"
    as_dict = resolve(problem.model_dump(), registry=registry)
    assert as_dict.problem == problem
    with pytest.raises(ProblemError, match="must be a Problem"):
        resolve("moe", registry=registry)
    with pytest.raises(ProblemError, match="problem field top_k"):
        resolve({**problem.model_dump(), "top_k": "eight"}, registry=registry)
    with pytest.raises(OptionError, match="also excluded"):
        resolve(problem, registry=registry, force="reference", exclude=("reference",))
    with pytest.raises(OptionError, match="tokens=0"):
        resolve(problem, registry=registry, tokens=0)
    monkeypatch.setenv("QUANTORACLE_BACKEND", "reference")
    forced = resolve(problem, registry=registry)
    assert forced.forced_by == "$QUANTORACLE_BACKEND" and "forced by $QUANTORACLE_BACKEND" in forced.explain()


def test_capability_sets_and_per_dtype_capabilities_are_rules():
    from quantoracle.backends.base import KernelBackend
    from quantoracle.oracle import BackendSpec, SchemeSupport, hookimpl
    from quantoracle.oracle.spec import describe_capabilities
    from quantoracle.schemes.keys import NVFP4_WEIGHT

    spec = BackendSpec(name="families", layer_kinds={"linear"}, schemes=(SchemeSupport(weight=NVFP4_WEIGHT),),
                       platforms={"cuda"}, capabilities=("sm100-sm101", "sm120"),
                       dtype_capabilities={"bfloat16": ("sm120",)})
    assert describe_capabilities(spec.capabilities) == "sm100 to sm101, sm120"
    assert str(BackendSpec(name="a", layer_kinds={"linear"}, schemes=(), platforms={"cuda"},
                           min_capability=(8, 0)).capabilities[0]) == "sm80 or newer"

    class Plugin:
        @hookimpl
        def quantoracle_backends(self):
            return [KernelBackend(spec, lambda: None)]

    registry = Registry(builtins=False, entry_points=False)
    registry.register(Plugin(), name="families")

    def codes(device, dtype="float16"):
        problem = Problem(kind="linear", scheme=W4A16_NVFP4, device=Device.parse(device), dtype=dtype, n=64, k=64)
        try:
            resolve(problem, registry=registry)
            return set()
        except NoBackendError as err:
            return {f.code for f in err.rejections["families"]}

    assert codes("sm100") == codes("sm101") == codes("sm120") == set()
    assert codes("sm103") == codes("sm110") == codes("sm90") == {"capability"}
    assert codes("sm100", "bfloat16") == {"dtype"} and codes("sm120", "bfloat16") == set()


def test_the_fallback_note_names_the_rule_that_stopped_the_native_path(registry):
    res = resolve(moe(W4A4_NVFP4), registry=registry)
    assert "example_w4a4 is rejected by [capability]" in res.note
    text = res.explain()
    # as asked first: the native backend's real reason comes before the weight-only table
    assert text.index("as asked") < text.index("served as w4a16_nvfp4") < text.index("ranked")
    assert "capability" in text.split("served as")[0]
