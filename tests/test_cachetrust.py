"""The compile cache is code: a planted or tampered file is refused before anything is unpickled, and
kept; folders that others could write are not used."""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

from inpaint import cachetrust
from inpaint.fastpath import compiler
from inpaint.fastpath.compiler import CompiledPart, Compiler
from inpaint.fastpath.keys import ShapeKey
from inpaint.cachetrust import Seal, UntrustedCache


class Planted:
    """What an attacker would leave in a shared cache: unpickling it runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def unet(tiny_weights):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(tiny_weights / "unet", variant="fp16", dtype=torch.float32,
                                                use_safetensors=True, local_files_only=True).eval()


@pytest.fixture
def cache(tmp_path) -> Path:
    return cachetrust.private_folder(tmp_path / "compiled")


def _key(unet) -> ShapeKey:
    sample = torch.zeros(2, unet.config.in_channels, 8, 8)
    with torch.inference_mode():
        return ShapeKey.of(sample, torch.tensor(500), torch.zeros(2, 77, unet.config.cross_attention_dim))


def test_a_planted_compiled_part_is_never_unpickled_and_is_kept(unet, tmp_path, caplog, monkeypatch):
    cache = tmp_path / "compiled"
    worker = CompiledPart(unet, "unet", Compiler(), cache)
    key = _key(unet)
    path = worker.path(key)
    marker = tmp_path / "ran"
    payload = pickle.dumps(Planted(marker))
    path.write_bytes(payload)
    path.with_name(path.name + cachetrust.SEAL_SUFFIX).write_text("0" * 64)  # a forged seal
    with pytest.raises(UntrustedCache, match="does not match its seal"):
        worker.load(path)

    def no_compile(*args):
        raise RuntimeError("compiling is not what this test is about")

    monkeypatch.setattr(worker.compiler, "compile_in_child", no_compile)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath.compiler"):
        worker.work(key)
    assert not marker.exists()
    (aside,) = cache.glob(f"{path.name}.rejected-*[0-9]")
    assert aside.read_bytes() == payload  # moved aside, not deleted
    assert "does not match its seal" in caplog.text and f"moved aside to {aside.name}" in caplog.text
    assert worker.sources[key] == "failed"


def test_a_part_with_no_seal_is_refused(cache):
    seal = Seal(cache)
    part = seal.folder / "unet-abc.aot"
    part.write_bytes(b"anything")
    with pytest.raises(UntrustedCache, match="has no seal"):
        seal.read(part)
    seal.seal(part)
    assert seal.read(part) == b"anything"
    part.write_bytes(b"anything else")
    with pytest.raises(UntrustedCache, match="does not match its seal"):
        seal.read(part)


def test_the_deployments_secret_keys_the_seals(cache):
    (cache / "part.aot").write_bytes(b"compiled code")
    Seal(cache, "deployment secret").seal(cache / "part.aot")
    assert Seal(cache, "deployment secret").read(cache / "part.aot") == b"compiled code"
    for other in (Seal(cache, "another secret"), Seal(cache)):  # the folder's own key is another one too
        with pytest.raises(UntrustedCache):
            other.read(cache / "part.aot")
    assert (cache / cachetrust.KEY_NAME).stat().st_mode & 0o777 == 0o600


def test_the_cache_folder_is_made_private_and_one_others_can_write_is_not_used(unet, tmp_path, caplog):
    made = cachetrust.private_folder(tmp_path / "new" / "compiled")
    assert made.stat().st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath.compiler"):
        worker = CompiledPart(unet, "unet", Compiler(), shared)
    assert worker.cache_dir != shared and worker.cache_dir.name.startswith("inpaint-compiled-")
    assert "has mode 777: writable by others" in caplog.text and "kept for this process only" in caplog.text


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a folder to another user")
def test_a_cache_folder_of_another_user_is_not_used(tmp_path):
    folder = tmp_path / "theirs"
    folder.mkdir(mode=0o700)
    os.chown(folder, 12345, -1)
    with pytest.raises(UntrustedCache, match="belongs to user 12345"):
        cachetrust.private_folder(folder)


def test_links_in_the_cache_are_refused(cache, tmp_path):
    (tmp_path / "elsewhere.aot").write_bytes(b"x")
    (cache / "part.aot").symlink_to(tmp_path / "elsewhere.aot")
    with pytest.raises(UntrustedCache, match="is a link"):
        Seal(cache).read(cache / "part.aot")


def test_inductors_cache_is_used_only_as_sealed(tmp_path, monkeypatch, caplog):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = cachetrust.private_folder(tmp_path / "compiled")
    seal = Seal(folder)
    inductor = folder / "inductor"
    (inductor / "kernels").mkdir(parents=True)
    (inductor / "kernels" / "k.py").write_text("print('a kernel')")
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    with caplog.at_level(logging.WARNING, logger="inpaint.fastpath.compiler"):
        compiler._keep_inductor_cache_in(inductor, seal)  # no seal: moved aside, a new empty one
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(inductor)
    assert list(inductor.iterdir()) == []
    (aside,) = folder.glob("inductor.rejected-*")
    assert caplog.messages == [f"Inductor's cache {inductor} not used (inductor has no seal (inductor.seal.json)); moved aside to "
                               f"{aside.name}, starting an empty one"]
    assert (aside / "kernels" / "k.py").read_text() == "print('a kernel')"

    (inductor / "k.py").write_text("print('a kernel')")
    compiler._seal_inductor_cache(seal)
    seal.check_tree(inductor)  # as sealed
    (inductor / "planted.py").write_text("import os; os.system('touch /tmp/pwned')")
    with pytest.raises(UntrustedCache, match="holds files that its seal does not list"):
        seal.check_tree(inductor)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    compiler._keep_inductor_cache_in(inductor, seal)
    assert not (inductor / "planted.py").exists()
    assert len(list(folder.glob("inductor.rejected-*"))) == 2


def test_inductors_cache_goes_beside_the_compiled_parts_unless_the_deployment_chose_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    seal = Seal(cachetrust.private_folder(tmp_path))
    for before in (None, default_cache_dir()):  # unset, or the default torch itself set on import
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        compiler._keep_inductor_cache_in(tmp_path / "inductor", seal)
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/srv/chosen")
    compiler._keep_inductor_cache_in(tmp_path / "inductor", seal)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/srv/chosen"


def test_only_the_inductor_cache_beside_the_parts_is_sealed_never_one_the_deployment_chose(tmp_path, monkeypatch):
    folder = cachetrust.private_folder(tmp_path / "compiled")
    seal = Seal(folder)
    chosen = tmp_path / "deployment" / "inductor"
    chosen.mkdir(parents=True)
    (chosen / "k.py").write_text("print('a kernel')")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(chosen))
    compiler._seal_inductor_cache(seal)
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    compiler._seal_inductor_cache(seal)  # unset: none chosen by this process either
    assert sorted(path.name for path in (tmp_path / "deployment").iterdir()) == ["inductor"]  # no seal written beside it


def test_an_inductor_cache_folder_set_empty_is_no_choice_and_the_sealed_one_is_used(tmp_path, monkeypatch):
    """TORCHINDUCTOR_CACHE_DIR="" (a deployment's blank setting) chooses no folder: Inductor itself fails on it
    (os.makedirs("")), so the compiled parts' own sealed cache is used, as when it is unset."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    with pytest.raises(FileNotFoundError):
        cache_dir()
    folder = cachetrust.private_folder(tmp_path / "compiled")
    compiler._keep_inductor_cache_in(folder / "inductor", Seal(folder))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder / "inductor") == cache_dir()


