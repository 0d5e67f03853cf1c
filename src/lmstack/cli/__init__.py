"""`lmstack` command line: a thin dispatcher.

Each subcommand lives in a small module of this package that defines `register(subparsers)`; the
module's handler parses nothing itself beyond argparse and calls one library function. Modules are
imported lazily so `lmstack --help` stays fast and a broken optional area cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from lmstack.errors import RunError

# subcommand -> module that registers it (one module may register several related subcommands)
COMMAND_MODULES = {
    "info": "lmstack.cli.model",
    "calc": "lmstack.cli.calc",
    "tokenizer": "lmstack.cli.tokenizer",
    "data": "lmstack.cli.data",
    "train": "lmstack.cli.train",
    "eval": "lmstack.cli.train",
    "generate": "lmstack.cli.infer",
    "chat": "lmstack.cli.infer",
    "export": "lmstack.cli.export",
    "import": "lmstack.cli.export",
    "serve": "lmstack.cli.serve",
    "quantize": "lmstack.cli.quantize",
    "finetune": "lmstack.cli.finetune",
    "merge": "lmstack.cli.finetune",
}


def fail(message: str, code: int = 2) -> None:
    """Print the one-line error `lmstack: error: <what> — <how to fix>` and exit."""
    print(f"lmstack: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmstack", description="The whole LLM stack in one package.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in dict.fromkeys(COMMAND_MODULES.values()):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # the area is not built yet; its commands are simply absent
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        print("lmstack: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        fail(_one_line(exc), 2)
    except RunError as exc:
        fail(_one_line(exc), 1)
    return int(result or 0)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
        text = f"{text}: {exc.filename}"
    return " ".join(text.split())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
