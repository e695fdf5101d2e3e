"""`leanserve serve`'s arguments and --config file -> the app's arguments, ports and drain bound.

The engine flags are generated from `runtime.settings.EngineConfig` (`add_engine_arguments`,
which `runtime/cli.py` calls for the `serve` sub-command); `app_args` merges a --config file
(builder args or a Serve config) with the flags into the args of `runtime.serve_app.deploy`;
`resolve_serve_model_dir`, `resolve_ports` and `graceful_shutdown_timeout` resolve the rest.
Importing this module imports the standard library only (`runtime.settings`, lazily, has no torch).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

DEFAULT_GRPC_PORT = 9000
DEFAULT_HTTP_PORT = 8000

# How long in-flight requests may run after SIGTERM (Serve's graceful_shutdown_timeout_s, which
# runtime.serve_app.deployment_options defaults to this too; Ray's own default is the same 20 s).
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0


def _load_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    import yaml

    with open(path, encoding="utf-8") as f:
        loaded = yaml.safe_load(f) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: must hold a mapping of builder args or a Serve config")
    return loaded


def resolve_ports(args: Any) -> tuple[int, int]:
    """(gRPC, HTTP) ports: the flags, else a Serve config file's `grpc_options` /
    `http_options` ports, else 9000 / 8000. The bind address never comes from
    the file (its 0.0.0.0 is for a cluster); `--host` sets it."""
    loaded = _load_config(args.config)
    grpc = args.grpc_port or (loaded.get("grpc_options") or {}).get("port") or DEFAULT_GRPC_PORT
    http = args.http_port or (loaded.get("http_options") or {}).get("port") or DEFAULT_HTTP_PORT
    for name, port in (("grpc_options.port", grpc), ("http_options.port", http)):
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{name}={port!r}: must be an integer port in [1, 65535]")
    return grpc, http


# --- engine flags, generated from runtime.settings.EngineConfig ------------------------------------
# Help text per field (the field's default is appended from the dataclass). A field added to
# EngineConfig later gets a flag too, with a generic help line, so nothing here has to change.
ENGINE_FLAG_HELP: dict[str, str] = {
    "kv_cache_bytes": "KV pool bytes per replica",
    "page_size": "tokens per KV page",
    "max_batch_size": "most running requests per replica",
    "max_waiting": "waiting-queue bound per replica (beyond it: RESOURCE_EXHAUSTED / HTTP 429)",
    "max_prefills": "most requests admitted (prefilled) per iteration",
    "default_steps": "step count of requests that set no compute field (default: the model's)",
    "slo_target_itl_ms": "adapt the default step count to this inter-token latency (ms) with the "
    "SLO controller (default: off)",
    "slo_target_ttft_ms": "the SLO controller's time-to-first-token target in ms (default: not checked)",
    "slo_window": "ITL samples the SLO controller reports over",
    "slo_hysteresis": "the SLO controller's capacity headroom (plans for (1 + h) x demand)",
    "slo_min_steps": "lowest step count the SLO controller may pick (default: the model's minimum)",
    "slo_max_steps": "highest step count the SLO controller may pick (default: the model's maximum)",
    "slo_quality_ladder": "SLO controller: skip step counts profile.json measures no better than fewer steps",
    "inline_decode_ms": "decode iterations shorter than this run on the event loop, not the worker "
    "thread (0 = never)",
    "max_waiting_per_client": "waiting-queue bound per client (default: --max-waiting)",
    "fair_quantum": "tokens a client earns per turn of the fair scheduler",
    "max_consecutive_failures": "failing iterations in a row that mark the engine dead",
    "tokenize_inline_chars": "text prompts longer than this are tokenised in a worker thread",
    "kv_min_steps": "memory dial: admit a request the server picks the steps for at fewer steps, "
    "down to this, when the KV pool cannot hold it (default: off, it waits)",
    "latency_budget_unmet": "a latency_budget_ms no step count can meet: 'min' runs the minimum, "
    "'reject' refuses the request",
}
_SCALARS: dict[str, Any] = {"int": int, "float": float, "str": str}


def _json_or_text(text: str) -> Any:
    """A flag value for a field of a type the generator does not know: JSON if it parses, else text."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def _field_type(annotation: Any) -> str:
    """The scalar type name of a dataclass field ("int | None" -> "int"); "" when not a plain scalar."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    parts = [part.strip() for part in text.split("|") if part.strip() not in ("None", "NoneType")]
    return parts[0] if len(parts) == 1 and parts[0] in (*_SCALARS, "bool") else ""


def engine_fields() -> list[Any]:
    """`dataclasses.fields(EngineConfig)` (imported here: runtime.settings is light, no torch)."""
    import dataclasses

    from runtime.settings import EngineConfig

    return list(dataclasses.fields(EngineConfig))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--field-name` flag per `EngineConfig` field, in an argument group of its own.

    Every flag defaults to None (= not given: the --config file's value, else EngineConfig's
    default, which the help shows). Booleans get `--x/--no-x`; a field of a type other than
    int, float, str or bool takes JSON (a list, an object) or plain text.
    """
    import dataclasses

    group = parser.add_argument_group(
        "engine settings",
        "EngineConfig fields (runtime/settings.py), per replica; also settable under `engine:` in --config",
    )
    for f in engine_fields():
        default = f.default if f.default is not dataclasses.MISSING else None
        kind = _field_type(f.type)
        help_text = ENGINE_FLAG_HELP.get(f.name, f"EngineConfig.{f.name} (runtime/settings.py)")
        if "default" not in help_text:
            help_text += f" (default: {default})" if default is not None else " (default: unset)"
        flag = "--" + f.name.replace("_", "-")
        if kind == "bool":
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)  # fmt: skip
        elif kind:
            group.add_argument(flag, dest=f.name, type=_SCALARS[kind], default=None, help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_json_or_text, default=None, metavar="JSON",
                               help=help_text)  # fmt: skip


