"""The environment an answer was made in: device and software, as one hashable record.

Every :class:`~quantoracle.oracle.engine.Resolution` and :class:`~quantoracle.oracle.plan.Plan`
carries one; a tuning cache is keyed by one; ``quantoracle env`` prints it. Same problem, same
options and same fingerprint: same answer.
"""

from __future__ import annotations

import hashlib
import platform
import sys
from functools import lru_cache
from importlib import metadata

from pydantic import BaseModel, ConfigDict

from quantoracle.oracle.spec import Device

SOFTWARE = ("torch", "triton")  # fields of their own; packages holds plugins and kernel libraries


class Fingerprint(BaseModel):
    """Device and software.

    - ``device``: the device resolved for (``"sm90"``, ``"cpu"``); ``gpu_name``, ``sm_count``,
      ``memory_bytes``, ``driver`` and ``cuda`` only when that device is this machine's GPU
      (``None`` for a device given by name, e.g. ``--device sm90`` on a laptop).
    - ``python``, ``torch``, ``triton``: versions installed here (``None``: not installed).
    - ``packages``: every distribution answers depend on, name -> version, sorted: quantoracle,
      each distribution providing a registered backend plugin, and each installed kernel library
      a backend ``requires`` other than torch and triton (the engine's ``provenance`` lists them).
    """

    model_config = ConfigDict(frozen=True)

    device: str
    gpu_name: str | None = None
    sm_count: int | None = None
    memory_bytes: int | None = None
    driver: str | None = None
    cuda: str | None = None
    python: str
    torch: str | None = None
    triton: str | None = None
    packages: tuple[tuple[str, str], ...] = ()

    @property
    def digest(self) -> str:
        """A short stable hash of every field (for logs and cache file names)."""
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]

    def package_version(self, distribution: str) -> str | None:
        return dict(self.packages).get(distribution)

    def describe(self) -> str:
        gpu = f" ({self.gpu_name}, {self.sm_count} SMs, {self.memory_bytes / 2**30:.0f} GiB, driver {self.driver}, CUDA {self.cuda})" \
            if self.gpu_name else ""
        packages = ", ".join(f"{name} {version}" for name, version in self.packages)
        return (f"{self.device}{gpu}; python {self.python}, torch {self.torch or '-'}, triton {self.triton or '-'}; "
                f"{packages} [{self.digest}]")


def version_of(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def fingerprint(device: Device, packages: tuple[tuple[str, str], ...]) -> Fingerprint:
    """The fingerprint for answers about ``device`` made here, with plugin ``packages``."""
    return _fingerprint(device, packages)


@lru_cache(maxsize=64)
def _fingerprint(device: Device, packages: tuple[tuple[str, str], ...]) -> Fingerprint:
    fields = dict(
        device=str(device), python=platform.python_version(),
        torch=version_of("torch"), triton=version_of("triton"), packages=packages,
    )
    fields.update(_gpu(device))
    return Fingerprint(**fields)


def _gpu(device: Device) -> dict:
    """This machine's GPU, if it is the device asked about (never imports torch otherwise)."""
    if device.platform != "cuda" or "torch" not in sys.modules and version_of("torch") is None:
        return {}
    import torch

    if not torch.cuda.is_available():
        return {}
    for index in range(torch.cuda.device_count()):
        if torch.cuda.get_device_capability(index) == device.capability:
            props = torch.cuda.get_device_properties(index)
            try:
                driver = torch._C._cuda_getDriverVersion()
                driver = f"{driver // 1000}.{driver % 1000 // 10}"
            except (AttributeError, RuntimeError):
                driver = None
            return dict(gpu_name=props.name, sm_count=props.multi_processor_count,
                        memory_bytes=props.total_memory, driver=driver, cuda=torch.version.cuda)
    return {}
