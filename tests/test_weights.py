"""Finding, downloading and verifying weights, on the tiny checkpoint and real local servers; and the
weights a hostile folder, archive or URL could slip in, each built here and refused."""

import functools
import hashlib
import http.server
import io
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import pytest

from https_server import tar_of
from inpaint.config import Settings
from inpaint import weights as weights_module
from inpaint.weights import (
    PACKAGE_MANIFEST,
    SAFETY_MANIFEST,
    WeightsError,
    manifest_pin,
    read_ahead,
    read_manifest,
    release_view,
    resolve_weights,
    resolve_weights_ahead,
    verify_weights,
)

ROOT = Path(__file__).resolve().parent.parent
UNET = "unet/diffusion_pytorch_model.fp16.safetensors"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Each test's own cache (stamps, unpacked archives), as a fresh container has."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def weights_copy(tiny_weights, tmp_path) -> Path:
    folder = tmp_path / "weights"
    shutil.copytree(tiny_weights, folder)
    return folder


def test_published_manifest_is_the_reference_one():
    manifest = json.loads(PACKAGE_MANIFEST.read_text())
    assert manifest[UNET] == {
        "sha256": "29a698f37775d5904a958c9cebed98184483dfb441729a8e5f98dd5b65df70c8",
        "size": 1731933536,
    }


def test_a_folder_is_checked_against_the_published_fp16_files(tmp_path):
    (tmp_path / "model_index.json").write_text("{}")
    manifest = read_manifest(tmp_path)
    assert set(manifest) == {
        UNET,
        "vae/diffusion_pytorch_model.fp16.safetensors",
        "text_encoder/model.fp16.safetensors",
        "safety_checker/model.fp16.safetensors",
    }
    assert manifest["safety_checker/model.fp16.safetensors"]["size"] == 608018440
    with pytest.raises(WeightsError, match="weight file safety_checker/model.fp16.safetensors is missing .*script/download-weights"):
        verify_weights(tmp_path)


def test_tiny_weights_verify_with_their_pinned_manifest_and_the_check_is_remembered_outside_the_folder(weights_copy, monkeypatch):
    pin = manifest_pin(weights_copy)
    assert verify_weights(weights_copy, pin=pin) == weights_copy
    assert not (weights_copy / ".verified.json").exists()
    stamps = list((Path(os.environ["XDG_CACHE_HOME"]) / "inpaint" / "verified").glob("*.json"))
    assert len(stamps) == 1 and UNET in json.loads(stamps[0].read_text())
    hashed, real, forced = [], weights_module.sha256_file, []
    monkeypatch.setattr(weights_module, "sha256_file", lambda path: hashed.append(path))
    verify_weights(weights_copy, pin=pin)  # the stamp matches: nothing hashed
    assert hashed == []
    monkeypatch.setattr(weights_module, "sha256_file", lambda path: forced.append(path) or real(path))
    verify_weights(weights_copy, pin=pin, force=True)  # force: every file hashed again, the stamp notwithstanding
    manifest = json.loads((weights_copy / "weights-sha256.json").read_text())
    assert sorted(path.relative_to(weights_copy).as_posix() for path in forced) == sorted(
        name for name, entry in manifest.items() if isinstance(entry, dict))


def test_a_folders_own_manifest_does_not_vouch_for_it_unless_pinned(weights_copy, caplog):
    """The tiny weights carry a manifest of their own; without the pin they are checked against the
    published checkpoint's, and fail."""
    with caplog.at_level(logging.WARNING, logger="inpaint"), pytest.raises(WeightsError, match="expected 1,731,933,536|expected 608,018,440|expected 680,821,096|expected 167,335,342"):
        verify_weights(weights_copy)
    assert "counts only when the deployment pins its sha256 in INPAINT_WEIGHTS_MANIFEST_SHA256" in caplog.text


