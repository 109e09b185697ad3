"""Tokenizer resolution: a name or a ranks file -> a ``tiktoken.Encoding`` and its identity.

Staging must be reproducible and must work on clusters that reach a package mirror but nothing
else, so the GPT-2 BPE (``r50k_base``, 50257 ids, EOT 50256) is resolved in this order
(ARCHITECTURE.md section 6):

1. a path given by the user: a ranks file in tiktoken's format (``base64(token) rank`` per
   line). A file whose sha256 is a known encoding's becomes that encoding (name, pattern, special
   tokens); any other file gets the GPT-2 split pattern and ``<|endoftext|>`` as the id after
   its last rank;
2. tiktoken's cache (``TIKTOKEN_CACHE_DIR``), read by tiktoken itself;
3. tiktoken's download (for ``r50k_base`` only tried when its host answers within 2 s, so an
   offline box does not wait);
4. the same ranks file inside the ``openai-whisper`` sdist on the package index
   (``whisper/assets/gpt2.tiktoken``), fetched with pip, verified by sha256 and written into
   tiktoken's cache under the key tiktoken looks for, so step 2 finds it next time.

The ranks sha256 is recorded in the manifest: it is the hash of the canonical tiktoken file
(ranks sorted, one ``base64 rank`` line each), equal to the file's own hash for the official
files, and computed the same way whether the ranks came from a path, the cache or a download.
"""

from __future__ import annotations

import base64
import hashlib
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import tiktoken
import tiktoken.registry
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from data_prep.manifest import TokenizerInfo, atomic_write_bytes

GPT2_PAT_STR = r50k_pat_str
R50K_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
R50K_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper"
WHISPER_MEMBER = "whisper/assets/gpt2.tiktoken"
# Known ranks files: sha256 -> the encoding they belong to (name, vocab size, EOT id).
KNOWN_RANKS = {R50K_SHA256: ("r50k_base", 50257, 50256)}


class TokenizerError(ValueError):
    """A tokenizer that cannot be resolved (the message says what was tried)."""


@dataclass(frozen=True)
class EncodingSpec:
    """Everything needed to rebuild the encoding in another process without any I/O (Ray tasks
    get this, not a name: a worker node may have neither the cache nor a network)."""

    name: str
    pat_str: str
    mergeable_ranks: dict[bytes, int] = field(repr=False)
    special_tokens: dict[str, int]
    ranks_sha256: str

    def build(self) -> tiktoken.Encoding:
        return tiktoken.Encoding(name=self.name, pat_str=self.pat_str,
                                 mergeable_ranks=self.mergeable_ranks,
                                 special_tokens=self.special_tokens)

    @property
    def n_vocab(self) -> int:
        return max(max(self.mergeable_ranks.values()), *self.special_tokens.values()) + 1

    @property
    def eot_id(self) -> int:
        return self.special_tokens[ENDOFTEXT]

    @property
    def dtype(self) -> str:
        return "uint16" if self.n_vocab <= 1 << 16 else "uint32"

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(name=self.name, ranks_sha256=self.ranks_sha256,
                             vocab_size=self.n_vocab, eot_id=self.eot_id)


def ranks_sha256(ranks: dict[bytes, int]) -> str:
    """sha256 of the canonical tiktoken serialization of ``ranks``."""
    h = hashlib.sha256()
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(base64.b64encode(token) + b" " + str(rank).encode() + b"\n")
    return h.hexdigest()


def parse_ranks(data: bytes, where: str) -> dict[bytes, int]:
    """Parse a tiktoken ranks file. (tiktoken's own loader caches local paths by name in its
    cache directory and would serve a stale copy after the file changes, so files are read here.)"""
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError as err:
            raise TokenizerError(f"{where}: line {n} is not 'base64 rank': {line[:60]!r}") from err
    if not ranks:
        raise TokenizerError(f"{where}: no ranks in the file")
    return ranks


def spec_from_ranks(ranks: dict[bytes, int], name: str) -> EncodingSpec:
    sha = ranks_sha256(ranks)
    if sha in KNOWN_RANKS:
        known, _, eot = KNOWN_RANKS[sha]
        return EncodingSpec(known, GPT2_PAT_STR, ranks, {ENDOFTEXT: eot}, sha)
    return EncodingSpec(name, GPT2_PAT_STR, ranks, {ENDOFTEXT: max(ranks.values()) + 1}, sha)


def _looks_like_path(name: str) -> bool:
    return os.sep in name or name.endswith(".tiktoken") or Path(name).is_file()


def check(name_or_path: str) -> None:
    """Fail now (no I/O beyond a stat) on an unknown name or a missing file."""
    if _looks_like_path(name_or_path):
        if not Path(name_or_path).expanduser().is_file():
            raise TokenizerError(f"tokenizer file {name_or_path}: no such file")
    elif name_or_path not in tiktoken.list_encoding_names():
        raise TokenizerError(f"unknown tokenizer {name_or_path!r}: use one of "
                             f"{sorted(tiktoken.list_encoding_names())} or the path of a "
                             "tiktoken ranks file")


