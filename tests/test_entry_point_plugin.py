"""A real out-of-tree plugin, installed with pip, is found through the ``quantoracle`` entry-point
group: nothing in quantoracle names it."""

import json
import os
import shutil
import subprocess
import sys

from oracle_helpers import EXAMPLE

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
