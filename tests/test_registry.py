"""The registry isolates each plugin: a broken one is recorded in ``Registry.broken`` as a
PluginError naming where it comes from and why, logged once, and left out; the others keep
working. ``strict`` (or QUANTORACLE_STRICT_PLUGINS=1) raises instead.

In-process plugins are registered through ``Registry.register``; entry-point failures come from
one real distribution, pip-installed once, whose entry points are broken variants of the example
plugin in docs/examples."""

import json
import logging
import shutil
import subprocess
import sys
import textwrap

import pytest
from oracle_helpers import EXAMPLE, FP8Plugin, _no_kernels

import quantoracle.oracle.registry as registry_module
from quantoracle.cli import main
from quantoracle.backends.base import KernelBackend
from quantoracle.errors import OptionError, PluginError
from quantoracle.oracle import (
    BackendSpec, Device, Problem, Registry, SchemeSupport, UnknownBackendError, hookimpl, resolve,
)
from quantoracle.schemes import W4A4_NVFP4, W4A16_NVFP4
from quantoracle.schemes.keys import NVFP4_WEIGHT

BROKEN_DISTRIBUTION = "quantoracle-broken-example"
PLUGIN = "quantoracle_example_w4a4/plugin.py"
HOOK_RETURN = "    return [KernelBackend(SPEC, _kernels)]\n"

# entry-point name -> (how the example plugin's source is broken, what the PluginError's cause says)
BROKEN_VARIANTS = {
    "import_fails": (lambda s: "import quantoracle_not_installed_dependency\n" + s,
                     "importing it raised ModuleNotFoundError: No module named 'quantoracle_not_installed_dependency'"),
    "spec_invalid": (lambda s: s.replace('layer_kinds={"linear", "moe"}', 'layer_kinds={"linear", "conv"}'),
                     "importing it raised ValidationError"),
    "hook_raises": (lambda s: s.replace(HOOK_RETURN, '    raise RuntimeError("no licence server")\n'),
                    "hook raised RuntimeError: no licence server"),
    "returns_none": (lambda s: s.replace(HOOK_RETURN, "    return None\n"),
                     "hook returned None, not a list of backends"),
    "wrong_signature": (lambda s: s.replace("def quantoracle_backends():", "def quantoracle_backends(config):"),
                        "pluggy refused to register it"),
    # the same backend name as the intact copy, whose entry point sorts first
    "second_example": (lambda s: s, "backend name 'example_w4a4' is declared by both 'example_w4a4' and 'second_example'"),
}

SM100_MOE = Problem(kind="moe", scheme=W4A4_NVFP4, device=Device.parse("sm100"), n=512, k=2048, experts=64, top_k=4)


def _backend(name: str) -> KernelBackend:
    spec = BackendSpec(name=name, layer_kinds={"linear"}, platforms={"cuda"},
                       schemes=(SchemeSupport(weight=NVFP4_WEIGHT, activation=None),))
    return KernelBackend(spec, _no_kernels)


class Returns:
    """A plugin whose hook returns ``value``."""

    def __init__(self, value):
        self.value = value

    @hookimpl
    def quantoracle_backends(self):
        return self.value


class Raises:
    @hookimpl
    def quantoracle_backends(self):
        raise RuntimeError("no licence server")


class WrongSignature:
    @hookimpl
    def quantoracle_backends(self, config):
        return []


class MisspelledHook:
    @hookimpl
    def quantoracle_backend(self):
        return []


class Unmarked:
    def quantoracle_backends(self):
        return []


def builtins_plus(plugin, name="extra", **kwargs) -> Registry:
    registry = Registry(entry_points=False, **kwargs)
    registry.register(plugin, name=name)
    return registry


def only_broken(registry: Registry) -> PluginError:
    (error,) = registry.broken
    assert isinstance(error, PluginError) and error.plugin == "extra"
    assert error.entry_point is None and error.distribution is None
    return error


def still_works(registry: Registry) -> None:
    assert {"reference", "triton_nvfp4"} <= registry.backends.keys()
    assert resolve(Problem(kind="linear", scheme=W4A16_NVFP4, device=Device.parse("cpu"), n=64, k=64),
                   registry=registry).name == "reference"


