"""What the container runs on, checked once at setup: Cog's server version and the NVIDIA driver.

Cog installs its server (coglet) through cog's own range, newest at build time, unless the build
pins it (`COGLET_WHEEL=pypi:0.23.1 cog build`): a server no test here has run is said at error level.
torch's CUDA build needs a driver at least as new as NVIDIA's floor for that CUDA major version
(minor-version compatibility); with an older one torch sees no GPU, so setup fails and says why.
"""

from __future__ import annotations

import logging
import re
from importlib import metadata
from pathlib import Path

log = logging.getLogger(__name__)

# The server every test here runs against (requirements-dev.txt, cog.yaml's sdk_version).
TESTED_COGLET = "0.23.1"
# The oldest driver each CUDA major version runs on (NVIDIA's CUDA compatibility guide: 12.x through
# minor-version compatibility from 525.60.13; 13.0 from 580.65.06).
MIN_DRIVER = {12: (525, 60, 13), 13: (580, 65, 6)}
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")


class DriverTooOld(RuntimeError):
    """The host's NVIDIA driver is older than this image's CUDA needs; the message says which."""


def check_server(version: str | None = None) -> None:
    """Log an error when Cog's server is not the version the tests ran (no-op outside Cog's server)."""
    if version is None:
        try:
            version = metadata.version("coglet")
        except metadata.PackageNotFoundError:
            return
    if version != TESTED_COGLET:
        log.error(
            "Cog's server is coglet %s, but this model is tested with coglet %s: rebuild the image with "
            "COGLET_WHEEL=pypi:%s cog build",
            version, TESTED_COGLET, TESTED_COGLET,
        )


def driver_version(path: Path = DRIVER_VERSION_FILE) -> tuple[int, ...] | None:
    """The loaded NVIDIA kernel driver's version, from its /proc file; None without one."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return None
    found = re.search(r"Kernel Module(?: for [\w-]+)?\s+(\d+(?:\.\d+)+)", text)
    return tuple(int(part) for part in found.group(1).split(".")) if found else None


def check_driver(cuda: str | None, driver: tuple[int, ...] | None) -> None:
    """Raise DriverTooOld when `driver` is older than torch's CUDA build (`cuda`, e.g. "12.8") needs."""
    if not cuda or driver is None:
        return  # a CPU build of torch, or no NVIDIA driver: nothing to check
    needed = MIN_DRIVER.get(int(cuda.split(".")[0]))
    if needed and driver < needed:
        raise DriverTooOld(
            f"the NVIDIA driver is {_dotted(driver)}, but this image's CUDA {cuda} needs driver "
            f"{_dotted(needed)} or newer: upgrade the host's driver, or set INPAINT_DEVICE=cpu to run on the CPU"
        )


def _dotted(version: tuple[int, ...]) -> str:
    return ".".join(f"{part:02d}" if index == 2 else str(part) for index, part in enumerate(version))


def check_gpu(device: str = "") -> None:
    """Fail setup when the GPU cannot be used as configured: a driver too old for torch's CUDA, or
    INPAINT_DEVICE=cuda with no GPU visible. `device` is the INPAINT_DEVICE setting."""
    import torch

    if device == "cpu":
        return
    check_driver(torch.version.cuda, driver_version())
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(
            f"INPAINT_DEVICE={device}, but torch sees no GPU: start the container with the GPU "
            "(docker run --gpus all), or leave INPAINT_DEVICE unset to use the CPU when there is none"
        )
