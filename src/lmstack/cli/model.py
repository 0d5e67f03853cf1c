"""`lmstack info MODEL`: a model's config and its parameters by component.

MODEL is a preset name (`llama3-8b`), a checkpoint folder (ours or a Hugging Face one), a run folder
(its latest checkpoint), or a `config.json`. Parameters are counted on a model built on the meta
device, so even a 70B preset costs no memory.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lmstack.config import ModelConfig
from lmstack.errors import InputError

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
    path = Path(spec)
    if path.is_dir():
        from lmstack.train.checkpoint import resolve_model_dir  # a run folder means its latest checkpoint

        folder = resolve_model_dir(path)
        config = ModelConfig.from_hf(folder)  # first: it names a bad or missing config.json
        return config, {"kind": "folder", "path": str(folder), **_checkpoint_files(folder)}
    if path.is_file():
        return ModelConfig.from_hf(path), {"kind": "config", "path": str(path)}
    if path.suffix == ".json" or "/" in spec or "\\" in spec:
        raise InputError(
            f"no such file or folder: {spec} — give a preset name, a checkpoint folder or a config.json"
        )
    config = ModelConfig.preset(spec)  # an unknown name raises, listing close matches
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
    """Parameters by component, counted on the model built on the meta device (nothing allocated).

    `total` counts a tied head once; `active` is what one token touches (all but the idle experts).
    """
    from lmstack.model import build_model

    model = build_model(config, device="meta")
    counts = dict.fromkeys(COMPONENTS, 0)
    for name, p in model.named_parameters():
        counts[_component(name)] += p.numel()
    counts["total"] = sum(counts[c] for c in COMPONENTS)
    idle = counts["experts"] * (1 - config.n_experts_per_token / config.n_experts) if config.is_moe else 0
    counts["active"] = counts["total"] - round(idle)
    return counts


def _component(name: str) -> str:
    if name.startswith(("tok_emb.", "pos_emb.")):
        return "embeddings"
    if name.startswith("lm_head."):
        return "lm_head"
    if "norm." in name:
        return "norms"
    if ".attn." in name:
        return "attention"
    if ".mlp.router." in name:
        return "router"
    if ".mlp.experts." in name:
        return "experts"
    return "mlp"


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
