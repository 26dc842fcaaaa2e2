"""The build files: cog.yaml against Cog's own schema, pins, the committed OpenAPI schema, .dockerignore."""

import json
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
COG_DATA = Path(__file__).parent / "data" / "cog"  # copied from Cog's repository (see tests/data/cog/README.md)


def _requirements(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line or line.startswith("-r"):
            continue
        assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+", line), f"{name}: not pinned with ==: {line}"
        package, version = line.split("==")
        pins[package.lower()] = version
    return pins


def test_cog_yaml_is_valid_against_cogs_schema():
    config = yaml.safe_load((ROOT / "cog.yaml").read_text())
    schema = json.loads((COG_DATA / "config_schema_v1.0.json").read_text())
    jsonschema.validate(config, schema)
    assert config["build"]["gpu"] is True
    assert config["build"]["python_version"] == "3.12"
    assert config["build"]["python_requirements"] == "requirements.txt"
    assert config["build"]["sdk_version"] == "0.23.1"
    assert config["run"] == "predict.py:Predictor"
    assert "predict" not in config  # deprecated in Cog 0.23


def test_every_requirement_is_pinned_and_cog_is_not_in_the_image_requirements():
    runtime = _requirements("requirements.txt")
    dev = _requirements("requirements-dev.txt")
    for package in ("torch", "diffusers", "transformers", "safetensors", "pillow"):
        assert package in runtime
    assert "cog" not in runtime and "coglet" not in runtime  # Cog installs its own SDK (build.sdk_version)
    assert dev["cog"] == "0.23.1" == dev["coglet"]


def test_torch_pin_is_in_cogs_compatibility_table():
    torch_pin = _requirements("requirements.txt")["torch"]
    table = json.loads((COG_DATA / "torch_compatibility.json").read_text())
    python = yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["python_version"]
    cuda_rows = [
        row for row in table
        if row["Torch"].split("+")[0] == torch_pin and row["CUDA"] and python in row["Pythons"]
    ]
    assert cuda_rows, f"torch=={torch_pin} with Python {python} is not in Cog's table: cog build needs build.cuda"
    known = sorted({tuple(int(p) for p in row["Torch"].split("+")[0].split(".")) for row in table})
    assert known[-1] == tuple(int(p) for p in torch_pin.split(".")), "torch is not the newest version Cog knows"


def test_openapi_schema_is_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "script" / "generate-schema"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_openapi_schema_has_replicates_inputs():
    schema = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())["components"]["schemas"]
    properties = schema["Input"]["properties"]
    assert schema["Input"]["required"] == ["image"]  # the mask may come from the image's transparency
    assert properties["prompt"]["default"] == "a vision of paradise. unreal engine"
    assert properties["negative_prompt"]["nullable"] is True
    assert schema["width"]["enum"] == list(range(64, 1025, 64)) == schema["height"]["enum"]
    assert properties["width"]["default"] is None and properties["width"]["nullable"] is True  # automatic
    assert (properties["num_outputs"]["minimum"], properties["num_outputs"]["maximum"]) == (1, 4)
    assert (properties["num_inference_steps"]["minimum"], properties["num_inference_steps"]["maximum"]) == (1, 500)
    assert (properties["guidance_scale"]["minimum"], properties["guidance_scale"]["maximum"]) == (1, 20)
    assert properties["guidance_scale"]["default"] == 7.5
    assert schema["scheduler"]["enum"] == ["DDIM", "K_EULER", "DPMSolverMultistep", "K_EULER_ANCESTRAL", "PNDM", "KLMS"]
    assert properties["scheduler"]["default"] == "DPMSolverMultistep"
    assert properties["seed"]["nullable"] is True and properties["seed"]["type"] == "integer"
    for name, low, high, default in [
        ("mask_grow", -64, 64, 0), ("mask_blur", 0, 64, 8), ("mask_padding", 0, 512, 32),
        ("strength", 0, 1, 1.0), ("output_quality", 1, 100, 90),
    ]:
        assert (properties[name]["minimum"], properties[name]["maximum"], properties[name]["default"]) == (low, high, default)
    assert properties["invert_mask"]["default"] is False
    assert schema["output_format"]["enum"] == ["png", "webp", "jpg"]
    assert schema["Output"] == {"title": "Output", "type": "array", "items": {"type": "string", "format": "uri"}}


def test_dockerignore_keeps_tests_caches_and_test_weights_out():
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    for entry in ("tests", ".venv", ".cache", "**/__pycache__", "**/tiny-weights"):
        assert entry in ignored
    assert "weights" not in ignored  # real weights are baked in by script/download-weights