@pytest.mark.parametrize(
    ("plugin", "cause"),
    [
        (Raises(), "hook raised RuntimeError: no licence server"),
        (Returns(None), "returned None, not a list of backends"),
        (Returns(_backend("lonely")), "returned <backend lonely>, not a list of backends"),
        (Returns("declared_fp8"), "returned 'declared_fp8', not a list of backends"),
        (Returns([_backend("fine"), object()]), "returned <object object at"),
        (WrongSignature(), "Argument(s) {'config'} are declared in the hookimpl but can not be found"),
        (MisspelledHook(), "it marks quantoracle_backend with @hookimpl, which is not a quantoracle hook"),
        (Unmarked(), "it has no @hookimpl-marked function"),
    ],
    ids=["raises", "none", "not-a-sequence", "string", "not-a-backend", "wrong-signature", "misspelled", "unmarked"],
)
def test_a_broken_plugin_is_recorded_and_the_others_keep_working(plugin, cause, caplog):
    registry = builtins_plus(plugin)
    still_works(registry)
    error = only_broken(registry)
    assert cause in error.cause and cause in str(error) and "Fix the plugin object" in str(error)
    assert "fine" not in registry.backends  # a broken plugin contributes nothing, not part of its list
    assert [r.message for r in caplog.records if r.levelno == logging.WARNING] == [
        f"{error}; it is left out and the other backends keep working (QUANTORACLE_STRICT_PLUGINS=1 makes this an error)"
    ]


def test_a_broken_plugin_is_logged_once_however_often_the_backends_are_recomputed(caplog):
    registry = builtins_plus(Raises())
    registry.register(FP8Plugin(), name="declared_fp8")
    registry.backends
    registry.unregister(registry.manager.get_plugin("declared_fp8"))
    assert "declared_fp8" not in registry.backends and len(registry.broken) == 1
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_the_hook_exception_is_the_cause():
    error = only_broken(builtins_plus(Raises()))
    assert isinstance(error.__cause__, RuntimeError)


def test_a_duplicate_backend_name_breaks_the_later_plugin_with_both_names():
    registry = Registry(entry_points=False)
    registry.register(FP8Plugin(), name="first_fp8")
    registry.register(FP8Plugin(), name="second_fp8")
    (error,) = registry.broken
    assert error.plugin == "second_fp8"
    assert error.cause == ("backend name 'declared_fp8' is declared by both 'first_fp8' and 'second_fp8': "
                           "rename one, or uninstall one of the plugins")
    assert registry.origin("declared_fp8").plugin == "first_fp8"


def test_a_backend_named_twice_by_one_plugin_breaks_it():
    error = only_broken(builtins_plus(Returns([_backend("twin"), _backend("twin")])))
    assert "'twin' is declared by both 'extra' and 'extra'" in error.cause


def test_a_builtin_that_fails_to_import_is_isolated_and_says_to_reinstall(monkeypatch):
    missing = "quantoracle.backends.not_there.plugin"
    monkeypatch.setattr(registry_module, "BUILTIN_PLUGINS", (*registry_module.BUILTIN_PLUGINS, missing))
    registry = Registry(entry_points=False)
    still_works(registry)
    (error,) = registry.broken
    assert (error.plugin, error.entry_point, error.distribution) == (missing, None, "quantoracle")
    assert "No module named 'quantoracle.backends.not_there'" in error.cause
    assert "built-in" in str(error) and "Reinstall quantoracle" in str(error)