def resolve(name_or_path: str, *, fetch: bool = True,
            whisper_pip_args: tuple[str, ...] = ()) -> EncodingSpec:
    """Resolve a tokenizer name or ranks path to an :class:`EncodingSpec` (see module doc).
    ``fetch=False`` stops after the cache (for ``verify``/``inspect``, which only decode)."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        try:
            data = path.read_bytes()
        except OSError as err:
            raise TokenizerError(f"tokenizer file {path}: {err.strerror or err}") from err
        return spec_from_ranks(parse_ranks(data, str(path)), name_or_path)
    check(name_or_path)
    constructor = tiktoken.registry.ENCODING_CONSTRUCTORS[name_or_path]
    cached = _cache_path(R50K_URL)
    if name_or_path == "r50k_base" and not (cached and cached.is_file()):
        if not fetch:
            raise TokenizerError(f"r50k_base is not in tiktoken's cache ({cached}); pass the "
                                 "ranks file path")
        if not _reachable(R50K_URL):
            return _whisper_spec(whisper_pip_args)
    try:
        params = constructor()  # tiktoken: its cache, else its download (hash-checked)
    except Exception as err:  # any download failure leads to the fallback
        if name_or_path != "r50k_base" or not fetch:
            raise TokenizerError(f"tokenizer {name_or_path!r}: not in tiktoken's cache and the "
                                 f"download failed ({err}); pass a ranks file path") from err
        return _whisper_spec(whisper_pip_args)
    ranks = params["mergeable_ranks"]
    return EncodingSpec(params["name"], params["pat_str"], ranks, dict(params["special_tokens"]),
                        ranks_sha256(ranks))


def _whisper_spec(pip_args: tuple[str, ...]) -> EncodingSpec:
    path = fetch_whisper_ranks(pip_args=pip_args)
    return spec_from_ranks(parse_ranks(path.read_bytes(), str(path)), "r50k_base")


_ENCODINGS: dict[str, tiktoken.Encoding] = {}


def load(name_or_path: str) -> tiktoken.Encoding:
    """The public entry point: a name (``r50k_base``) or a ranks file path -> Encoding."""
    return encoding_for(resolve(name_or_path))


def encoding_for(spec: EncodingSpec) -> tiktoken.Encoding:
    """Build (once per process) the Encoding of ``spec``."""
    key = f"{spec.name}:{spec.ranks_sha256}"
    if key not in _ENCODINGS:
        _ENCODINGS[key] = spec.build()
    return _ENCODINGS[key]


# -- tiktoken's cache and the whisper fallback --------------------------------------------------
def cache_dir() -> Path | None:
    """The directory tiktoken reads its cache from (same rules as ``tiktoken.load``), or None
    when the user disabled tiktoken's cache (an empty ``TIKTOKEN_CACHE_DIR``)."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if var in os.environ:
            return Path(os.environ[var]) if os.environ[var] else None
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def _cache_path(url: str) -> Path | None:
    """Where tiktoken caches ``url`` (its key is the sha1 of the URL)."""
    root = cache_dir()
    return root / hashlib.sha1(url.encode()).hexdigest() if root else None


def _reachable(url: str, timeout: float = 2.0) -> bool:
    """Whether ``url``'s host accepts a TCP connection within ``timeout`` (DNS included)."""
    host = url.split("://", 1)[-1].split("/", 1)[0]
    ok: list[bool] = []

    def probe() -> None:
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            ok.append(True)
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)
    t.start()
    t.join(timeout)
    return bool(ok)


def fetch_whisper_ranks(
    *, expected_sha256: str = R50K_SHA256, url: str = R50K_URL, requirement: str = WHISPER_SDIST,
    pip_args: tuple[str, ...] = (), timeout: float = 300.0,
) -> Path:
    """Download the ``openai-whisper`` sdist with pip (so a package mirror is enough), take
    ``whisper/assets/gpt2.tiktoken`` out of it, check its sha256 and store it in tiktoken's
    cache under ``url``'s key (or ``~/.cache/walsh`` when tiktoken's cache is disabled).
    Returns the cached file."""
    target = _cache_path(url) or Path.home() / ".cache" / "walsh" / Path(url).name
    with tempfile.TemporaryDirectory(prefix="walsh-whisper-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--dest", tmp, *pip_args, requirement]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as err:
            raise TokenizerError(f"pip download {requirement} timed out after {timeout:.0f}s; "
                                 "pass the ranks file path instead") from err
        sdists = sorted(Path(tmp).glob("*.tar.gz"))
        if res.returncode != 0 or not sdists:
            tail = (res.stderr or res.stdout).strip().splitlines()[-3:]
            raise TokenizerError(
                f"r50k_base is not in tiktoken's cache ({target}), tiktoken's host is "
                f"unreachable and `pip download {requirement}` failed: {' | '.join(tail)}. "
                "Copy r50k_base.tiktoken to this machine and pass its path as the tokenizer.")
        data = _extract_member(sdists[0], WHISPER_MEMBER)
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected_sha256:
        raise TokenizerError(f"{sdists[0].name}: {WHISPER_MEMBER} has sha256 {digest}, "
                             f"expected {expected_sha256}; not using it")
    atomic_write_bytes(target, data)
    return target


def _extract_member(sdist: Path, suffix: str) -> bytes:
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.endswith("/" + suffix):
                    f = tar.extractfile(member)
                    assert f is not None
                    return f.read()
    except (tarfile.TarError, OSError, EOFError) as err:
        raise TokenizerError(f"{sdist.name}: unreadable sdist: {err}") from err
    raise TokenizerError(f"{sdist.name}: no {suffix} inside")
