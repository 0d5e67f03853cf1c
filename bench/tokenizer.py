"""Benchmark the BPE tokenizer against Hugging Face `tokenizers` and tiktoken; prints one JSON object.

    python bench/tokenizer.py [--vocab-size 8192] [--corpus-mb 10]

Training: vocab 8,192 on tinyshakespeare (../shared/data) and on a ~10 MB corpus built deterministically
from the installed Python's standard library (pydoc's topic docs first, then the `.py` sources in sorted
order, whole files until the size is reached; its size and sha256 are reported), next to `tokenizers`'
BpeTrainer with the same split regex on the same file. Encoding: MB/s (UTF-8 bytes) of our pure-Python
path (cold cache, then warm), our tiktoken path, and `tokenizers`, with thread counts. Real files
(`--real-files-only` for just these): each published tokenizer file the tests fetch (GPT-2, Llama-3,
DeepSeek-V3, tiktoken rank files) encoding 1 MB of that corpus, ours next to `tokenizers` / tiktoken.
Targets on a 2-core machine: 8,192 on tinyshakespeare < 10 s, on 10 MB < 60 s, pure-Python encode
>= 1 MB/s.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
CACHE = REPO / "bench" / ".cache"
SPECIALS = ["<|endoftext|>"]


def build_stdlib_corpus(target_bytes: int) -> tuple[Path, dict]:
    """Concatenate stdlib docs + sources (sorted, whole files) until `target_bytes`; cache the file."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for root, dirs, files in os.walk(stdlib):
        dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "__pycache__"))
        sources += [Path(root) / f for f in files if f.endswith(".py")]
    docs = stdlib / "pydoc_data" / "topics.py"
    ordered = [docs] + sorted(
        (p for p in sources if p != docs), key=lambda p: p.relative_to(stdlib).as_posix()
    )
    parts, size, n_files = [], 0, 0
    for path in ordered:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
        chunk = f"# ==== {path.relative_to(stdlib).as_posix()}\n{text}\n"
        parts.append(chunk)
        size += len(chunk.encode("utf-8"))
        n_files += 1
        if size >= target_bytes:
            break
    data = "".join(parts).encode("utf-8")
    CACHE.mkdir(parents=True, exist_ok=True)
    out = CACHE / f"stdlib_corpus_{target_bytes}.txt"
    out.write_bytes(data)
    info = {
        "python": platform.python_version(),
        "files": n_files,
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return out, info


def time_ours(path: Path, vocab_size: int):
    from lmstack.tokenizer import Tokenizer

    start = time.perf_counter()
    tok = Tokenizer.train([path], vocab_size, special_tokens=SPECIALS)
    return tok, round(time.perf_counter() - start, 2)


def time_hf_trainer(path: Path, vocab_size: int, pattern: str) -> float:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    start = time.perf_counter()
    hf.train([str(path)], trainer)
    return round(time.perf_counter() - start, 2)


def mb_per_s(n_bytes: int, seconds: float) -> float:
    return round(n_bytes / seconds / 1e6, 2)


def time_encoders(tok, text: str) -> dict:
    from lmstack.tokenizer import Tokenizer

    n_bytes = len(text.encode("utf-8"))
    fresh = Tokenizer.load(SAVE_DIR)  # a cold piece cache
    fresh.use_tiktoken = False
    start = time.perf_counter()
    ids = fresh.encode_ordinary(text)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    fresh.encode_ordinary(text)
    warm = time.perf_counter() - start

    tok.use_tiktoken = True
    tok.encode_ordinary(text[:1000])  # build the tiktoken Encoding outside the timing
    start = time.perf_counter()
    fast_ids = tok.encode_ordinary(text)
    fast = time.perf_counter() - start

    hf = tok.to_hf()
    start = time.perf_counter()
    hf_ids = hf.encode(text).ids
    hf_one = time.perf_counter() - start
    lines = text.splitlines(keepends=True)
    start = time.perf_counter()
    hf.encode_batch(lines)
    hf_batch = time.perf_counter() - start
    return {
        "text_bytes": n_bytes,
        "tokens": len(ids),
        "pure_python_cold_cache_mb_per_s": mb_per_s(n_bytes, cold),
        "pure_python_warm_cache_mb_per_s": mb_per_s(n_bytes, warm),
        "tiktoken_path_mb_per_s": mb_per_s(n_bytes, fast),
        "tokenizers_single_string_mb_per_s": mb_per_s(n_bytes, hf_one),
        "tokenizers_encode_batch_lines_mb_per_s": mb_per_s(n_bytes, hf_batch),
        "ids_identical_python_tiktoken_tokenizers": ids == fast_ids == hf_ids,
    }


SAVE_DIR = CACHE / "bench_tokenizer"


def run(path: Path, vocab_size: int) -> dict:
    tok, seconds = time_ours(path, vocab_size)
    tok.save(SAVE_DIR)
    hf_seconds = time_hf_trainer(path, vocab_size, tok.pattern)
    return {
        "vocab_size": tok.vocab_size,
        "ours_train_s": seconds,
        "tokenizers_train_s": hf_seconds,
        "encode": time_encoders(tok, path.read_text(encoding="utf-8")),
    }


def _real_file_fetcher():
    """`fetch(key)` of the test suite's real-file cache (tests/tokenizer/conftest.py), loaded by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("real_files", REPO / "tests" / "tokenizer" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.fetch


def _timed(function, text: str) -> tuple[list[int], float]:
    start = time.perf_counter()
    ids = function(text)
    return ids, time.perf_counter() - start


def time_real_files(text: str) -> dict:
    """Encode speed of each real tokenizer file: ours (pure Python, tiktoken path) next to the reference."""
    import tiktoken
    import tokenizers
    from tiktoken.load import load_tiktoken_bpe

    from lmstack.tokenizer import Tokenizer
    from lmstack.tokenizer.pretokenize import GPT4_PATTERN

    fetch = _real_file_fetcher()
    n_bytes = len(text.encode("utf-8"))
    cases = {
        "gpt2 encoder.json+vocab.bpe": ("gpt2", ("gpt2/encoder.json", "gpt2/vocab.bpe")),
        "llama3 tokenizer.json": ("hf", ("llama3/tokenizer.json",)),
        "deepseek-v3 tokenizer.json": (
            "hf",
            ("deepseek-v3/tokenizer.json", "deepseek-v3/tokenizer_config.json"),
        ),
        "llama3 tokenizer.model (tiktoken)": ("tiktoken", ("llama3/tokenizer.model",)),
        "whisper gpt2.tiktoken": ("tiktoken-r50k", ("whisper/gpt2.tiktoken",)),
    }
    out: dict = {"text_bytes": n_bytes}
    for name, (kind, keys) in cases.items():
        try:
            paths = [fetch(key) for key in keys]
        except (RuntimeError, OSError) as exc:
            out[name] = f"skipped: {exc}"
            continue
        if kind == "gpt2":
            tok = Tokenizer.from_gpt2_files(*paths)
            ref = tokenizers.Tokenizer(tokenizers.models.BPE.from_file(str(paths[0]), str(paths[1])))
            ref.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            reference, encode_ref = "tokenizers", lambda t, ref=ref: ref.encode(t).ids
        elif kind == "hf":
            tok = Tokenizer.load(paths[0])
            ref = tokenizers.Tokenizer.from_file(str(paths[0]))
            reference, encode_ref = (
                "tokenizers",
                lambda t, ref=ref: ref.encode(t, add_special_tokens=False).ids,
            )
        else:
            pattern, named = (GPT4_PATTERN, None) if kind == "tiktoken" else (None, "r50k_base")
            tok = Tokenizer.from_tiktoken(paths[0], name=named, pattern=pattern, special_tokens={})
            enc = tiktoken.Encoding(
                name, pat_str=tok.pattern, mergeable_ranks=load_tiktoken_bpe(str(paths[0])), special_tokens={}
            )
            reference, encode_ref = "tiktoken", enc.encode_ordinary
        tok.use_tiktoken = False
        ids, pure_s = _timed(tok.encode_ordinary, text)
        _, warm_s = _timed(tok.encode_ordinary, text)
        ref_ids, ref_s = _timed(encode_ref, text)
        row = {
            "pure_python_cold_cache_mb_per_s": mb_per_s(n_bytes, pure_s),
            "pure_python_warm_cache_mb_per_s": mb_per_s(n_bytes, warm_s),
            f"{reference}_mb_per_s": mb_per_s(n_bytes, ref_s),
            "ids_identical": ids == ref_ids,
        }
        tok.use_tiktoken = True
        if tok._fast_encoding() is not None:
            fast_ids, fast_s = _timed(tok.encode_ordinary, text)
            row["tiktoken_path_mb_per_s"] = mb_per_s(n_bytes, fast_s)
            row["ids_identical"] = row["ids_identical"] and fast_ids == ids
        else:
            row["tiktoken_path"] = "not exact for this file: pure Python only"
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--corpus-mb", type=float, default=10.0)
    parser.add_argument("--real-files-only", action="store_true", help="only the real tokenizer files")
    args = parser.parse_args()
    import tiktoken
    import tokenizers

    result: dict = {
        "benchmark": "tokenizer",
        "machine": {
            "cpus": os.cpu_count(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
        "versions": {"tokenizers": tokenizers.__version__, "tiktoken": tiktoken.__version__},
        "threads": {
            "ours_train": 1,
            "ours_encode": 1,
            "tiktoken_encode": "1 (one string)",
            "tokenizers_train": os.environ.get(
                "RAYON_NUM_THREADS", f"rayon default = {os.cpu_count()} cores"
            ),
            "tokenizers_single_string": 1,
            "tokenizers_encode_batch": os.environ.get(
                "RAYON_NUM_THREADS", f"rayon default = {os.cpu_count()} cores"
            ),
        },
        "targets": {
            "tinyshakespeare_train_s": 10,
            "corpus_10mb_train_s": 60,
            "pure_python_encode_mb_per_s": 1,
        },
    }
    corpus, info = build_stdlib_corpus(int(args.corpus_mb * 1_000_000))
    real_text = corpus.read_text(encoding="utf-8")[:1_000_000].replace("<|", "< |")
    result["real_files"] = {"text": "first 1 MB of the stdlib corpus", **time_real_files(real_text)}
    if args.real_files_only:
        print(json.dumps(result, indent=2))
        return
    if SHAKESPEARE.is_file():
        result["tinyshakespeare"] = run(SHAKESPEARE, args.vocab_size)
    else:
        result["tinyshakespeare"] = f"skipped: {SHAKESPEARE} not found"
    result["stdlib_corpus"] = {"corpus": info, **run(corpus, args.vocab_size)}
    met = {}
    if isinstance(result["tinyshakespeare"], dict):
        met["tinyshakespeare_train_under_10_s"] = result["tinyshakespeare"]["ours_train_s"] < 10
    met["corpus_10mb_train_under_60_s"] = result["stdlib_corpus"]["ours_train_s"] < 60
    met["pure_python_encode_at_least_1_mb_per_s"] = all(
        r["encode"]["pure_python_cold_cache_mb_per_s"] >= 1
        for r in (result["tinyshakespeare"], result["stdlib_corpus"])
        if isinstance(r, dict)
    )
    result["targets_met"] = met
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
