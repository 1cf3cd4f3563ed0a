"""The llama-server build cache (bench/peer.py): where it lives, and when a build is reused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenfan.bench import peer


def _fake_build(build: peer.PeerBuild, options: list[str] | None = None) -> None:
    for target in peer.TARGETS:
        build.binary(target).parent.mkdir(parents=True, exist_ok=True)
        build.binary(target).write_text("")
    stamp = {"options": list(peer.CMAKE_OPTIONS) if options is None else options, "build_seconds": 12.5}
    (build.root / peer.STAMP).write_text(json.dumps(stamp))


def test_the_cache_follows_xdg_cache_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert peer.cache_root() == tmp_path / "tokenfan"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert peer.cache_root() == tmp_path / "home" / ".cache" / "tokenfan"


def test_one_build_folder_per_version(tmp_path: Path) -> None:
    build = peer.PeerBuild("1.2.3", tmp_path)
    assert build.binary() == tmp_path / "llama-server" / "1.2.3" / "build" / "bin" / "llama-server"
    assert build.source == tmp_path / "sdist" / "llama_cpp_python-1.2.3" / "vendor" / "llama.cpp"


def test_a_finished_build_is_reused_without_running_anything(tmp_path: Path) -> None:
    build = peer.PeerBuild("1.2.3", tmp_path)  # no source and no cmake here: a build attempt would fail
    assert not build.built()
    _fake_build(build)
    assert build.built()
    assert build.ensure() == build.binary()
    assert build.build_seconds() == 12.5


def test_a_build_with_other_options_or_a_missing_binary_is_not_reused(tmp_path: Path) -> None:
    build = peer.PeerBuild("1.2.3", tmp_path)
    _fake_build(build, options=["-DGGML_NATIVE=OFF"])
    assert not build.built()
    _fake_build(build)
    build.binary("llama-batched-bench").unlink()
    assert not build.built()
