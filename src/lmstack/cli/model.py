"""`lmstack info MODEL`: a model's config and its parameters by component.

MODEL is a preset name (`llama3-8b`), a checkpoint folder (ours or a Hugging Face one), a run folder
(its latest checkpoint), or a `config.json`. Parameters come from `lmstack.arith` (tested equal to the
model built on the meta device), so even a 70B preset costs no memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmstack.arith.params import count_params
from lmstack.config import ModelConfig
from lmstack.interop.folders import resolve_model_config

COMPONENTS = ("embeddings", "attention", "mlp", "experts", "router", "norms", "lm_head")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "info", help="print a model's config and parameter breakdown", description=__doc__
    )
    p.add_argument("model", metavar="MODEL", help="preset name, checkpoint or run folder, or config.json")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    info = model_info(args.model)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


# ---- library --------------------------------------------------------------------------------
def load_model_config(spec: str) -> tuple[ModelConfig, dict[str, Any]]:
    """The config a MODEL argument names, and where it came from."""
    config, folder = resolve_model_config(spec)
    if folder is not None:
        return config, {"kind": "folder", "path": str(folder), **_checkpoint_files(folder)}
    if Path(spec).is_file():
        return config, {"kind": "config", "path": str(spec)}
    return config, {"kind": "preset", "name": spec, "hf_repo": config.hf_repo}


def _checkpoint_files(folder: Path) -> dict[str, Any]:
    files = sorted(folder.glob("*.safetensors"))
    raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {
        "weight_files": len(files),
        "weight_bytes": sum(f.stat().st_size for f in files),
        "dtype": raw.get("dtype") or raw.get("torch_dtype") or "float32",
    }


def parameter_breakdown(config: ModelConfig) -> dict[str, int]:
    """Parameters by component, from the arithmetic (which the tests hold equal to a meta-device model).

    `total` counts a tied head once; `active` is what one token touches (all but the idle experts).
    """
    counts = count_params(config)
    layer, n = counts.layer, counts.n_layers
    return {
        "embeddings": counts.embedding,
        "attention": n * layer.attention,
        "mlp": 0 if layer.n_experts else n * layer.expert,
        "experts": n * layer.n_experts * layer.expert,
        "router": n * layer.router,
        "norms": n * layer.norms + counts.final_norm,
        "lm_head": counts.lm_head,
        "total": counts.total,
        "active": counts.active,
    }


def model_info(spec: str) -> dict[str, Any]:
    """Everything `lmstack info` prints, as a dict: source, config and parameter breakdown."""
    config, source = load_model_config(spec)
    return {"source": source, "config": config.to_dict(), "parameters": parameter_breakdown(config)}


def format_info(info: dict[str, Any]) -> str:
    source, config, params = info["source"], info["config"], info["parameters"]
    if source["kind"] == "preset":
        head = f"preset {source['name']}" + (f" (mirrors {source['hf_repo']})" if source["hf_repo"] else "")
    elif source["kind"] == "folder":
        head = (
            f"checkpoint {source['path']}: {source['weight_files']} safetensors file(s), "
            f"{source['weight_bytes'] / 2**20:,.1f} MiB, {source['dtype']}"
        )
    else:
        head = f"config {source['path']}"
    lines = [head, "", "config:"]
    lines += [f"  {key:<28} {value}" for key, value in config.items()]
    lines += ["", "parameters:"]
    total = params["total"]
    for component in COMPONENTS:
        n = params[component]
        if component == "lm_head" and config["tie_embeddings"]:
            lines.append(f"  {component:<12} {'tied to embeddings':>17}")
        elif n:
            lines.append(f"  {component:<12} {n:>17,} {100 * n / total:6.1f}%")
    lines.append(f"  {'total':<12} {total:>17,}  ({_human(total)})")
    if params["active"] != total:
        lines.append(f"  {'active/token':<12} {params['active']:>17,}  ({_human(params['active'])})")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
