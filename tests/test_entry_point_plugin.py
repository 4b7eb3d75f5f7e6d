"""A real out-of-tree plugin, installed with pip, is found through the ``quantoracle`` entry-point
group: nothing in quantoracle names it. docs/writing-a-backend.md shows that plugin as it is and
documents every rule the engine has, with messages the rules really produce."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from oracle_helpers import EXAMPLE

from quantoracle.oracle import BackendSpec, Device, ParallelConfig, Problem, SchemeSupport
from quantoracle.oracle.quarantine import QuarantineEntry
from quantoracle.oracle.rules import RULES, Context, evaluate
from quantoracle.schemes import W4A4_NVFP4, W4A16_NVFP4, W8A16_FP8
from quantoracle.schemes.keys import NVFP4_ACT_DYNAMIC, NVFP4_WEIGHT

GUIDE = pathlib.Path(__file__).parents[1] / "docs/writing-a-backend.md"

PROBE = """
import json
from quantoracle.oracle import Device, Problem, Registry, resolve
from quantoracle.schemes import W4A4_NVFP4
registry = Registry()
problem = Problem(kind="moe", scheme=W4A4_NVFP4, device=Device.parse("sm100"), n=512, k=2048,
                  experts=64, top_k=4)
print(json.dumps({"backends": sorted(registry.backends), "chosen": resolve(problem, registry=registry).name}))
"""


def test_pip_installed_plugin_is_discovered_and_chosen(tmp_path):
    target, source = tmp_path / "site", tmp_path / "example"
    shutil.copytree(EXAMPLE, source)  # pip builds in the source tree: keep the repository clean
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, cwd=tmp_path,
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *sys.path])}
    result = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True, env=env)
    found = json.loads(result.stdout)
    assert "example_w4a4" in found["backends"] and "reference" in found["backends"]
    assert found["chosen"] == "example_w4a4"


def test_without_the_plugin_the_same_problem_falls_back():
    result = subprocess.run([sys.executable, "-c", PROBE], check=True, capture_output=True, text=True)
    found = json.loads(result.stdout)
    assert "example_w4a4" not in found["backends"] and found["chosen"] == "triton_nvfp4"


def test_the_guide_shows_the_example_plugin_as_it_is():
    source = (EXAMPLE / "quantoracle_example_w4a4/plugin.py").read_text()
    code = source.split('"""', 2)[2].strip()  # the module without its docstring
    assert code in GUIDE.read_text()


def _rule_table() -> dict[str, str]:
    """code -> example message, from the guide's rule reference table."""
    rows = re.findall(r"^\| `(\w+)` \|.*\| (.+?) \|$", GUIDE.read_text().split("## 5. Rule reference")[1], re.M)
    return dict(rows)


def test_the_rule_reference_lists_every_rule():
    assert sorted(_rule_table()) == sorted(rule.__name__ for rule in RULES)


# The backend and problems the guide's rule table says its messages come from.
_DOCUMENTED = dict(name="my_backend", layer_kinds={"linear", "moe"}, platforms={"cuda"},
                   schemes=(SchemeSupport(weight=NVFP4_WEIGHT, activation=NVFP4_ACT_DYNAMIC),))
_SPEC = BackendSpec(**_DOCUMENTED, capabilities=("sm100-sm103", "sm120"), dtypes={"bfloat16"},
                    n_multiple_of=64, k_multiple_of=128, max_top_k=8, tensor_parallel=False,
                    expert_parallel=False, requires=("my_kernels",), max_tokens=64, layout="my_layout")
_QUARANTINE = QuarantineEntry(backend="my_backend", capabilities=("sm100",), versions="<0.3",
                              reason="wrong results for top_k=8 at M>=32", link="https://example.org/issue/1",
                              source="my-quarantine.json")


def _moe(**changes) -> Problem:
    fields = dict(kind="moe", scheme=W4A4_NVFP4, device=Device.parse("sm100"), n=768, k=2048, experts=128, top_k=8)
    return Problem(**{**fields, **changes})


RULE_EXAMPLES = {
    "layer_kind": (BackendSpec(**{**_DOCUMENTED, "layer_kinds": {"linear"}}), _moe(), Context()),
    "weight_scheme": (_SPEC, _moe(scheme=W8A16_FP8), Context()),
    "activation_scheme": (_SPEC, _moe(scheme=W4A16_NVFP4), Context()),
    "platform": (_SPEC, _moe(device=Device.parse("cpu")), Context()),
    "capability": (_SPEC, _moe(device=Device.parse("sm90")), Context()),
    "dtype": (_SPEC, _moe(dtype="float16"), Context()),
    "moe_activation": (_SPEC, _moe(moe_activation="gelu"), Context()),
    "block_alignment": (_SPEC, _moe(n=512, parallel=ParallelConfig(tp_size=64)), Context()),
    "shape": (_SPEC, _moe(n=1440, k=2880, experts=32, top_k=4), Context()),
    "top_k": (_SPEC, _moe(experts=256, top_k=10), Context()),
    "tensor_parallel": (_SPEC, _moe(parallel=ParallelConfig(tp_size=2)), Context()),
    "expert_parallel": (_SPEC, _moe(parallel=ParallelConfig(ep_size=8)), Context()),
    "requires": (_SPEC, _moe(), Context()),
    "tokens": (_SPEC, _moe(), Context(tokens=256)),
    "tokens without M": (_SPEC, _moe(), Context()),
    "layout": (_SPEC, _moe(), Context(layouts=frozenset({"triton_nvfp4"}))),
    "quarantined": (_SPEC, _moe(), Context(quarantine=(_QUARANTINE,), version="0.2.1")),
}


@pytest.mark.parametrize("code", sorted(RULE_EXAMPLES))
def test_each_documented_message_is_what_the_rule_says(code):
    spec, problem, context = RULE_EXAMPLES[code]
    rule = code.split()[0]
    messages = {failure.code: failure.message for failure in evaluate(spec, problem, context)}
    assert messages[rule] in _rule_table()[rule]
