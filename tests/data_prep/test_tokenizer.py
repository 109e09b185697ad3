"""Tokenizer resolution: user path, tiktoken's cache key, the whisper-sdist fallback (against a
fake sdist built here, through the real pip, with no index), errors."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
import tarfile
import time

import pytest

from data_prep import tokenizer
from data_prep.tokenizer import TokenizerError


def test_user_path_matches_tiktoken_built_directly(ranks_file, reference_encoding):
    enc = tokenizer.load(str(ranks_file))
    text = "The naïve café teacher, 東京 1999 <|endoftext|> don't  stop\n\n"
    assert enc.encode_ordinary(text) == reference_encoding.encode_ordinary(text)
    spec = tokenizer.resolve(str(ranks_file))
    assert spec.eot_id == reference_encoding.eot_token == spec.n_vocab - 1
    assert spec.dtype == "uint16"
    assert spec.ranks_sha256 == hashlib.sha256(ranks_file.read_bytes()).hexdigest()


def test_encode_to_numpy_is_ordinary_encoding(ranks_file):
    """Staging uses encode_to_numpy(disallowed_special=()): special-token text stays text."""
    enc = tokenizer.load(str(ranks_file))
    text = "a <|endoftext|> b"
    assert enc.encode_to_numpy(text, disallowed_special=()).tolist() == enc.encode_ordinary(text)
    assert enc.eot_token not in enc.encode_ordinary(text)


def test_large_vocab_uses_uint32(tmp_path, helpers):
    ranks = {bytes([i]): i for i in range(256)}
    for a in range(256):
        for b in range(256):
            ranks[bytes([a, b])] = len(ranks)
    spec = tokenizer.resolve(str(helpers.write_ranks(tmp_path / "big.tiktoken", ranks)))
    assert spec.n_vocab == 256 + 65536 + 1 and spec.dtype == "uint32"


def test_unknown_name_lists_choices():
    with pytest.raises(TokenizerError, match="unknown tokenizer 'gpt5_base'.*r50k_base"):
        tokenizer.resolve("gpt5_base")


def test_missing_and_malformed_files_are_named(tmp_path):
    with pytest.raises(TokenizerError, match="nope.tiktoken"):
        tokenizer.resolve(str(tmp_path / "nope.tiktoken"))
    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"YQ== 0\nnot-base64!! x\n")
    with pytest.raises(TokenizerError, match="bad.tiktoken: line 2"):
        tokenizer.resolve(str(bad))


def test_cache_key_is_the_one_tiktoken_reads(tmp_path, monkeypatch):
    """What the fallback writes under _cache_path(url) is what tiktoken's cache serves."""
    from tiktoken.load import read_file_cached

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    url = "https://example.invalid/encodings/x.tiktoken"
    tokenizer._cache_path(url).write_bytes(b"cached")
    assert read_file_cached(url) == b"cached"


def _fake_sdist(directory, payload: bytes, name="openai_whisper-20990101"):
    """A minimal sdist that pip can prepare offline (setuptools, no build isolation)."""
    files = {
        f"{name}/pyproject.toml": b'[build-system]\nrequires = ["setuptools"]\n'
                                  b'build-backend = "setuptools.build_meta"\n'
                                  b'[project]\nname = "openai-whisper"\nversion = "20990101"\n',
        f"{name}/PKG-INFO": b"Metadata-Version: 2.1\nName: openai-whisper\nVersion: 20990101\n",
        f"{name}/whisper/__init__.py": b"",
        f"{name}/whisper/assets/gpt2.tiktoken": payload,
    }
    path = directory / f"{name}.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _pip_offline(index_dir) -> tuple[str, ...]:
    return ("--no-index", "--find-links", str(index_dir), "--no-build-isolation")


@pytest.fixture
def offline_pip(monkeypatch, tmp_path):
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")  # no index from the machine's pip.conf
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "cache"))
    if subprocess.run([sys.executable, "-c", "import setuptools"]).returncode:
        pytest.skip("setuptools is needed to prepare the fake sdist without build isolation")
    index = tmp_path / "index"
    index.mkdir()
    return index


@pytest.mark.timeout(120)
def test_whisper_fallback_fetches_verifies_and_caches(offline_pip, ranks_file):
    payload = ranks_file.read_bytes()
    _fake_sdist(offline_pip, payload)
    url = "https://example.invalid/r50k_base.tiktoken"
    cached = tokenizer.fetch_whisper_ranks(
        expected_sha256=hashlib.sha256(payload).hexdigest(), url=url,
        pip_args=_pip_offline(offline_pip))
    assert cached == tokenizer._cache_path(url) and cached.read_bytes() == payload


@pytest.mark.timeout(120)
def test_whisper_fallback_rejects_a_wrong_hash(offline_pip):
    _fake_sdist(offline_pip, b"YQ== 0\n")
    url = "https://example.invalid/r50k_base.tiktoken"
    with pytest.raises(TokenizerError, match="expected 00000"):
        tokenizer.fetch_whisper_ranks(expected_sha256="0" * 64, url=url,
                                      pip_args=_pip_offline(offline_pip))
    assert not tokenizer._cache_path(url).exists()


@pytest.mark.timeout(120)
def test_whisper_fallback_explains_when_pip_fails(offline_pip):
    t0 = time.perf_counter()
    with pytest.raises(TokenizerError, match="pass its path as the tokenizer"):
        tokenizer.fetch_whisper_ranks(url="https://example.invalid/x",
                                      pip_args=_pip_offline(offline_pip))
    assert time.perf_counter() - t0 < 60


def test_r50k_resolution_order_cache_then_whisper(tmp_path, monkeypatch, ranks_file):
    """No cache and tiktoken's host unreachable: r50k_base comes from the whisper fallback,
    whose file lands in the cache; fetch=False (verify, inspect) never goes past the cache."""
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    with pytest.raises(TokenizerError, match="r50k_base is not in tiktoken's cache"):
        tokenizer.resolve("r50k_base", fetch=False)
    calls = []

    def fake_fetch(**kwargs):
        calls.append(kwargs)
        target = tokenizer._cache_path(tokenizer.R50K_URL)
        target.write_bytes(ranks_file.read_bytes())
        return target

    monkeypatch.setattr(tokenizer, "_reachable", lambda url, timeout=2.0: False)
    monkeypatch.setattr(tokenizer, "fetch_whisper_ranks", fake_fetch)
    spec = tokenizer.resolve("r50k_base")
    assert len(calls) == 1 and spec.name == "r50k_base"
    assert spec.ranks_sha256 == hashlib.sha256(ranks_file.read_bytes()).hexdigest()
    assert tokenizer._cache_path(tokenizer.R50K_URL).is_file()
