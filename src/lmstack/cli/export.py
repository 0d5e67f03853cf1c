"""`lmstack export gguf|ollama` and `lmstack import gguf`: llama.cpp's and Ollama's formats.

lmstack export gguf --model DIR|RUN --type f32|f16|q8_0|q4_0|q4_k_m --out FILE.gguf
lmstack export ollama --model DIR --out DIR [--type q4_k_m]   (model.gguf + Modelfile)
lmstack import gguf FILE.gguf --out DIR                       (dequantised lmstack/HF folder)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmstack.interop.gguf import FILE_TYPES, export_gguf, export_ollama, gguf_summary, import_gguf


def register(subparsers: argparse._SubParsersAction) -> None:
    export = subparsers.add_parser(
        "export", help="export a model to GGUF or an Ollama folder", description=__doc__
    )
    kinds = export.add_subparsers(dest="format", metavar="FORMAT", required=True)
    g = kinds.add_parser("gguf", help="write a llama.cpp GGUF file")
    g.add_argument("--model", required=True, help="checkpoint or run folder")
    g.add_argument("--type", default="f16", choices=list(FILE_TYPES), help="tensor type (default f16)")
    g.add_argument("--out", required=True, help="the .gguf file to write")
    g.set_defaults(func=run_export_gguf)
    o = kinds.add_parser("ollama", help="write model.gguf and a Modelfile for `ollama create`")
    o.add_argument("--model", required=True, help="checkpoint or run folder")
    o.add_argument("--type", default="q4_k_m", choices=list(FILE_TYPES), help="tensor type (default q4_k_m)")
    o.add_argument("--out", required=True, help="the folder to write")
    o.set_defaults(func=run_export_ollama)

    imp = subparsers.add_parser("import", help="import a GGUF file as an lmstack checkpoint folder")
    kinds = imp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    i = kinds.add_parser("gguf", help="read a llama.cpp GGUF (Llama-family or GPT-2)")
    i.add_argument("file", metavar="FILE", help="the .gguf file")
    i.add_argument("--out", required=True, help="the checkpoint folder to write")
    i.set_defaults(func=run_import_gguf)


def _load(spec: str):
    from lmstack.interop.folders import load_model_and_tokenizer

    return load_model_and_tokenizer(spec, dtype="float32")


def run_export_gguf(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args.model)
    path = export_gguf(model, tokenizer, args.out, args.type)
    types = gguf_summary(path)["types"]
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB; tensors {types})")
    return 0


def run_export_ollama(args: argparse.Namespace) -> int:
    model, tokenizer = _load(args.model)
    folder = export_ollama(model, tokenizer, args.out, args.type)
    print(f"wrote {folder}/model.gguf and {folder}/Modelfile — run: ollama create NAME -f {folder}/Modelfile")
    return 0


def run_import_gguf(args: argparse.Namespace) -> int:
    folder = import_gguf(Path(args.file), args.out)
    print(f"wrote {folder}")
    return 0
