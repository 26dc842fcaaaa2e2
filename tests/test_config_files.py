"""The build files: cog.yaml against Cog's own schema, pins, the committed OpenAPI schema, .dockerignore."""

import ast
import inspect
import io
import json
import os
import re
import subprocess
import sys
import tokenize
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
    cuda = yaml.safe_load((ROOT / "cog.yaml").read_text())["build"]["cuda"]
    assert cuda in {row["CUDA"] for row in cuda_rows}, f"Cog has no torch=={torch_pin} build for CUDA {cuda}"
    known = sorted({tuple(int(p) for p in row["Torch"].split("+")[0].split(".")) for row in table})
    assert known[-1] == tuple(int(p) for p in torch_pin.split(".")), "torch is not the newest version Cog knows"


def test_openapi_schema_is_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "script" / "generate-schema"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def _go_form(value):
    """A schema as the Go CLI writes it at `cog build` (pkg/image/build.go): floats that are whole
    numbers come out as integers (Go's encoding/json writes a float64 1.0 as 1)."""
    if isinstance(value, dict):
        return {key: _go_form(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_go_form(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def test_the_schema_as_cog_build_rewrites_it_passes_the_staleness_check(tmp_path):
    """`cog build` rewrites .cog/openapi_schema.json compactly, with the CLI's version and 1.0 as 1:
    the same meaning, so the check passes; a changed bound still fails it."""
    committed = json.loads((ROOT / ".cog" / "openapi_schema.json").read_text())
    go = _go_form({**committed, "info": {**committed["info"], "version": "0.23.1-cli"}})
    assert go["components"]["schemas"]["Input"]["properties"]["strength"]["default"] == 1  # was 1.0
    rewritten = tmp_path / "openapi_schema.json"
    rewritten.write_text(json.dumps(go, separators=(",", ":")))
    check = [sys.executable, str(ROOT / "script" / "generate-schema"), "--check", "--file", str(rewritten)]
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    go["components"]["schemas"]["Input"]["properties"]["strength"]["maximum"] = 2
    rewritten.write_text(json.dumps(go, separators=(",", ":")))
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 1 and "out of date: run script/generate-schema" in result.stderr


def test_cog_build_leftovers_are_ignored_by_git():
    """`cog build` leaves .cog/cog.lock in the checkout; the tree stays clean."""
    result = subprocess.run(["git", "check-ignore", "-q", ".cog/cog.lock"], cwd=ROOT)
    assert result.returncode == 0


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


def _literal(node: ast.expr) -> bool:
    """What Cog's static schema generator reads (pkg/schema/python, parser_literals.go): a string,
    number, bool or None, a negative number, a list of those; nothing imported, nothing computed."""
    if isinstance(node, ast.List):
        return all(_literal(item) for item in node.elts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return isinstance(node.operand, ast.Constant) and isinstance(node.operand.value, (int, float))
    return isinstance(node, ast.Constant)


def test_predict_py_inputs_are_literals_for_cogs_static_schema_generator():
    """Since replicate/cog#2950 (April 2026), `cog build` and `cog predict` read run()'s signature
    with tree-sitter: a choices= it cannot resolve fails the build; a ge=, le= or default= it cannot
    resolve is dropped (the default silently becomes null); it takes implicitly joined strings
    quotes and all."""
    source = (ROOT / "predict.py").read_text()
    run = next(node for node in ast.walk(ast.parse(source)) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "run")
    calls = [default for default in run.args.defaults if isinstance(default, ast.Call)]
    assert len(calls) == len(run.args.args) - 1  # every input but self
    for call in calls:
        assert isinstance(call.func, ast.Name) and call.func.id == "Input" and not call.args
        for keyword in call.keywords:
            assert _literal(keyword.value), f"{ast.get_source_segment(source, call)}: {keyword.arg} is not a literal"
            segment = ast.get_source_segment(source, keyword.value)
            strings = [token for token in tokenize.generate_tokens(io.StringIO(segment).readline) if token.type == tokenize.STRING]
            assert len(strings) <= 1 or isinstance(keyword.value, ast.List), f"{keyword.arg}: one string literal, not joined ones"


def test_predict_py_inputs_agree_with_the_checks_in_inpaint_inputs():
    """predict.py spells its bounds, defaults and choices out (see the test above); inputs.py checks them again."""
    sys.path.insert(0, str(ROOT))
    from inpaint import codec, inputs, schedulers
    from predict import Predictor

    fields = {name: parameter.default for name, parameter in inspect.signature(Predictor.run).parameters.items() if name != "self"}
    expected = {
        "prompt": (None, inputs.DEFAULT_PROMPT, None),
        "mask_grow": (inputs.MASK_GROW_RANGE, inputs.DEFAULT_MASK_GROW, None),
        "mask_blur": (inputs.MASK_BLUR_RANGE, inputs.DEFAULT_MASK_BLUR, None),
        "mask_padding": (inputs.MASK_PADDING_RANGE, inputs.DEFAULT_MASK_PADDING, None),
        "width": (None, inputs.DEFAULT_SIZE, list(inputs.SIZE_CHOICES)),
        "height": (None, inputs.DEFAULT_SIZE, list(inputs.SIZE_CHOICES)),
        "num_outputs": (inputs.NUM_OUTPUTS_RANGE, inputs.DEFAULT_NUM_OUTPUTS, None),
        "num_inference_steps": (inputs.STEPS_RANGE, inputs.DEFAULT_STEPS, None),
        "guidance_scale": (inputs.GUIDANCE_RANGE, inputs.DEFAULT_GUIDANCE, None),
        "strength": (inputs.STRENGTH_RANGE, inputs.DEFAULT_STRENGTH, None),
        "scheduler": (None, inputs.DEFAULT_SCHEDULER, list(schedulers.SCHEDULER_NAMES)),
        "output_format": (None, inputs.DEFAULT_OUTPUT_FORMAT, list(codec.OUTPUT_FORMATS)),
        "output_quality": (inputs.OUTPUT_QUALITY_RANGE, inputs.DEFAULT_OUTPUT_QUALITY, None),
        **{side: (inputs.OUTPAINT_RANGE, 0, None) for side in inputs.OUTPAINT_SIDES},
    }
    for name, (bounds, default, choices) in expected.items():
        field = fields[name]
        assert ((field.ge, field.le) if bounds else None) == bounds, name
        assert field.default == default and type(field.default) is type(default), name
        assert field.choices == choices, name
    assert set(fields) - set(expected) == {"negative_prompt", "image", "mask", "invert_mask", "seed", "disable_safety_checker"}
    assert fields["prompt"].max_length == fields["negative_prompt"].max_length == inputs.PROMPT_MAX_CHARS


def test_dockerignore_keeps_tests_caches_and_test_weights_out():
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if not line.startswith("#")]
    for entry in ("tests", ".venv", ".cache", "**/__pycache__", "**/tiny-weights"):
        assert entry in ignored
    assert "weights" not in ignored  # real weights are baked in by script/download-weights


# A measured time or speed-up: "40 ms", "1.5 s", "76 seconds", "2.4x faster", "1394 -> 589".
_TIMING = re.compile(
    r"\b\d[\d,.]*\s?(?:ms|µs|ns|s|sec|seconds?|minutes?|min)\b(?!-)|\b\d[\d.]*x (?:faster|slower)|\b\d+ -> \d+"
)


def _prose(source: str) -> list[tuple[int, str]]:
    """(line, text) of every comment and docstring of a module."""
    found = [(token.start[0], token.string) for token in tokenize.generate_tokens(io.StringIO(source).readline)
             if token.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and ast.get_docstring(node):
            found.append((node.body[0].lineno, ast.get_docstring(node)))
    return found


def test_no_comment_or_docstring_in_the_package_quotes_a_timing():
    """Numbers live in bench/results and bench/RESULTS.md, where they carry their machine and date; a
    comment names the RESULTS row a choice rests on instead."""
    quoted = [f"{path.relative_to(ROOT)}:{line}: {match.group()!r}"
              for path in sorted((ROOT / "inpaint").rglob("*.py"))
              for line, text in _prose(path.read_text())
              for match in _TIMING.finditer(text)]
    assert not quoted, "\n".join(quoted)


def test_the_pinned_test_tools_keep_an_xdist_group_in_one_worker(tmp_path):
    """script/test runs two workers and keeps test_artifact.py and test_compiled.py in one (their
    xdist_group) so that the bake runs once and its kernels are reused; with pytest 9.2 and
    pytest-xdist 3.8 the group is silently ignored (pytest-dev/pytest-xdist#1386). Two files of one
    group, a module fixture that records each setup, and enough other tests to keep both workers busy."""
    group = """import os, time, pytest
pytestmark = pytest.mark.xdist_group("together")
@pytest.fixture(scope="module")
def once():
    with open(os.environ["SETUPS"], "a") as log:
        log.write(f"{__name__} {os.environ['PYTEST_XDIST_WORKER']}\\n")
@pytest.mark.parametrize("i", range(4))
def test_grouped(once, i):
    time.sleep(0.05)
"""
    (tmp_path / "test_one.py").write_text(group)
    (tmp_path / "test_two.py").write_text(group)
    (tmp_path / "test_rest.py").write_text(
        "import time, pytest\n@pytest.mark.parametrize('i', range(16))\ndef test_other(i):\n    time.sleep(0.05)\n")
    setups = tmp_path / "setups.txt"
    result = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "no:cacheprovider",
                             "-q", str(tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "SETUPS": str(setups)})
    assert result.returncode == 0, result.stdout[-2000:]
    lines = setups.read_text().split()
    assert sorted(lines[::2]) == ["test_one", "test_two"]  # each module's fixture set up once...
    assert len(set(lines[1::2])) == 1  # ...and both in the same worker
