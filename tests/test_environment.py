"""Setup's checks of what the container runs on: Cog's server version and the NVIDIA driver."""

import logging
from pathlib import Path

import pytest
import yaml

from inpaint import environment
from inpaint.environment import DriverTooOld, check_driver, check_server, driver_version

ROOT = Path(__file__).resolve().parent.parent

# /proc/driver/nvidia/version as the NVIDIA kernel module writes it (a 535 and a 580 host).
PROC_535 = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    "GCC version:  gcc version 11.4.0 (Ubuntu 11.4.0-1ubuntu1~22.04)\n"
)
PROC_580_OPEN = (
    "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.159.04  Release Build  (dvs-builder@U22)  Thu Oct  9 2025\n"
    "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n"
)


def test_driver_version_is_read_from_the_kernel_modules_proc_file(tmp_path):
    (tmp_path / "a").write_text(PROC_535)
    (tmp_path / "b").write_text(PROC_580_OPEN)
    assert driver_version(tmp_path / "a") == (535, 104, 5)
    assert driver_version(tmp_path / "b") == (580, 159, 4)
    assert driver_version(tmp_path / "absent") is None
    (tmp_path / "c").write_bytes(PROC_535.replace("Ubuntu", "Ubunt\xfc").encode("latin-1"))  # not UTF-8
    assert driver_version(tmp_path / "c") == (535, 104, 5)
    (tmp_path / "d").write_text("GCC version:  gcc version 11.4.0\n")  # no module line
    assert driver_version(tmp_path / "d") is None


def test_a_driver_too_old_for_the_images_cuda_fails_with_what_to_do():
    with pytest.raises(DriverTooOld, match=r"driver is 535\.104\.05.*CUDA 13\.0 needs driver 580\.65\.06 or newer: upgrade"):
        check_driver("13.0", (535, 104, 5))
    with pytest.raises(DriverTooOld, match="INPAINT_DEVICE=cpu"):
        check_driver("12.8", (520, 61, 5))
    check_driver("12.8", (535, 104, 5))  # CUDA 12.x runs on 525.60.13 and newer
    check_driver("12.8", (525, 60, 13))
    check_driver("13.0", (580, 159, 4))
    check_driver(None, (470, 1, 1))  # a CPU build of torch
    check_driver("12.8", None)  # no driver: the CPU


def test_the_image_builds_cuda_12_8_so_drivers_from_525_work():
    """cog.yaml pins build.cuda: torch 2.11 would otherwise get CUDA 13.0, which needs driver 580."""
    build = yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]
    assert build["cuda"] == "12.8"
    assert environment.MIN_DRIVER[12] == (525, 60, 13)
    assert "525.60.13" in (ROOT / "README.md").read_text()


def test_a_server_other_than_the_tested_one_is_an_error_in_the_setup_log(caplog):
    with caplog.at_level(logging.INFO, logger="inpaint"):
        check_server("0.23.1")
        assert not caplog.records
        check_server("0.24.0")
    [record] = caplog.records
    assert record.levelno == logging.ERROR
    assert record.getMessage() == ("Cog's server is coglet 0.24.0, but this model is tested with coglet 0.23.1: rebuild "
                                   "the image with COGLET_WHEEL=pypi:0.23.1 cog build")


def test_the_server_checked_is_the_installed_coglet(caplog, monkeypatch):
    installed = environment.metadata.version
    monkeypatch.setattr(environment.metadata, "version",
                        lambda name: "0.24.0" if name == "coglet" else installed(name))  # another server installed
    with caplog.at_level(logging.INFO, logger="inpaint"):
        check_server()
    assert [record.getMessage().split(",")[0] for record in caplog.records] == ["Cog's server is coglet 0.24.0"]


def test_setup_checks_the_driver_unless_told_to_use_the_cpu_and_needs_a_gpu_when_told_cuda(monkeypatch):
    """What the host holds (its driver, a GPU) stands in here: this machine has neither."""
    import torch

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(environment, "driver_version", lambda: (520, 61, 5))  # older than CUDA 12's floor
    environment.check_gpu("cpu")  # the CPU needs no driver
    for device in ("", "cuda"):
        with pytest.raises(DriverTooOld):
            environment.check_gpu(device)
    monkeypatch.setattr(environment, "driver_version", lambda: None)  # no NVIDIA driver
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    environment.check_gpu("")  # then the CPU
    with pytest.raises(RuntimeError) as refused:
        environment.check_gpu("cuda")
    assert str(refused.value) == ("INPAINT_DEVICE=cuda, but torch sees no GPU: start the container with the GPU (docker "
                                  "run --gpus all), or leave INPAINT_DEVICE unset to use the CPU when there is none")


def test_the_tested_server_is_the_one_pinned_for_development(caplog):
    pins = dict(line.split("==") for line in (ROOT / "requirements-dev.txt").read_text().splitlines() if "==" in line)
    assert pins["coglet"] == environment.TESTED_COGLET
    assert yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["sdk_version"] == environment.TESTED_COGLET
    with caplog.at_level(logging.INFO, logger="inpaint"):
        check_server()  # the installed server is the tested one: nothing logged, nothing raised
    assert not caplog.records