def test_a_sealed_inductor_cache_is_refused_when_a_file_changes_in_place_or_its_seal_is_forged(cache):
    seal = Seal(cache)
    inductor = cache / "inductor"
    inductor.mkdir()
    (inductor / "k.py").write_text("print('a kernel')")
    with pytest.raises(UntrustedCache, match="inductor has no seal"):
        seal.check_tree(inductor)
    seal.seal_tree(inductor)
    seal.check_tree(inductor)
    (inductor / "k.py").write_text("print('a kernel')  # and more")  # same name, new bytes
    with pytest.raises(UntrustedCache, match="holds files that its seal does not list, or changed ones"):
        seal.check_tree(inductor)
    record = inductor.with_name("inductor" + cachetrust.TREE_SEAL_SUFFIX)
    Seal(cache, "another deployment").seal_tree(inductor)  # a list that matches, signed with another key
    with pytest.raises(UntrustedCache, match="was not signed by this deployment"):
        seal.check_tree(inductor)
    record.write_text("not json")
    with pytest.raises(UntrustedCache, match="inductor.seal.json is not a seal"):
        seal.check_tree(inductor)


def test_a_folder_key_others_can_read_is_refused_and_a_folder_others_can_only_read_is_used(cache):
    Seal(cache)  # writes the folder's key, 0600
    key = cache / cachetrust.KEY_NAME
    assert Seal(cache).key == key.read_bytes()
    for mode in (0o640, 0o604):
        key.chmod(mode)
        with pytest.raises(UntrustedCache, match=f"has mode {mode:o}: readable by others"):
            Seal(cache)
    key.chmod(0o600)
    shared = cache / "readable"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)  # others may read and enter a cache folder, and run nothing from it by that alone
    cachetrust.check_private(shared)
    for mode in (0o775, 0o757):
        shared.chmod(mode)
        with pytest.raises(UntrustedCache, match=f"has mode {mode:o}: writable by others"):
            cachetrust.check_private(shared)
    with pytest.raises(UntrustedCache, match=r"missing cannot be read \(No such file or directory\)"):
        cachetrust.check_private(cache / "missing")


def test_a_private_write_renames_a_file_beside_its_target_and_leaves_nothing_when_it_fails(cache, monkeypatch):
    renamed = []
    replace = os.replace

    def recorded(source, target):
        renamed.append(Path(source))
        replace(source, target)

    monkeypatch.setattr(cachetrust.os, "replace", recorded)
    cachetrust.write_private(cache / "part.aot.hmac", b"seal")
    assert (cache / "part.aot.hmac").read_bytes() == b"seal"
    assert (cache / "part.aot.hmac").stat().st_mode & 0o777 == 0o600
    (partial,) = renamed  # in the same folder, so that the rename is atomic: a reader sees all of it or none
    assert partial.parent == cache and partial.name.startswith(".part.aot.hmac.partial-")

    def full(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cachetrust.os, "replace", full)
    with pytest.raises(OSError, match="No space left on device"):
        cachetrust.write_private(cache / "other.aot.hmac", b"seal")
    assert [path.name for path in cache.iterdir()] == ["part.aot.hmac"]
