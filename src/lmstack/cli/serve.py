"""`lmstack serve`: an OpenAI-compatible HTTP server for a checkpoint or run folder.

Loads the model and tokenizer (`interop.folders.load_model_and_tokenizer`), takes unset sampling
fields from the folder's generation_config.json, and runs `lmstack.serve` on uvicorn. It binds the
loopback interface unless told otherwise; any other address requires an API key.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

from lmstack.errors import InputError

API_KEY_ENV = "LMSTACK_API_KEY"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API", description=__doc__
    )
    p.add_argument("--model", type=Path, required=True, help="checkpoint folder or run folder")
    p.add_argument("--adapter", type=Path, default=None, help="a PEFT LoRA/DoRA folder to apply on top")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--api-key", default=None, help=f"require this bearer key (or set {API_KEY_ENV})")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 429")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together (default 8)")
    p.add_argument("--kv-blocks", type=int, default=256, help="KV-cache blocks of 16 tokens (default 256)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run_serve(args: argparse.Namespace) -> int:
    from lmstack.finetune.adapters import load_with_adapter
    from lmstack.interop.folders import generation_defaults, resolve_model_dir
    from lmstack.serve import ServerConfig, create_app, serve

    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if not is_loopback(args.host) and not api_key:
        raise InputError(
            f"binding {args.host} exposes the server beyond this machine — pass --api-key (or set "
            f"{API_KEY_ENV}), or keep the default --host 127.0.0.1"
        )
    for name in ("max_queue", "max_batch", "kv_blocks", "max_tokens_limit"):
        if getattr(args, name) < (0 if name == "max_queue" else 1):
            raise InputError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    folder = resolve_model_dir(args.model)
    model, tokenizer = load_with_adapter(folder, args.adapter, dtype=args.dtype)
    config = ServerConfig(
        model_name=Path(args.model).expanduser().resolve().name,
        api_key=api_key,
        max_batch=args.max_batch,
        kv_blocks=args.kv_blocks,
        max_queue=args.max_queue,
        max_tokens_limit=args.max_tokens_limit,
    )
    app = create_app(model, tokenizer, config, defaults=generation_defaults(folder))
    serve(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