def test_a_manifest_other_than_the_pinned_one_is_refused(weights_copy):
    pin = manifest_pin(weights_copy)
    manifest = json.loads((weights_copy / "weights-sha256.json").read_text())
    manifest["_source"] = "rewritten by someone else"
    (weights_copy / "weights-sha256.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="has sha256 [0-9a-f]{64}, but INPAINT_WEIGHTS_MANIFEST_SHA256 pins"):
        verify_weights(weights_copy, pin=pin)


def test_a_pinned_manifest_must_cover_the_configs(weights_copy):
    manifest = json.loads((weights_copy / "weights-sha256.json").read_text())
    del manifest["feature_extractor/preprocessor_config.json"]
    (weights_copy / "weights-sha256.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match="does not list feature_extractor/preprocessor_config.json"):
        verify_weights(weights_copy, pin=manifest_pin(weights_copy))


def test_a_blinding_feature_extractor_config_is_caught(weights_copy):
    """rescale_factor 0 would hand the safety checker black images: configs are hashed too."""
    pin = manifest_pin(weights_copy)
    path = weights_copy / "feature_extractor" / "preprocessor_config.json"
    config = json.loads(path.read_text())
    config["rescale_factor"] = 0
    path.write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="feature_extractor/preprocessor_config.json is (corrupt|.* bytes, expected)"):
        verify_weights(weights_copy, pin=pin)


def test_with_the_published_manifests_the_configs_come_from_the_packaged_reference(weights_copy, monkeypatch):
    """The real checkpoint's configs are not in the published manifests: the loaders read the packaged
    ones (inpaint/reference) beside links to the verified weights, whatever the folder's configs say."""
    tiny = json.loads((weights_copy / "weights-sha256.json").read_text())
    published = weights_copy.parent / "published.json"
    published.write_text(json.dumps({path: entry for path, entry in tiny.items() if path.endswith(".safetensors") and "safety" not in path}))
    safety = weights_copy.parent / "published-safety.json"
    safety.write_text(json.dumps({path: entry for path, entry in tiny.items() if path.startswith("safety_checker/") and path.endswith(".safetensors")}))
    monkeypatch.setattr(weights_module, "PACKAGE_MANIFEST", published)
    monkeypatch.setattr(weights_module, "SAFETY_MANIFEST", safety)
    config = weights_copy / "feature_extractor" / "preprocessor_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "rescale_factor": 0}))
    view = verify_weights(weights_copy)
    try:
        assert view != weights_copy
        reference = ROOT / "inpaint" / "reference"
        for relative in weights_module.CONFIG_FILES:
            assert (view / relative).read_bytes() == (reference / relative).read_bytes()
            assert not (view / relative).is_symlink()
        assert (view / UNET).resolve() == (weights_copy / UNET).resolve()
    finally:
        release_view(view)
    assert not view.exists()
    release_view(weights_copy)  # only views are removed
    assert weights_copy.is_dir()


@pytest.mark.parametrize("planted", [
    "unet/diffusion_pytorch_model.safetensors.index.fp16.json",
    "unet/diffusion_pytorch_model-00001-of-00002.fp16.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "text_encoder/model.safetensors",
])
def test_files_the_loaders_could_read_instead_are_refused(weights_copy, planted):
    """The shard-index attack: diffusers prefers an index and its shards, which no manifest names."""
    (weights_copy / planted).write_bytes(b"{}" if planted.endswith(".json") else b"\0" * 64)
    with pytest.raises(WeightsError, match=f"{planted} in .* is not a file this model loads"):
        verify_weights(weights_copy, pin=manifest_pin(weights_copy))


def test_links_are_refused(weights_copy, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    (weights_copy / UNET).rename(outside)
    (weights_copy / UNET).symlink_to(outside)
    with pytest.raises(WeightsError, match=f"{UNET} in .* is not a regular file"):
        verify_weights(weights_copy, pin=manifest_pin(weights_copy))


def test_a_forged_stamp_does_not_skip_hashing(weights_copy):
    """A stamp planted in the folder is not read; and a file swapped for another of the same size and
    mtime after a successful check is hashed again (its ctime and inode changed)."""
    pin = manifest_pin(weights_copy)
    verify_weights(weights_copy, pin=pin)
    path = weights_copy / UNET
    before = path.stat()
    (weights_copy / ".verified.json").write_text(json.dumps({UNET: [before.st_size, before.st_mtime_ns, "0" * 64]}))
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    swapped = path.with_name("swapped")
    swapped.write_bytes(bytes(data))
    os.utime(swapped, ns=(before.st_atime_ns, before.st_mtime_ns))
    swapped.replace(path)
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns
    with pytest.raises(WeightsError, match=f"{UNET} is corrupt: sha256 .* delete it and run script/download-weights"):
        verify_weights(weights_copy, pin=pin)


def test_a_stamp_vouches_only_for_the_sha256_it_checked(weights_copy):
    """After a successful check, a newly pinned manifest that names another sha256 for the same,
    untouched file has it hashed again, and refused: the stamp remembers what the file was checked
    against, not only that it was checked."""
    verify_weights(weights_copy, pin=manifest_pin(weights_copy))
    manifest = json.loads((weights_copy / "weights-sha256.json").read_text())
    manifest[UNET]["sha256"] = "0" * 64
    (weights_copy / "weights-sha256.json").write_text(json.dumps(manifest))
    with pytest.raises(WeightsError, match=f"{UNET} is corrupt: sha256 [0-9a-f]{{64}} does not match the manifest's {'0' * 64}"):
        verify_weights(weights_copy, pin=manifest_pin(weights_copy))


def test_each_folder_keeps_its_own_stamp_and_a_wider_check_is_remembered(weights_copy, tmp_path, monkeypatch):
    """Two folders verified one after the other are each remembered; a check that adds the safety
    checker's files to what a folder's stamp holds hashes those files alone, and is remembered too."""
    other = tmp_path / "other"
    shutil.copytree(weights_copy, other)
    pin = manifest_pin(weights_copy)
    verify_weights(weights_copy, pin=pin, safety_checker=False)
    verify_weights(other, pin=pin)
    hashed, real = [], weights_module.sha256_file
    monkeypatch.setattr(weights_module, "sha256_file", lambda path: hashed.append(path) or real(path))
    verify_weights(weights_copy, pin=pin, safety_checker=False)
    assert hashed == []  # the other folder's check did not replace this one's
    verify_weights(weights_copy, pin=pin)  # now with the checker: its files alone are hashed
    assert {path.relative_to(weights_copy).parts[0] for path in hashed} == {"safety_checker"}
    hashed.clear()
    verify_weights(weights_copy, pin=pin)
    assert hashed == []


def test_truncated_file_is_caught_by_size(weights_copy):
    path = weights_copy / UNET
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(WeightsError, match="is 100 bytes, expected"):
        verify_weights(weights_copy, pin=manifest_pin(weights_copy))


def test_missing_checkpoint_says_what_to_run(tmp_path):
    with pytest.raises(WeightsError, match="model_index.json is missing.*script/download-weights"):
        verify_weights(tmp_path)


def test_cog_weights_must_be_a_folder(tmp_path):
    with pytest.raises(WeightsError, match="is not a folder"):
        resolve_weights(str(tmp_path / "nope"), Settings(weights_dir=tmp_path))


def test_weights_resolved_ahead_give_the_folder_verified_and_read(weights_copy, tiny_settings, monkeypatch):
    read = []
    original = weights_module.read_ahead

    def recording_read_ahead(folder):
        read.append(folder)
        original(folder)

    monkeypatch.setattr(weights_module, "read_ahead", recording_read_ahead)
    future = resolve_weights_ahead(str(weights_copy), tiny_settings)
    assert future.result(timeout=60) == weights_copy
    assert read == [weights_copy]


def test_weights_resolved_ahead_raise_the_same_error_when_asked(tmp_path):
    future = resolve_weights_ahead(str(tmp_path / "nope"), Settings(weights_dir=tmp_path))
    with pytest.raises(WeightsError, match="COG_WEIGHTS=.*nope is not a folder"):
        future.result(timeout=60)


def test_read_ahead_reads_every_weight_file_and_skips_an_absent_checker(weights_copy, monkeypatch):
    (weights_copy / "safety_checker" / "model.fp16.safetensors").unlink()
    opened = []
    real_open = open

    def recording_open(path, *args, **kwargs):
        opened.append(Path(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", recording_open)
    read_ahead(weights_copy)
    assert set(opened) == {weights_copy / UNET, weights_copy / "vae/diffusion_pytorch_model.fp16.safetensors",
                           weights_copy / "text_encoder/model.fp16.safetensors"}


@pytest.mark.slow
def test_make_tiny_weights_is_deterministic(tiny_weights, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "script" / "make-tiny-weights"), str(tmp_path / "again")], check=True)
    assert manifest_pin(tiny_weights) == manifest_pin(tmp_path / "again")


def test_safety_checker_files_are_required_unless_the_checker_is_off(weights_copy):
    pin = manifest_pin(weights_copy)
    (weights_copy / "safety_checker" / "model.fp16.safetensors").unlink()
    with pytest.raises(WeightsError, match="safety_checker/model.fp16.safetensors is missing.*INPAINT_SAFETY_CHECKER=0"):
        verify_weights(weights_copy, pin=pin)
    verify_weights(weights_copy, pin=pin, safety_checker=False)


def test_settings_parse_booleans_and_numbers():
    settings = Settings.from_env({"INPAINT_SAFETY_CHECKER": "0", "INPAINT_MAX_INPUT_PIXELS": "1000"})
    assert settings.safety_checker is False and settings.max_input_pixels == 1000
    assert Settings.from_env({"INPAINT_SAFETY_CHECKER": "true"}).safety_checker is True
    with pytest.raises(ValueError, match="INPAINT_SAFETY_CHECKER='maybe' is not a valid bool"):
        Settings.from_env({"INPAINT_SAFETY_CHECKER": "maybe"})


# ---------------------------------------------------------------- COG_WEIGHTS archives, over real https


def test_cog_weights_https_tar_is_fetched_unpacked_and_verified(weights_copy, tiny_settings, https, tmp_path):
    https.routes["/weights.tar.gz"] = (200, {}, tar_of(weights_copy))
    url = f"{https.url}/weights.tar.gz?X-Amz-Signature=secret"
    folder = resolve_weights(url, tiny_settings)
    assert hashlib.sha256((folder / UNET).read_bytes()).digest() == hashlib.sha256((weights_copy / UNET).read_bytes()).digest()
    assert resolve_weights(url, tiny_settings) == folder  # unpacked once
    assert len(https.requests) == 1
    assert stat.S_IMODE((Path(os.environ["XDG_CACHE_HOME"]) / "inpaint").stat().st_mode) == 0o700  # the unpacked weights are private
    with pytest.raises(WeightsError, match="could not fetch the weights archive COG_WEIGHTS=https://127.0.0.1:.*/missing.tar") as error:
        resolve_weights(f"{https.url}/missing.tar?token=secret", tiny_settings)
    assert "secret" not in str(error.value)


def test_weights_resolved_ahead_hand_back_the_future_before_the_download_ends(weights_copy, tiny_settings, https):
    """Setup's imports run beside the download: the call returns while the archive is still on its way."""
    gate = threading.Event()

    def held():
        gate.wait(30)  # (bounded: a call that waited for the download would still end)
        yield tar_of(weights_copy)

    https.routes["/weights.tar.gz"] = (200, {}, held())
    future = resolve_weights_ahead(f"{https.url}/weights.tar.gz", tiny_settings)
    assert not future.done()
    gate.set()
    assert (future.result(timeout=60) / "model_index.json").is_file()


def test_a_body_that_is_not_an_archive_is_refused_from_its_first_bytes(tiny_settings, https):
    """The archive is read a buffer at a time through the caps: junk, however long (here endless for
    all the client can tell), fails as junk from its first bytes, not after it was read whole."""
    https.routes["/junk.tar"] = (200, {}, (os.urandom(1 << 16) for _ in range(1024)))  # 64 MiB, made as sent
    with pytest.raises(WeightsError) as error:
        resolve_weights(f"{https.url}/junk.tar", tiny_settings)
    assert str(error.value).startswith(f"could not fetch the weights archive COG_WEIGHTS={https.url}/junk.tar (")
    assert https.sent < 16 << 20


@pytest.mark.parametrize("url, shown", [
    ("https://user:secret@example.com/w.tar?X-Amz-Signature=abc#part", "https://example.com/w.tar (query hidden)"),
    ("https://[2001:db8::1]:8443/w.tar?token=abc", "https://[2001:db8::1]:8443/w.tar (query hidden)"),
    ("https://[2001:db8::1]/w.tar", "https://[2001:db8::1]/w.tar"),
])
def test_a_url_in_logs_and_messages_has_no_userinfo_query_or_fragment_and_an_ipv6_host_keeps_its_brackets(url, shown):
    assert weights_module.redact(url) == shown


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/weights.tar", "file:///etc/passwd"])
def test_plain_http_and_local_file_urls_are_refused(tiny_settings, url):
    with pytest.raises(WeightsError) as error:
        resolve_weights(url, tiny_settings)
    assert str(error.value) == f"COG_WEIGHTS={url} is not an https URL; serve the weights archive over https"


def test_a_redirect_from_https_down_to_http_is_refused(weights_copy, tiny_settings, https):
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(weights_copy)))
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    try:
        https.routes["/weights.tar"] = (302, {"Location": f"http://127.0.0.1:{plain.server_address[1]}/w.tar?sig=secret"}, b"")
        with pytest.raises(WeightsError, match=r"refused a redirect to http://127.0.0.1:\d+/w.tar \(query hidden\): only https") as error:
            resolve_weights(f"{https.url}/weights.tar", tiny_settings)
        assert "secret" not in str(error.value)
    finally:
        plain.shutdown()