def test_strict_raises_the_first_plugin_error(monkeypatch):
    with pytest.raises(PluginError, match="pluggy refused"):
        builtins_plus(WrongSignature(), strict=True)
    with pytest.raises(PluginError, match="hook raised RuntimeError") as raised:
        builtins_plus(Raises(), strict=True).backends
    assert isinstance(raised.value.__cause__, RuntimeError)
    monkeypatch.setenv("QUANTORACLE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="returned None"):
        builtins_plus(Returns(None)).backends
    assert builtins_plus(Returns(None), strict=False).broken


def test_the_strict_variable_accepts_only_0_and_1(monkeypatch):
    monkeypatch.setenv("QUANTORACLE_STRICT_PLUGINS", "yes")
    with pytest.raises(OptionError, match="QUANTORACLE_STRICT_PLUGINS='yes': use 1 .* or 0"):
        Registry(entry_points=False)


def test_a_broken_plugin_frees_its_name_for_a_fixed_one():
    registry = builtins_plus(WrongSignature())
    registry.register(FP8Plugin(), name="extra")
    assert registry.origin("declared_fp8").plugin == "extra"


def test_origin_and_distributions_of_builtins():
    registry = Registry(entry_points=False)
    registry.register(FP8Plugin(), name="declared_fp8")
    origin = registry.origin("triton_nvfp4")
    assert (origin.plugin, origin.entry_point, origin.distribution) == (
        "quantoracle.backends.triton_nvfp4.plugin", None, "quantoracle")
    assert origin.version == registry.distributions()["quantoracle"]
    assert registry.origin("declared_fp8").distribution is None
    assert list(registry.distributions()) == ["quantoracle"]
    with pytest.raises(UnknownBackendError, match="unknown backend 'nope'; registered: reference, triton_nvfp4, .*declared_fp8"):
        registry.origin("nope")


# ---- entry points: one installed distribution with the intact example and its broken variants


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory):
    """A pip-installed distribution whose entry points are the example plugin and, each in its own
    module, the variants in BROKEN_VARIANTS."""
    root = tmp_path_factory.mktemp("broken")
    source, site = root / "source", root / "site"
    shutil.copytree(EXAMPLE, source)
    example = (source / PLUGIN).read_text()
    lines = ['example_w4a4 = "quantoracle_example_w4a4.plugin"']
    for name, (breaks, _) in BROKEN_VARIANTS.items():
        broken = breaks(example)
        assert broken != example or name == "second_example", f"{name}: the example changed, update the variant"
        (source / PLUGIN).with_name(f"{name}.py").write_text(broken)
        lines.append(f'{name} = "quantoracle_example_w4a4.{name}"')
    (source / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=68"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{BROKEN_DISTRIBUTION}"
        version = "6.6.6"

        [project.entry-points.quantoracle]
        """) + "\n".join(lines) + '\n\n[tool.setuptools]\npackages = ["quantoracle_example_w4a4"]\n')
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(source)],
        check=True, capture_output=True, cwd=root,
    )
    return site


@pytest.fixture
def installed(broken_site, monkeypatch):
    monkeypatch.syspath_prepend(str(broken_site))
    yield
    for module in [m for m in sys.modules if m.startswith("quantoracle_example_w4a4")]:
        del sys.modules[module]


def test_broken_entry_points_are_named_with_their_distribution_and_cause(installed):
    registry = Registry()
    errors = {error.plugin: error for error in registry.broken}
    assert errors.keys() == BROKEN_VARIANTS.keys()
    for name, (_, cause) in BROKEN_VARIANTS.items():
        error = errors[name]
        assert cause in error.cause, name
        assert (error.entry_point.group, error.entry_point.name, error.entry_point.value) == (
            "quantoracle", name, f"quantoracle_example_w4a4.{name}")
        assert (error.distribution, error.version) == (BROKEN_DISTRIBUTION, "6.6.6")
        assert f"entry point quantoracle:{name} = quantoracle_example_w4a4.{name}" in str(error)
        assert f"`pip uninstall {BROKEN_DISTRIBUTION}`" in str(error)
    assert "layer_kinds" in errors["spec_invalid"].cause  # the pydantic message names the field


def test_resolve_works_beside_broken_entry_points(installed):
    registry = Registry()
    assert resolve(SM100_MOE, registry=registry).name == "example_w4a4"
    origin = registry.origin("example_w4a4")
    assert (origin.plugin, origin.entry_point.value, origin.distribution, origin.version) == (
        "example_w4a4", "quantoracle_example_w4a4.plugin", BROKEN_DISTRIBUTION, "6.6.6")
    assert registry.distributions() == {"quantoracle": registry.origin("reference").version,
                                        BROKEN_DISTRIBUTION: "6.6.6"}


def test_strict_raises_for_the_first_broken_entry_point(installed):
    with pytest.raises(PluginError, match="'import_fails'.*ModuleNotFoundError"):
        Registry(strict=True)


def test_the_cli_lists_broken_plugins_beside_the_working_ones(installed, monkeypatch, capsys):
    monkeypatch.setattr(registry_module, "_default", None)  # the CLI's registry, made with the site installed
    assert main(["backends", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {b["name"] for b in report["backends"]} >= {"reference", "example_w4a4"}
    assert {b["plugin"]: b["distribution"] for b in report["broken"]} == dict.fromkeys(BROKEN_VARIANTS, BROKEN_DISTRIBUTION)