def engine_overrides(args: Any) -> dict[str, Any]:
    """The engine flags that were given (not None), by EngineConfig field name."""
    return {f.name: getattr(args, f.name) for f in engine_fields() if getattr(args, f.name, None) is not None}


def app_args(args: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {}
    loaded = _load_config(args.config)
    # Accept a Serve config file too: take the first application's args.
    if "applications" in loaded:
        loaded = (loaded["applications"] or [{}])[0].get("args", {}) or {}
    else:
        loaded = {k: v for k, v in loaded.items() if k not in ("grpc_options", "http_options")}
    cfg.update(loaded)
    model_dir = cli_model_dir(args)
    if model_dir:
        cfg["model_dir"] = model_dir
    if args.threads:
        cfg["threads"] = args.threads
    if getattr(args, "backend", None):
        cfg["backend"] = args.backend
    if getattr(args, "dtype", None):
        cfg["dtype"] = args.dtype
    if args.compile:
        cfg["compile"] = True
    if args.compile_steps:
        from runtime.settings import CompileSpec  # no torch: models.config and runtime.types only

        steps = CompileSpec.parse(args.compile_steps).steps  # ValueError naming compile_steps
        cfg["compile_steps"] = steps if isinstance(steps, str) else list(steps)
    # Only when given: the served name is an app argument that older ServeArgs do not know.
    if getattr(args, "served_model_name", None):
        cfg["served_model_name"] = args.served_model_name
    engine = dict(cfg.pop("engine", None) or {})
    engine.update(engine_overrides(args))
    cfg["engine"] = engine
    deployment = dict(cfg.pop("deployment", None) or {})
    if args.replicas:
        deployment["num_replicas"] = args.replicas
    if getattr(args, "graceful_shutdown_timeout", None) is not None:
        deployment["graceful_shutdown_timeout_s"] = args.graceful_shutdown_timeout
    if deployment:
        cfg["deployment"] = deployment
    # No --api-key: the replica falls back to $LEANSERVE_API_KEY, which it inherits from this
    # process (the driver starts Ray's raylet, whose workers the replicas are).
    if getattr(args, "api_key", None):
        cfg["api_key"] = args.api_key
    return cfg


def cli_model_dir(args: Any) -> str | None:
    """The model directory given on the command line (the positional or `--model-dir`).

    Raises:
        ValueError: both given, and different.
    """
    positional, flag = getattr(args, "model_dir", None), getattr(args, "model_dir_flag", None)
    if positional and flag and Path(positional) != Path(flag):
        raise ValueError(f"two model directories given: {positional} and --model-dir {flag}; give one")
    return positional or flag


def resolve_serve_model_dir(args: Any, cfg: dict[str, Any]) -> Path:
    """The model directory to serve: the command line's, else the --config file's, else the demo
    model (models/zoo/ode-tiny).

    A config file's relative `model_dir` is tried against the file's folder too. A config
    `model_dir` that does not exist here whose name is a model of this checkout's zoo (the shipped
    deploy/serve/leanserve.yaml names the images' /models/ode-tiny) serves the zoo's copy, saying so.

    Raises:
        FileNotFoundError: naming the path, where it came from and how to choose another.
    """
    from runtime.local import DEMO_MODEL, resolve_model_dir

    given = cli_model_dir(args)
    if given or not cfg.get("model_dir"):
        return resolve_model_dir(given)
    path = Path(cfg["model_dir"])
    if path.is_dir():
        return path
    if not path.is_absolute() and (Path(args.config).parent / path).is_dir():
        return Path(args.config).parent / path
    zoo = DEMO_MODEL.parent / path.name
    if zoo.is_dir():
        print(
            f"leanserve serve: model_dir {path} (from {args.config}) does not exist here; serving "
            f"{zoo}, the model of that name in this checkout's zoo (--model-dir DIR to choose another)",
            file=sys.stderr,
            flush=True,
        )
        return zoo
    raise FileNotFoundError(
        f"{path}: model directory not found (model_dir in {args.config}); pass the model directory "
        "as an argument or with --model-dir DIR"
    )


def graceful_shutdown_timeout(cfg: dict[str, Any]) -> float:
    """The drain bound of the app args `cfg` (`deployment.graceful_shutdown_timeout_s`, else
    `DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S`).

    Raises:
        ValueError: not a number >= 0 (names the field).
    """
    value = (cfg.get("deployment") or {}).get(
        "graceful_shutdown_timeout_s", DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S
    )
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"graceful_shutdown_timeout_s={value!r}: must be a number of seconds >= 0")
    return float(value)