def test_a_tar_bomb_is_stopped_at_the_byte_cap(tiny_settings, https, tmp_path):
    """A gzip of zeros that unpacks to far more than the cap: stopped by the sizes the tar declares."""
    zeros = tmp_path / "zeros"
    with zeros.open("wb") as file:
        file.truncate(64 << 20)  # sparse: nothing on disk
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(zeros, arcname="checkpoint/unet/diffusion_pytorch_model.fp16.safetensors")
    assert len(buffer.getvalue()) < 200_000
    https.routes["/bomb.tar.gz"] = (200, {}, buffer.getvalue())
    settings = Settings(weights_manifest_sha256=tiny_settings.weights_manifest_sha256, weights_archive_max_bytes=16 << 20)
    with pytest.raises(WeightsError, match=r"unpacks to over 16,777,216 bytes \(INPAINT_WEIGHTS_ARCHIVE_MAX_BYTES\)"):
        resolve_weights(f"{https.url}/bomb.tar.gz", settings)
    assert not any((Path(os.environ["XDG_CACHE_HOME"]) / "inpaint").glob("weights-*"))  # nothing half-unpacked is left


def test_a_tar_of_many_members_and_one_with_a_link_are_refused(weights_copy, tiny_settings, https, tmp_path):
    many = io.BytesIO()
    with tarfile.open(fileobj=many, mode="w") as tar:
        for index in range(1001):
            tar.addfile(tarfile.TarInfo(f"checkpoint/junk-{index}"), io.BytesIO(b""))
    https.routes["/many.tar"] = (200, {}, many.getvalue())
    with pytest.raises(WeightsError, match=r"over 1,000 entries \(INPAINT_WEIGHTS_ARCHIVE_MAX_MEMBERS\)"):
        resolve_weights(f"{https.url}/many.tar", tiny_settings)
    linked = io.BytesIO()
    with tarfile.open(fileobj=linked, mode="w") as tar:
        link = tarfile.TarInfo("checkpoint/unet/diffusion_pytorch_model.fp16.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    https.routes["/linked.tar"] = (200, {}, linked.getvalue())
    with pytest.raises(WeightsError, match="holds 'checkpoint/unet/diffusion_pytorch_model.fp16.safetensors', which is not a regular file"):
        resolve_weights(f"{https.url}/linked.tar", tiny_settings)


def test_an_archive_that_trickles_is_stopped_at_the_deadline(tiny_settings, https):
    """A byte at a time, each well within the socket's timeout: before, a read of tarfile's buffer waited
    for the whole buffer, 10,240 bytes, and the deadline was looked at only between them."""

    def trickled():
        for _ in range(600):  # (bounded: a client that waited for it all would still end)
            yield b"\0"
            time.sleep(0.1)

    https.routes["/slow.tar"] = (200, {}, trickled())
    settings = Settings(weights_manifest_sha256=tiny_settings.weights_manifest_sha256, weights_archive_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(WeightsError, match=r"^the weights archive https://127.0.0.1:\d+/slow.tar took longer than "
                                         "INPAINT_WEIGHTS_ARCHIVE_TIMEOUT allows"):
        resolve_weights(f"{https.url}/slow.tar", settings)
    assert time.monotonic() - started < 2 and https.sent < 30
    assert not any((Path(os.environ["XDG_CACHE_HOME"]) / "inpaint").glob("weights-*"))  # nothing half-unpacked is left


def test_an_archive_read_in_pieces_gives_tarfile_exactly_the_bytes_it_asks_for():
    """A response hands over what has arrived (read1), often less than asked: the reads are joined up to
    the size asked, never past it, and the last one is what was left."""

    class Arriving:  # a response whose bytes arrive three at a time
        def __init__(self, data: bytes) -> None:
            self.data = data

        def read1(self, size: int) -> bytes:
            piece, self.data = self.data[:min(size, 3)], self.data[min(size, 3):]
            return piece

    budget = weights_module._Budget(Arriving(bytes(range(20))), 1 << 20, time.monotonic() + 60, "https://example.test/w.tar")
    assert budget.read(10) == bytes(range(10)) and budget.read(16) == bytes(range(10, 20)) and budget.read(4) == b""
    assert budget.read_bytes == 20


@pytest.mark.slow
def test_the_signed_url_stays_out_of_the_setup_logs_that_the_server_hands_out(weights_copy, https, tmp_path):
    """Cog's server returns setup logs from GET /health-check: a signed COG_WEIGHTS must not be in them."""
    from cogserver import CogServer

    https.routes["/weights.tar.gz"] = (200, {}, tar_of(weights_copy))
    url = f"{https.url}/weights.tar.gz?X-Amz-Signature=s3cr3tsignature&X-Amz-Credential=AKIAEXAMPLE"
    env = {"SSL_CERT_FILE": str(https.cert), "XDG_CACHE_HOME": str(tmp_path / "server-cache"),
           "INPAINT_WEIGHTS_MANIFEST_SHA256": manifest_pin(weights_copy)}
    with CogServer(url, log_path=tmp_path / "server.log", env=env) as server:
        logs = server.health()["setup"]["logs"]
        assert "downloading weights archive https://127.0.0.1" in logs and "(query hidden)" in logs
    everything = logs + (tmp_path / "server.log").read_text()
    assert "s3cr3tsignature" not in everything and "AKIAEXAMPLE" not in everything


# ---------------------------------------------------------------- downloads, against a local hub

SD2_REPO = "sd2-community/stable-diffusion-2-inpainting"
SAFETY_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_the_layout_copy_is_the_reference_one():
    reference = ROOT.parent / "shared" / "reference" / "remote-layout.json"
    if not reference.is_file():
        pytest.skip("../shared/reference is not beside this checkout")
    assert json.loads(weights_module.REMOTE_LAYOUT.read_text()) == json.loads(reference.read_text())


def test_every_file_the_download_asks_for_exists_in_the_real_repositories_at_the_pinned_revisions():
    from fakehub import remote_files

    layout = json.loads(weights_module.REMOTE_LAYOUT.read_text())
    plan = weights_module.download_plan(Settings())
    assert [(repo, revision) for _, repo, revision, _ in plan] == [
        (SD2_REPO, "5f74973cbb64c8568780732c17f43eb269d63a0d"),
        (SAFETY_REPO, "451f4fe16113bff5a5d2269ed5ad43b0592e9a14"),
    ]
    for _, repo, revision, files in plan:
        assert layout[repo]["revision"] == revision
        assert set(files) <= set(remote_files(layout[repo])), set(files) - set(remote_files(layout[repo]))
    # Every weight file fetched is one the manifests vouch for, under the same name.
    assert {f for _, _, _, files in plan for f in files if f.endswith(".safetensors")} == set(read_manifest(Path("/nonexistent")))


@pytest.fixture
def hub(tiny_weights):
    """The two source repositories as the real hub lays them out, holding the tiny checkpoint's bytes."""
    from fakehub import FakeHub

    server = FakeHub({SD2_REPO: tiny_weights, SAFETY_REPO: tiny_weights})
    yield server
    server.close()


def _hub_env(hub, tmp_path, **settings) -> dict:
    """The environment of a process that talks to `hub`: huggingface_hub reads HF_ENDPOINT at import."""
    return {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf-home"), **settings}


def _tiny_published(tiny_weights, tmp_path) -> tuple[Path, Path]:
    """Manifests in the packaged ones' form that vouch for the tiny checkpoint's weight files: they stand
    in for the published ones (the real files' bytes are not on this machine)."""
    tiny = json.loads((tiny_weights / "weights-sha256.json").read_text())
    weight_files = {path: entry for path, entry in tiny.items() if path.endswith(".safetensors")}
    published = tmp_path / "published.json"
    published.write_text(json.dumps({path: entry for path, entry in weight_files.items() if not path.startswith("safety")}))
    safety = tmp_path / "published-safety.json"
    safety.write_text(json.dumps({path: entry for path, entry in weight_files.items() if path.startswith("safety")}))
    return published, safety


def _with_tiny_manifests(tiny_weights, tmp_path) -> str:
    """Python lines that point the packaged manifests and configs at the tiny checkpoint's."""
    published, safety = _tiny_published(tiny_weights, tmp_path)
    return f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from inpaint import weights
weights.PACKAGE_MANIFEST = Path({str(published)!r})
weights.SAFETY_MANIFEST = Path({str(safety)!r})
weights.REFERENCE = Path({str(tiny_weights)!r})  # the tiny checkpoint's configs stand in for the packaged ones
"""


def _weight_files(folder: Path) -> set[str]:
    return {path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file() and ".cache" not in path.parts}


def _download_weights(env: dict, dest: Path, prelude: str = "") -> subprocess.CompletedProcess:
    """script/download-weights --dest DEST as a user runs it, or run in a process that ran `prelude` first."""
    script = ROOT / "script" / "download-weights"
    command = [str(script), "--dest", str(dest)]
    if prelude:
        command = [sys.executable, "-c", prelude + f"""
import runpy
sys.path.insert(0, {str(script.parent)!r})
sys.argv = {command!r}
runpy.run_path({str(script)!r}, run_name="__main__")
"""]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)


def test_download_weights_from_the_real_layout_succeeds_end_to_end(hub, tiny_weights, tmp_path):
    """script/download-weights with its default sources and pinned revisions, against a hub that holds
    exactly the real repositories' file names: the files land, verify, and nothing else is asked for."""
    dest = tmp_path / "weights"
    result = _download_weights(_hub_env(hub, tmp_path), dest, _with_tiny_manifests(tiny_weights, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"weights ready and verified in {dest}" in result.stdout
    assert hub.unknown == []
    assert _weight_files(dest) == set(weights_module.CONFIG_FILES) | {
        UNET, "text_encoder/model.fp16.safetensors", "vae/diffusion_pytorch_model.fp16.safetensors",
        "safety_checker/model.fp16.safetensors", "safety_checker/config.json",
    }
    assert "HTTP Request" not in result.stderr  # the hub client's chatter stays out of the output


def test_download_weights_checks_the_files_against_the_published_manifests(hub, tmp_path):
    """The same download with the packaged manifests: these bytes are not the published weights, and
    the sha256 check says so."""
    result = _download_weights(_hub_env(hub, tmp_path), tmp_path / "weights")
    assert result.returncode == 1
    assert "expected 1,731,933,536" in result.stderr or "expected 608,018,440" in result.stderr, result.stderr
    assert hub.unknown == []



def test_a_file_the_source_lacks_is_named_with_the_repository_revision_and_what_to_do(hub, tmp_path):
    """The bug this layout catches: asking the checker's repository for a name it does not have. Here
    the checker's source is pointed at the SD2 mirror, which has no safety_checker/ folder."""
    revision = "5f74973cbb64c8568780732c17f43eb269d63a0d"
    env = _hub_env(hub, tmp_path, INPAINT_SAFETY_REPO=SD2_REPO, INPAINT_SAFETY_REVISION=revision)
    result = _download_weights(env, tmp_path / "weights")
    assert result.returncode == 1
    error = result.stderr
    assert f"could not download safety_checker/config.json from {SD2_REPO} at revision {revision}" in error, error
    assert f"{SD2_REPO}/safety_checker/config.json" in hub.unknown  # the checker's two files, asked side by side
    assert set(hub.unknown) <= {f"{SD2_REPO}/{name}" for name in (weights_module.SAFETY_CONFIG, weights_module.SAFETY_WEIGHTS)}
    for remedy in ("check the network and HF_TOKEN", "INPAINT_SAFETY_REPO", "INPAINT_SAFETY_CHECKER=0"):
        assert remedy in error, error
    assert "Traceback" not in error


def test_a_missing_repository_is_a_clear_error_not_a_hang(hub, tmp_path):
    env = _hub_env(hub, tmp_path, INPAINT_WEIGHTS_REPO="test/no-such-repo")
    started = time.monotonic()
    result = _download_weights(env, tmp_path / "weights")
    assert result.returncode == 1
    assert "could not download model_index.json from test/no-such-repo at revision 5f74973c" in result.stderr
    assert "INPAINT_WEIGHTS_REPO" in result.stderr  # says what to change
    assert time.monotonic() - started < 30



@pytest.fixture
def hub_here(hub, tiny_weights, tmp_path, monkeypatch):
    """`hub` for download_checkpoint called in this process (mutation runs see only this process): the
    hub client's endpoint constants set as HF_ENDPOINT sets them at import, the packaged manifests and
    configs pointed at the tiny checkpoint's, and temporary folders (verify_weights' views) kept here."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    published, safety = _tiny_published(tiny_weights, tmp_path)
    monkeypatch.setattr(weights_module, "PACKAGE_MANIFEST", published)
    monkeypatch.setattr(weights_module, "SAFETY_MANIFEST", safety)
    monkeypatch.setattr(weights_module, "REFERENCE", tiny_weights)
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    return hub


def test_a_download_fetches_the_plan_verifies_every_file_each_time_and_leaves_no_view(hub_here, tmp_path, caplog):
    settings, dest = Settings(), tmp_path / "models" / "weights"  # its parent made too
    weight_files = [path for _, _, _, files in weights_module.download_plan(settings) for path in files if path.endswith(".safetensors")]
    for attempt in (1, 2):
        caplog.clear()
        requests = len(hub_here.requests)
        with caplog.at_level(logging.INFO, logger="inpaint.weights"):
            assert weights_module.download_checkpoint(settings, dest) == dest
        for prefix, repo, revision, files in weights_module.download_plan(settings):
            assert f"downloading {len(files)} files of {repo} at revision {revision} into {dest}" in caplog.messages
        # What it hands over is verified whole, though the first download's check is remembered.
        assert sorted(m.split()[3] for m in caplog.messages if m.startswith("verifying sha256 of ")) == sorted(weight_files)
        assert list((tmp_path / "tmp").iterdir()) == []  # the verified view was released
        if attempt == 2:
            assert not [r for r in hub_here.requests[requests:] if r.startswith("GET")]  # nothing fetched again
    assert _weight_files(dest) == set(weights_module.CONFIG_FILES) | set(weight_files) | {weights_module.SAFETY_CONFIG}
    assert hub_here.unknown == []


def test_a_download_without_the_checker_asks_its_source_for_nothing(hub_here, tmp_path):
    dest = tmp_path / "weights"
    weights_module.download_checkpoint(Settings(safety_checker=False), dest)
    assert not [r for r in hub_here.requests if SAFETY_REPO in r]
    assert not (dest / "safety_checker").exists()


def test_setup_downloads_into_an_empty_weights_folder_verifies_and_loads(hub_here, tmp_path, monkeypatch, caplog):
    """An empty weights/ is filled at setup from the default sources, checked against the manifests,
    then loaded; a second setup finds it and downloads nothing, though it checks it again."""
    from PIL import Image

    from inpaint.service import Inpainter

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # (setup sets Pillow's limit)
    settings = Settings(weights_dir=tmp_path / "models" / "weights")
    for attempt in (1, 2):
        requests = len(hub_here.requests)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="inpaint.weights"):
            folder = resolve_weights(None, settings)
        try:  # the published manifests are the anchor: the loaders read a view of the verified files
            assert folder.parent == tmp_path / "tmp" and (folder / UNET).resolve() == settings.weights_dir / UNET
        finally:
            release_view(folder)
        assert any(message.startswith("downloading ") for message in caplog.messages) == (attempt == 1)
        assert Inpainter.load(None, settings).safety is not None
        assert list((tmp_path / "tmp").iterdir()) == []
        if attempt == 1:
            assert (settings.weights_dir / weights_module.SAFETY_WEIGHTS).is_file()
    assert len(hub_here.requests) == requests  # the second setup found the weights: no download at all
    assert hub_here.unknown == []


def test_a_failed_download_stops_the_files_not_yet_started(hub_here, tmp_path, monkeypatch):
    """The first file that fails ends the download: the files still queued are not fetched (and the
    ones under way are waited for, so nothing writes into the folder after the error)."""
    revision, files = hub_here.repos[SD2_REPO]
    del files["model_index.json"]  # the first file of the plan is gone from the source
    release, finished = threading.Event(), []
    # every other file of the source waits (the one that fails answers at once) until the pool is shut down
    hub_here.hold = lambda path: (path.startswith(f"/{SD2_REPO}/resolve/") and not path.endswith("/model_index.json")
                                  and release.wait(30) and finished.append(path))

    class Pool(weights_module.ThreadPoolExecutor):
        def shutdown(self, wait=True, *, cancel_futures=False):
            super().shutdown(wait=False, cancel_futures=cancel_futures)  # whatever the code cancels, it cancels first
            release.set()  # then the files under way go on, whatever the machine's speed
            super().shutdown(wait=wait)

    monkeypatch.setattr(weights_module, "ThreadPoolExecutor", Pool)
    with pytest.raises(WeightsError, match="could not download model_index.json"):
        weights_module.download_checkpoint(Settings(), tmp_path / "weights")
    assert release.is_set() and finished  # the error came after the downloads under way were done
    asked = {r.split(f"/{SD2_REPO}/resolve/{revision}/")[1] for r in hub_here.requests if f"/{SD2_REPO}/resolve/" in r}
    plan = weights_module.download_plan(Settings())[0][3]
    # the four workers' first files, and perhaps the next that the failed file's worker took up at once
    assert asked in (set(plan[:4]), set(plan[:5])) and len(plan) > 5
    assert not [r for r in hub_here.requests if SAFETY_REPO in r]  # nor the next source


def test_a_compiled_folder_beside_the_weights_is_linked_into_the_view(hub_here, weights_copy):
    """Compiled parts shipped beside the checkpoint reach the loaders' view (fastpath/artifact.py checks them)."""
    view = verify_weights(weights_copy)
    try:
        assert not (view / weights_module.COMPILED).exists()
    finally:
        release_view(view)
    (weights_copy / weights_module.COMPILED).mkdir()
    view = verify_weights(weights_copy)
    try:
        link = view / weights_module.COMPILED
        assert link.is_symlink() and link.readlink() == (weights_copy / weights_module.COMPILED).resolve()
    finally:
        release_view(view)


def test_a_download_error_without_text_still_names_its_type():
    message = weights_module._download_failed("INPAINT_WEIGHTS", "a/b", "main", "model_index.json", TimeoutError(), Path("/w"))
    assert message.startswith("could not download model_index.json from a/b at revision main (TimeoutError: ); ")


def _failed_download(settings: Settings, dest: Path) -> tuple[str, BaseException]:
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(WeightsError) as error:
        weights_module.download_checkpoint(settings, dest)
    cause = error.value.__cause__
    assert isinstance(cause, HfHubHTTPError), cause  # the hub client's own error is kept as the cause
    return str(error.value), cause


def test_what_a_failed_download_says_whole(hub_here, tmp_path):
    """Each source's error names the first file that failed, the hub client's error (its type and first
    line) and what to change; the checker's adds the setting that runs without it."""
    dest = tmp_path / "weights"
    revision = Settings().weights_revision
    settings = Settings(safety_repo=SD2_REPO, safety_revision=revision)  # the SD2 mirror has no safety_checker/
    message, cause = _failed_download(settings, dest)
    reason = str(cause).strip().splitlines()[0]
    assert "\n" in str(cause).strip() and reason  # the hub's message has more lines; only the first is shown
    assert message == (
        f"could not download {weights_module.SAFETY_CONFIG} from {SD2_REPO} at revision {revision} "
        f"({type(cause).__name__}: {reason}); check the network and HF_TOKEN, or set INPAINT_SAFETY_REPO and "
        "INPAINT_SAFETY_REVISION to a source that holds it (with a matching manifest in inpaint/), or turn the "
        "safety checker off with INPAINT_SAFETY_CHECKER=0"
    )
    dest = tmp_path / "other"  # (the first folder holds the SD2 files now: the hub client would not ask for them)
    message, cause = _failed_download(Settings(weights_repo="test/no-such-repo"), dest)
    assert message == (
        f"could not download model_index.json from test/no-such-repo at revision {revision} "
        f"({type(cause).__name__}: {str(cause).strip().splitlines()[0]}); check the network and HF_TOKEN, or set "
        "INPAINT_WEIGHTS_REPO and INPAINT_WEIGHTS_REVISION to a source that holds it (with a matching manifest in "
        f"inpaint/), or put the checkpoint in {dest}"
    )


def test_write_manifest_hashes_every_file_but_itself_and_hidden_ones_in_a_stable_form(tmp_path):
    """The bytes are what a deployment pins (INPAINT_WEIGHTS_MANIFEST_SHA256), so their form is fixed:
    sorted paths, two-space JSON, a newline at the end."""
    folder = tmp_path / "checkpoint"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.safetensors").write_bytes(bytes(range(256)) * 5)
    (folder / "model_index.json").write_text('{"a": 1}')
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "model_index.json.metadata").write_text("hub client's bookkeeping")
    (folder / ".lock").write_text("")
    (folder / "weights-sha256.json").write_text("an earlier manifest")
    pin = weights_module.write_manifest(folder, "made here")
    data = (folder / "weights-sha256.json").read_bytes()
    assert data.decode() == json.dumps({
        "_source": "made here",
        "model_index.json": {"sha256": hashlib.sha256(b'{"a": 1}').hexdigest(), "size": 8},
        "unet/weights.safetensors": {"sha256": hashlib.sha256(bytes(range(256)) * 5).hexdigest(), "size": 1280},
    }, indent=2) + "\n"
    assert pin == hashlib.sha256(data).hexdigest() == manifest_pin(folder)

FIX = "run script/download-weights (or set COG_WEIGHTS to a folder or URL holding the checkpoint)"


def test_what_a_missing_file_error_says_whole(weights_copy):
    """The error names the file, says whether it is a weight file, and for the checker's files adds the
    setting that runs without them."""
    pin = manifest_pin(weights_copy)
    (weights_copy / "safety_checker" / "config.json").unlink()
    with pytest.raises(WeightsError) as error:
        verify_weights(weights_copy, pin=pin)
    assert str(error.value) == (f"file safety_checker/config.json is missing from {weights_copy}; {FIX}"
                                " (or set INPAINT_SAFETY_CHECKER=0 to run without the checker)")
    (weights_copy / "unet" / "diffusion_pytorch_model.fp16.safetensors").unlink()
    with pytest.raises(WeightsError) as error:
        verify_weights(weights_copy, pin=pin, safety_checker=False)
    assert str(error.value) == f"weight file unet/diffusion_pytorch_model.fp16.safetensors is missing from {weights_copy}; {FIX}"


def test_each_file_hashed_is_logged_with_its_size_and_the_stamp_is_private(weights_copy, caplog):
    pin = manifest_pin(weights_copy)
    with caplog.at_level(logging.INFO, logger="inpaint.weights"):
        verify_weights(weights_copy, pin=pin)
    size = (weights_copy / UNET).stat().st_size
    assert f"verifying sha256 of {UNET} ({size / 1e6:.0f} MB)" in caplog.messages
    assert sum(message.startswith("verifying sha256 of ") for message in caplog.messages) == len(
        [entry for entry in json.loads((weights_copy / "weights-sha256.json").read_text()).values() if isinstance(entry, dict)])
    (stamp,) = (Path(os.environ["XDG_CACHE_HOME"]) / "inpaint" / "verified").glob("*.json")
    assert stat.S_IMODE(stamp.parent.stat().st_mode) == 0o700
    assert not list(stamp.parent.glob(".stamp-*"))  # written through a temporary file beside it, then renamed


def test_a_redirect_to_another_https_url_is_followed(weights_copy, tiny_settings, https):
    """The hub answers a file's URL with a redirect to its CDN: an https redirect is followed."""
    https.routes["/weights.tar.gz"] = (200, {}, tar_of(weights_copy))
    https.routes["/moved.tar.gz"] = (302, {"Location": f"{https.url}/weights.tar.gz"}, b"")
    folder = resolve_weights(f"{https.url}/moved.tar.gz", tiny_settings)
    assert (folder / UNET).read_bytes() == (weights_copy / UNET).read_bytes()
    assert https.requests == ["/moved.tar.gz", "/weights.tar.gz"]


def test_the_download_cap_counts_every_byte_up_to_the_last(tiny_settings, https):
    """A plain tar of one 5,000-byte file is 10,240 bytes on the wire (tar's records): a cap of 10,240
    lets it through (it then holds no checkpoint), a cap of 10,239 stops the download."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        member = tarfile.TarInfo("checkpoint/notes.txt")
        member.size = 5000
        tar.addfile(member, io.BytesIO(b"x" * 5000))
    assert len(buffer.getvalue()) == 10240
    https.routes["/small.tar"] = (200, {}, buffer.getvalue())
    url = f"{https.url}/small.tar"
    at_cap = Settings(weights_manifest_sha256=tiny_settings.weights_manifest_sha256, weights_archive_max_bytes=10240)
    with pytest.raises(WeightsError) as error:
        resolve_weights(url, at_cap)
    assert str(error.value) == f"the archive COG_WEIGHTS={url} holds no model_index.json"
    under = Settings(weights_manifest_sha256=tiny_settings.weights_manifest_sha256, weights_archive_max_bytes=10239)
    with pytest.raises(WeightsError) as error:
        resolve_weights(f"{https.url}/small.tar?again", under)
    assert str(error.value) == (f"the weights archive {https.url}/small.tar (query hidden) is over 10,239 bytes "
                                "(INPAINT_WEIGHTS_ARCHIVE_MAX_BYTES)")


def test_the_default_archive_cap_is_the_published_checkpoint_and_a_fifth_plus_16_mib():
    """docs/weights.md: 1.2x the published checkpoint with its safety checker, 3.8 GB (and 16 MiB for the
    configs and tokenizer), from the published sizes of the fp16 files."""
    from inpaint.weights import archive_cap

    published = {**json.loads(PACKAGE_MANIFEST.read_text()), **json.loads(SAFETY_MANIFEST.read_text())}
    fp16 = [entry["size"] for name, entry in published.items() if name.endswith(".fp16.safetensors")]
    assert len(fp16) == 4
    assert archive_cap(Settings()) == int(sum(fp16) * 1.2) + 16 * 1024 * 1024
    assert round(archive_cap(Settings()) / 1e9, 1) == 3.8
    assert archive_cap(Settings(weights_archive_max_bytes=12345)) == 12345


def test_what_the_own_manifests_errors_and_warning_say_whole(weights_copy, caplog):
    manifest_path = weights_copy / "weights-sha256.json"
    pin = manifest_pin(weights_copy)
    kept = weights_copy.parent / "kept.json"
    manifest_path.rename(kept)
    manifest_path.symlink_to(kept)  # a link is not the folder's own file
    with pytest.raises(WeightsError) as error:
        verify_weights(weights_copy, pin=pin)
    assert str(error.value) == (f"INPAINT_WEIGHTS_MANIFEST_SHA256 is set, but {weights_copy} has no weights-sha256.json; "
                                "unset it to verify against the published checkpoint's manifest")
    manifest_path.unlink()
    manifest = json.loads(kept.read_text())
    with caplog.at_level(logging.WARNING, logger="inpaint.weights"):
        manifest_path.write_text(json.dumps(manifest))
        with pytest.raises(WeightsError):
            verify_weights(weights_copy)
    assert caplog.messages[0] == (f"weights-sha256.json in {weights_copy} is ignored: a folder's own manifest counts only "
                                  "when the deployment pins its sha256 in INPAINT_WEIGHTS_MANIFEST_SHA256; verifying "
                                  "against the published checkpoint's")
    for name in ("model_index.json", "safety_checker/config.json"):
        del manifest[name]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(WeightsError) as error:
        verify_weights(weights_copy, pin=manifest_pin(weights_copy))
    assert str(error.value) == (f"weights-sha256.json in {weights_copy} does not list model_index.json, "
                                "safety_checker/config.json: an own manifest must hash every file the model reads "
                                "(write it with inpaint.weights.write_manifest)")


def test_an_own_manifest_without_the_checker_need_not_list_its_config(weights_copy):
    """The checker's config is required in an own manifest only beside the checker's weights."""
    shutil.rmtree(weights_copy / "safety_checker")
    manifest = json.loads((weights_copy / "weights-sha256.json").read_text())
    for name in [name for name in manifest if name.startswith("safety_checker/")]:
        del manifest[name]
    (weights_copy / "weights-sha256.json").write_text(json.dumps(manifest))
    assert verify_weights(weights_copy, pin=manifest_pin(weights_copy), safety_checker=False) == weights_copy


def test_a_linked_model_index_is_refused_and_each_folder_is_checked_without_the_checkers(weights_copy):
    pin = manifest_pin(weights_copy)
    index = weights_copy / "model_index.json"
    index.rename(weights_copy.parent / "model_index.json")
    index.symlink_to(weights_copy.parent / "model_index.json")
    with pytest.raises(WeightsError) as error:
        verify_weights(weights_copy, pin=pin)
    assert str(error.value) == f"model_index.json in {weights_copy} is a link; the weights folder may hold only regular files"
    index.unlink()
    (weights_copy.parent / "model_index.json").rename(index)
    shutil.rmtree(weights_copy / "safety_checker")  # the folders after it in the order are still checked
    (weights_copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(WeightsError, match="unet/diffusion_pytorch_model.bin in .* is not a file this model loads"):
        verify_weights(weights_copy, pin=pin, safety_checker=False)


def test_releasing_a_folder_that_is_not_a_view_leaves_it(tmp_path):
    """release_view removes only its own views; a user's folder in the temporary directory stays."""
    import tempfile

    user = Path(tempfile.mkdtemp(prefix="my-weights-"))
    nested = tmp_path / (weights_module.VIEW_PREFIX + "x")  # named like a view, but not in the temporary directory
    nested.mkdir()
    try:
        release_view(user)
        release_view(nested)
        assert user.is_dir() and nested.is_dir()
    finally:
        shutil.rmtree(user)


def test_an_archive_of_a_folders_contents_unpacks_at_its_top(weights_copy, tiny_settings, https):
    """`tar -C weights -czf weights.tar.gz .`: model_index.json at the top of the archive, not in a subfolder."""
    https.routes["/flat.tar.gz"] = (200, {}, tar_of(weights_copy, arcname="."))
    folder = resolve_weights(f"{https.url}/flat.tar.gz", tiny_settings)
    assert (folder / UNET).read_bytes() == (weights_copy / UNET).read_bytes()


def test_a_member_that_climbs_out_of_the_folder_is_refused(tiny_settings, https, tmp_path):
    """A regular file named ../ would be written outside the unpacking folder: tar's "data" filter refuses
    it. An absolute name loses its leading slash and stays inside. Nothing lands outside either way."""
    for name in ("checkpoint/../../escaped.txt", f"{tmp_path}/escaped-absolute.txt"):
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w") as tar:
            member = tarfile.TarInfo(name)
            member.size = 4
            tar.addfile(member, io.BytesIO(b"evil"))
        https.routes[f"/climb-{len(name)}.tar"] = (200, {}, buffer.getvalue())
        url = f"{https.url}/climb-{len(name)}.tar"
        expected = (r"could not fetch the weights archive COG_WEIGHTS=.*/climb-\d+.tar \('checkpoint/../../escaped.txt' would "
                    r"be extracted to '.*', which is outside the destination\)" if ".." in name else "holds no model_index.json")
        with pytest.raises(WeightsError, match=expected):
            resolve_weights(url, tiny_settings)
    cache = Path(os.environ["XDG_CACHE_HOME"])
    assert not list(cache.parent.glob("escaped*")) and not (tmp_path / "escaped-absolute.txt").exists()
    assert len(list(cache.rglob("escaped*"))) == 1  # the absolute one, inside its unpacked folder


def test_the_member_and_unpacked_limits_hold_up_to_their_last_unit(tiny_settings, https):
    """1,000 members and a cap reached exactly pass those checks (and then hold no checkpoint); one more
    member, or a cap one byte lower, is refused."""
    many = io.BytesIO()
    with tarfile.open(fileobj=many, mode="w") as tar:
        for index in range(1000):
            tar.addfile(tarfile.TarInfo(f"checkpoint/junk-{index}"), io.BytesIO(b""))
    https.routes["/thousand.tar"] = (200, {}, many.getvalue())
    with pytest.raises(WeightsError, match="holds no model_index.json"):
        resolve_weights(f"{https.url}/thousand.tar", tiny_settings)
    packed = io.BytesIO()
    with tarfile.open(fileobj=packed, mode="w:gz") as tar:
        for index, size in enumerate((3000, 2000)):
            member = tarfile.TarInfo(f"checkpoint/part-{index}")
            member.size = size
            tar.addfile(member, io.BytesIO(bytes(size)))
    https.routes["/five.tar.gz"] = (200, {}, packed.getvalue())
    pin = tiny_settings.weights_manifest_sha256
    with pytest.raises(WeightsError, match="holds no model_index.json"):
        resolve_weights(f"{https.url}/five.tar.gz", Settings(weights_manifest_sha256=pin, weights_archive_max_bytes=5000))
    with pytest.raises(WeightsError) as error:
        resolve_weights(f"{https.url}/five.tar.gz?again", Settings(weights_manifest_sha256=pin, weights_archive_max_bytes=4999))
    assert str(error.value) == (f"the weights archive {https.url}/five.tar.gz (query hidden) unpacks to over 4,999 bytes "
                                "(INPAINT_WEIGHTS_ARCHIVE_MAX_BYTES)")


def test_an_archive_mended_at_the_same_url_is_fetched_again_and_a_broken_one_leaves_nothing(weights_copy, tiny_settings,
                                                                                           https, caplog):
    """The archive at a URL first holds no checkpoint, then arrives cut short, then whole: each try downloads
    it again, a broken one leaves no partial folder, and the whole one replaces what the first left."""
    cache = Path(os.environ["XDG_CACHE_HOME"]) / "inpaint"
    url, shown = f"{https.url}/weights.tar?X-Amz-Signature=secret", f"{https.url}/weights.tar (query hidden)"
    notes = io.BytesIO()
    with tarfile.open(fileobj=notes, mode="w") as tar:
        tar.addfile(tarfile.TarInfo("notes.txt"), io.BytesIO(b""))
    https.routes["/weights.tar"] = (200, {}, notes.getvalue())
    with caplog.at_level(logging.INFO, logger="inpaint.weights"), pytest.raises(WeightsError) as error:
        resolve_weights(url, tiny_settings)
    assert str(error.value) == f"the archive COG_WEIGHTS={shown} holds no model_index.json"
    assert caplog.messages == [f"downloading weights archive {shown}"]
    whole = tar_of(weights_copy)
    https.routes["/weights.tar"] = (200, {}, whole[: len(whole) // 2])
    with pytest.raises(WeightsError, match=r"could not fetch the weights archive COG_WEIGHTS=https://127\.0\.0\.1:\d+/weights\.tar \(query hidden\)"):
        resolve_weights(url, tiny_settings)
    assert not list(cache.glob("weights-*"))  # the partial unpack was removed
    https.routes["/weights.tar"] = (200, {}, whole)
    folder = resolve_weights(url, tiny_settings)
    assert (folder / UNET).read_bytes() == (weights_copy / UNET).read_bytes()
    assert len(https.requests) == 3


def test_cog_weights_without_the_checker_files_load_only_with_the_checker_off(weights_copy, tiny_settings):
    manifest = json.loads((weights_copy / "weights-sha256.json").read_text())
    shutil.rmtree(weights_copy / "safety_checker")
    pin = manifest_pin(weights_copy)
    assert manifest_pin(weights_copy) == pin and "safety_checker/config.json" in manifest
    with pytest.raises(WeightsError, match="safety_checker/config.json is missing"):
        resolve_weights(str(weights_copy), Settings(weights_manifest_sha256=pin))
    assert resolve_weights(str(weights_copy), Settings(weights_manifest_sha256=pin, safety_checker=False)) == weights_copy


def test_the_cache_is_under_xdg_cache_home_else_home_dot_cache(monkeypatch, tmp_path):
    """The XDG Base Directory Specification's rule: $XDG_CACHE_HOME; $HOME/.cache when it is "either not set or
    empty", and when it is relative ("All paths set in these environment variables must be absolute. If an
    implementation encounters a relative path in any of these variables it should consider the path invalid
    and ignore it"), not the working folder."""
    from inpaint.weights import cache_root

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "inpaint"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    for unusable in ("", "cache", "./cache"):
        monkeypatch.setenv("XDG_CACHE_HOME", unusable)
        assert cache_root() == tmp_path / "home" / ".cache" / "inpaint", unusable
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == tmp_path / "home" / ".cache" / "inpaint"
