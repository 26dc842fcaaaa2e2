"""Full-size random SD2-inpainting weights from the real configs, for speed and load-time work.

Speed does not depend on the weights' values, and the fp16 files come out at exactly the published
sizes (checked here against inpaint/weights-sha256.json), so load times on them are representative.
The folder gets its own weights-sha256.json (trusted once INPAINT_WEIGHTS_MANIFEST_SHA256 pins it,
inpaint.weights.manifest_pin), so the project's loader verifies it as it would the real one.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch

from inpaint.weights import write_manifest

REFERENCE = Path(__file__).resolve().parent.parent / "inpaint" / "reference"
PUBLISHED = json.loads((REFERENCE.parent / "weights-sha256.json").read_text())
PUBLISHED_SAFETY = json.loads((REFERENCE.parent / "safety-checker-sha256.json").read_text())


def build_full_size(out: Path, safety_checker: bool = True, device: torch.device | str = "cpu") -> Path:
    """Write the checkpoint folder (about 2.6 GB, plus 0.6 GB for the checker) unless it is already there.

    The random values are drawn on `device` (a GPU draws them in a blink; 16 CPU cores take a minute)."""
    if (out / "weights-sha256.json").is_file():
        return out
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    started = time.perf_counter()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("model_index.json", "scheduler", "tokenizer", "feature_extractor"):
        source = REFERENCE / name
        if source.is_dir():
            shutil.copytree(source, tmp / name, copy_function=shutil.copyfile)
        else:
            shutil.copyfile(source, tmp / name)
    torch.manual_seed(0)
    with torch.device(device):
        models = _random_models(safety_checker)
    for name, model in models.items():
        model.to(torch.float16).save_pretrained(tmp / name, variant="fp16", safe_serialization=True)
        del model
    models.clear()
    write_manifest(tmp, "bench/fullsize.py: full-size random weights from the real configs")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    print(f"built full-size random weights in {out} in {time.perf_counter() - started:.0f}s")
    return out


def _random_models(safety_checker: bool) -> dict[str, torch.nn.Module]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPTextConfig, CLIPTextModel

    models = {
        "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(REFERENCE / "unet")),
        "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(REFERENCE / "vae")),
        "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(REFERENCE / "text_encoder")),
    }
    if safety_checker:
        models["safety_checker"] = StableDiffusionSafetyChecker(CLIPConfig.from_pretrained(REFERENCE / "safety_checker"))
    return models


def size_report(folder: Path) -> list[tuple[str, int, int | None]]:
    """(file, our size, published size) for every fp16 weight file."""
    published = {path: entry["size"] for path, entry in {**PUBLISHED, **PUBLISHED_SAFETY}.items() if not path.startswith("_")}
    rows = []
    for path in sorted(folder.rglob("*.fp16.safetensors")):
        relative = path.relative_to(folder).as_posix()
        rows.append((relative, path.stat().st_size, published.get(relative)))
    return rows
