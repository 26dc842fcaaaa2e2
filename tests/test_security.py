"""What the code may and may not do with a request: static checks over the package and predict.py."""

import ast
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODEL_CODE = sorted((ROOT / "inpaint").rglob("*.py")) + [ROOT / "predict.py"]
COMPILER = ROOT / "inpaint" / "fastpath" / "compiler.py"
NETWORK_MODULES = {"urllib", "urllib.request", "requests", "httpx", "http.client", "huggingface_hub", "socket"}


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_only_two_modules_can_reach_the_network():
    """weights.py fetches what the deployment's settings name (COG_WEIGHTS, the hub), at setup; egress.py what a
    request names (an image or mask given as a URL), to allowed addresses only. Nothing else connects."""
    for path in MODEL_CODE:
        network = _imports(path) & NETWORK_MODULES
        if path.name in ("weights.py", "egress.py"):
            continue
        assert not network, f"{path.name} imports {network}"


def test_no_pickle_no_remote_code_no_shell():
    for path in MODEL_CODE:
        text = path.read_text()
        assert "trust_remote_code" not in text, path.name
        assert "torch.load(" not in text and "import pickle" not in text, path.name
        allowed = {"subprocess"} if path == COMPILER else set()  # its one child: below
        assert not (_imports(path) - allowed) & {"subprocess", "pickle", "shelve"}, path.name
        assert "os.system(" not in text and "shell=True" not in text, path.name


def test_the_one_child_process_is_this_interpreter_compiling_the_unet():
    """inpaint/fastpath/compiler.py starts `python -m inpaint.fastpath.compiler` with an argument list (no
    shell); what a request decides there is the working shape, as JSON numbers, and nothing else."""
    tree = ast.parse(COMPILER.read_text())
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and isinstance(node.func.value, ast.Name) and node.func.value.id == "subprocess"]
    assert [call.func.attr for call in calls] == ["Popen"]
    assert "shell" not in {keyword.arg for keyword in calls[0].keywords}
    commands = [node.value for node in ast.walk(tree) if isinstance(node, ast.Assign)
                and any(isinstance(target, ast.Name) and target.id == "command" for target in node.targets)]
    assert len(commands) == 1 and isinstance(commands[0], ast.List)
    assert ast.unparse(commands[0].elts[0]) == "sys.executable"
    assert [ast.literal_eval(element) for element in commands[0].elts[1:3]] == ["-m", "inpaint.fastpath.compiler"]


def test_every_loader_is_local_and_weights_are_safetensors():
    calls = 0
    for path in (ROOT / "inpaint" / "pipeline.py", ROOT / "inpaint" / "safety.py", COMPILER):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                calls += 1
                keywords = {keyword.arg: keyword.value for keyword in node.keywords}
                assert ast.literal_eval(keywords["local_files_only"]) is True
                if "variant" in keywords:  # a weights loader, not a config-only one
                    assert ast.literal_eval(keywords["use_safetensors"]) is True
    assert calls == 3


def test_output_paths_are_fixed_names_in_a_fresh_folder(tmp_path):
    """File names never come from a request: out-<index> in a folder made for the prediction."""
    from inpaint.codec import encode_image

    path = encode_image(np.zeros((4, 4, 3), np.uint8), tmp_path / "out-0", "webp", 50)
    assert path == tmp_path / "out-0.webp"
    assert "self.outputs.folder() as folder" in (ROOT / "predict.py").read_text()
    assert 'tempfile.mkdtemp(prefix="inpaint-")' in (ROOT / "inpaint" / "concurrency.py").read_text()
    assert 'out_dir / f"out-{index}"' in (ROOT / "inpaint" / "service.py").read_text()
