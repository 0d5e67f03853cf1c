"""`lmstack generate` and `lmstack chat`: text generation from a checkpoint or run folder.

Thin wrappers over `lmstack.infer.generate_text`: they load the model and its tokenizer
(`interop.folders.load_model_and_tokenizer`) from the folder `--model` names — a checkpoint folder, or
a run folder meaning its latest checkpoint — and print the generated text. `--beams`,
`--penalty-alpha` and `--draft` choose the `Beam`, `Contrastive` or `Speculative` strategy.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from lmstack.errors import InputError
from lmstack.interop.folders import generation_defaults, load_model_and_tokenizer, resolve_model_dir

CACHES = (
    "static",
    "hybrid",
    "dynamic",
    "rolling",
    "paged",
)  # lmstack.infer.cache.CACHE_KINDS, kept import-free
TRANSCRIPT_NOTICE = (
    "note: this tokenizer has no chat template (a base model?); using a plain 'User:/Assistant:' transcript"
)


def register(subparsers: argparse._SubParsersAction) -> None:
    gen = subparsers.add_parser("generate", help="generate text from a prompt", description=__doc__)
    gen.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt (read from stdin when omitted)")
    _model_args(gen)
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser(
        "chat", help="chat with a model interactively (streaming)", description=__doc__
    )
    _model_args(chat)
    chat.add_argument("--system", default=None, help="a system message to start the conversation")
    chat.set_defaults(func=run_chat)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", type=Path, required=True, help="checkpoint folder or run folder (its latest checkpoint)"
    )
    p.add_argument("--adapter", type=Path, default=None, help="a PEFT LoRA/DoRA folder to apply on top")
    p.add_argument("--max-new-tokens", type=int, default=128, help="new tokens at most (default 128)")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0 = greedy; e.g. 0.8 to sample (default: generate greedy, chat the model's generation_config.json)",
    )
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep probability mass p")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens below min_p x the top probability")
    p.add_argument(
        "--repetition-penalty", type=float, default=None, help="CTRL repetition penalty (default 1.0)"
    )
    p.add_argument("--seed", type=int, default=None, help="seed for sampling")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    p.add_argument("--beams", type=int, default=1, help="beam search with this many beams (Beam strategy)")
    p.add_argument("--penalty-alpha", type=float, default=None, help="contrastive search (with --top-k)")
    p.add_argument("--draft", type=Path, default=None, help="draft model folder for speculative decoding")
    p.add_argument("--speculate-k", type=int, default=4, help="draft tokens proposed per step (default 4)")
    p.add_argument("--cache", default="static", choices=CACHES, help="KV cache (default static)")
    p.add_argument(
        "--dtype", default=None, choices=["float32", "bfloat16", "float16", "float64"], help="load dtype"
    )


def _generation_kwargs(args: argparse.Namespace, defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """`generate_text` keywords from the flags: the strategy, the cache and SamplingParams fields.

    A sampling flag left unset takes its value from `defaults` (chat: the model folder's
    generation_config.json, as the server does), else greedy decoding."""
    strategy = _strategy(args)
    contrastive = args.penalty_alpha is not None  # --top-k then counts the search's candidates
    sampling = {
        "temperature": args.temperature,
        "top_k": None if contrastive else args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "repetition_penalty": args.repetition_penalty,
    }
    given = {k: v for k, v in sampling.items() if v is not None}
    if strategy is None and defaults and "temperature" not in given:
        given = {**defaults, **given}
    return dict(
        strategy=strategy,
        max_new_tokens=args.max_new_tokens,
        **given,
        seed=args.seed,
        stop=args.stop,
        cache=args.cache,
    )


def _strategy(args: argparse.Namespace):
    """The decoding strategy the flags ask for (None: greedy or sampling); at most one may be chosen."""
    from lmstack.infer import Beam, Contrastive, Speculative

    chosen = [
        flag
        for flag, on in (
            ("--beams", args.beams != 1),
            ("--penalty-alpha", args.penalty_alpha is not None),
            ("--draft", args.draft is not None),
        )
        if on
    ]
    if len(chosen) > 1:
        raise InputError(f"choose one decoding strategy, got {' and '.join(chosen)} — drop all but one")
    if args.beams != 1:
        return Beam(args.beams)
    if args.penalty_alpha is not None:
        if args.top_k is None:
            raise InputError("--penalty-alpha needs --top-k candidates — e.g. --penalty-alpha 0.6 --top-k 4")
        return Contrastive(args.penalty_alpha, args.top_k)
    if args.draft is not None:
        draft, _ = load_model_and_tokenizer(args.draft, dtype=args.dtype)
        return Speculative(draft, args.speculate_k)
    return None


def run_generate(args: argparse.Namespace) -> int:
    from lmstack.infer import generate_text

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    if not prompt:
        raise InputError("the prompt is empty — pass PROMPT or pipe text on stdin")
    from lmstack.finetune.adapters import load_with_adapter

    model, tokenizer = load_with_adapter(args.model, args.adapter, dtype=args.dtype)
    on_text = (lambda _row, piece: print(piece, end="", flush=True)) if args.stream else None
    result = generate_text(
        model, tokenizer, prompt, on_text=on_text, details=True, **_generation_kwargs(args)
    )[0]
    if not args.stream:
        print(result.text, end="")
    print()
    if "acceptance_rate" in result.stats:
        print(f"speculative: acceptance rate {result.stats['acceptance_rate']:.2f}", file=sys.stderr)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from lmstack.finetune.adapters import load_with_adapter
    from lmstack.infer import generate_text

    model, tokenizer = load_with_adapter(args.model, args.adapter, dtype=args.dtype)
    kwargs = _generation_kwargs(args, generation_defaults(resolve_model_dir(args.model)))
    if not tokenizer.chat_template:
        print(TRANSCRIPT_NOTICE, file=sys.stderr)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() in ("/exit", "/quit"):
            break
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = generate_text(
            model,
            tokenizer,
            messages,
            on_text=lambda _row, piece: print(piece, end="", flush=True),
            **kwargs,
        )
        print()
        messages.append({"role": "assistant", "content": reply.strip()})
    return 0
