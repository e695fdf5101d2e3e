"""The `leanserve` console script: one entry point, subcommands from a small registry.

`leanserve --help` must stay fast, so this module imports only the standard library.
Each subcommand is declared by name, help text, a function that adds its argparse
arguments (argparse only, nothing heavy), and a lazy target `"package.module:function"`.
The target module is imported only when that subcommand runs; the function receives
the parsed `argparse.Namespace` and returns an int exit code.

Adding a command (do it in the "Subcommands" section at the bottom of this file, so
that every command is declared in one place)::

    def _add_generate_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("model_dir", help="model directory (config.json, model.safetensors, ...)")
        parser.add_argument("--steps", type=int, default=None, help="ODE steps per token")

    register(
        "generate",
        help="generate text from a prompt with a local model",
        add_arguments=_add_generate_arguments,
        target="runtime.generate:main",  # def main(args: argparse.Namespace) -> int
    )

Errors: a command that raises `ValueError` (including `models.config.ConfigError`) or
`FileNotFoundError` gets `leanserve <cmd>: error: <message>` on stderr and exit code 2,
not a traceback. `leanserve --debug <cmd> ...` (or `<cmd> ... --debug`) re-raises instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

PROG = "leanserve"
DIST_NAME = "leanserve"

# Exceptions that mean "the user asked for something invalid", reported without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


@dataclass(frozen=True)
class Command:
    """One subcommand.

    Attributes:
        name: the subcommand word, e.g. `"serve"`.
        help: one line shown by `leanserve --help`.
        add_arguments: adds the subcommand's arguments to its parser; must import nothing heavy.
        target: `"package.module:function"`, imported only when the subcommand runs; the
            function takes the parsed `argparse.Namespace` and returns an int exit code.
    """

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    target: str


COMMANDS: list[Command] = []


def register(
    name: str,
    help: str,
    add_arguments: Callable[[argparse.ArgumentParser], None],
    target: str,
) -> Command:
    """Declares a subcommand; see the module docstring for an example.

    Raises:
        ValueError: the name is already registered or `target` is not `"module:function"`.
    """
    if not name or name.startswith("-"):
        raise ValueError(f"invalid command name {name!r}")
    if any(c.name == name for c in COMMANDS):
        raise ValueError(f"command {name!r} is already registered")
    module, sep, func = target.partition(":")
    if not sep or not module or not func:
        raise ValueError(f"target {target!r} for command {name!r} must look like 'package.module:function'")
    command = Command(name, help, add_arguments, target)
    COMMANDS.append(command)
    return command


def unregister(name: str) -> None:
    """Removes a subcommand (for tests that register temporary commands)."""
    COMMANDS[:] = [c for c in COMMANDS if c.name != name]


def _version() -> str:
    # importlib.metadata is imported lazily: only `--version` pays for it.
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(DIST_NAME)
    except PackageNotFoundError:  # running from a checkout that was never `pip install`ed
        return "0+unknown"


class _VersionAction(argparse.Action):
    """Like argparse's `action="version"`, but reads the version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest=dest, default=argparse.SUPPRESS, nargs=0, **kwargs)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        print(f"{PROG} {_version()}")
        parser.exit()


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help shows its default: argparse's "(default: X)" is appended unless the help
    already says what the default is, or there is none to show (None, False: "not set")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    """Builds the top-level parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve small elastic-compute transformer LMs; each request chooses its compute.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    if COMMANDS:
        subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
        for command in COMMANDS:
            sub = subparsers.add_parser(
                command.name, help=command.help, description=command.help, formatter_class=HelpFormatter
            )
            # SUPPRESS keeps a subparser default from overwriting `leanserve --debug <cmd>`.
            sub.add_argument(
                "--debug",
                action="store_true",
                default=argparse.SUPPRESS,
                help="show full tracebacks for errors",
            )
            command.add_arguments(sub)
            sub.set_defaults(_target=command.target)
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module_name, _, func_name = target.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, func_name)


def main(argv: list[str] | None = None) -> int:
    """Parses `argv` (default `sys.argv[1:]`), runs the chosen subcommand, returns its exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version and usage errors
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)

    target = getattr(args, "_target", None)
    if target is None:
        parser.print_help(sys.stderr)
        return 2

    return run_command(args.command, _resolve(target), args)


def run_command(name: str, func: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Runs `func(args)` with the CLI's error reporting: a user error (`USER_ERRORS`) prints
    `leanserve NAME: error: MESSAGE` and returns 2, Ctrl-C returns 130; with `args.debug`
    both re-raise. Also used by `leanserve serve`'s driver process (runtime/serve_driver.py)."""
    debug = getattr(args, "debug", False)
    try:
        rc = func(args)
    except USER_ERRORS as exc:
        if debug:
            raise
        print(f"{PROG} {name}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG} {name}: interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)


# --- Subcommands -------------------------------------------------------------------------------------
# Register every command here with register(name, help, add_arguments, "package.module:function").


def _add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("preset", help="preset name (models/presets/NAME.json) or path to a preset JSON file")
    p.add_argument(
        "--name",
        help="model name written into config.json, the name it is served under "
        "(default: the preset's model name)",
    )
    p.add_argument("--out", help="model directory to write (default: runs/<model name>)")
    p.add_argument("--text", help="UTF-8 text file or folder to train on (default: World English Bible)")
    p.add_argument("--iterations", type=int, help="override train.iterations (default: the preset's)")
    p.add_argument("--seed", type=int, help="override train.seed (default: the preset's)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument(
        "--device",
        help="cpu, cuda (under torchrun: cuda:LOCAL_RANK), cuda:K or auto (default: the preset's, else cpu)",
    )
    p.add_argument(
        "--dtype",
        choices=["float32", "bfloat16"],
        help="compute dtype; bfloat16 = autocast with float32 master weights (default: the preset's)",
    )
    p.add_argument(
        "--micro-batch-size",
        type=int,
        help="rows per forward/backward per process; the global batch (train.batch_size) is accumulated "
        "over micro-batches and split over torchrun processes, so it does not depend on either "
        "(default: the preset's, else a process's whole share in one pass)",
    )
    p.add_argument("--no-resume", action="store_true", help="ignore a saved <out>.train-state/")
    p.add_argument("--keep-state", action="store_true", help="keep <out>.train-state/ after finishing")
    p.add_argument(
        "--no-profile",
        action="store_true",
        help="skip the closing `leanserve eval` (profile.json: quality tiers, latency calibration); "
        "a model without one serves uncalibrated",
    )


register(
    "train",
    "train a model from a preset into a model directory",
    _add_train_arguments,
    "models.train:cli_main",
)


def _add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="model directory")
    p.add_argument("--text", help="corpus the model was trained on (default: as recorded in config.json)")
    p.add_argument(
        "--out",
        help="where to write the profile (default: MODEL_DIR/profile.json, which serve reads; a "
        "profile.json that git tracks is only replaced when --out names it)",
    )
    p.add_argument("--max-tokens", type=int, default=32768, help="validation tokens per setting")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")


register(
    "eval",
    "measure quality and latency per step/expert setting; write profile.json",
    _add_eval_arguments,
    "models.evaluate:cli_main",
)


def _add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", help="model directory (config.json, model.safetensors)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 18)")
    p.add_argument("--no-check", action="store_true", help="skip the ONNX Runtime vs torch parity check")


register(
    "export",
    "export ONNX graphs (embed, one per block, head) into MODEL_DIR/onnx/",
    _add_export_arguments,
    "models.export:cli_main",
)


def _add_inline_decode_argument(p: argparse.ArgumentParser) -> None:
    """`--inline-decode-ms` (EngineConfig.inline_decode_ms) for serve and the engine benchmarks."""
    p.add_argument(
        "--inline-decode-ms",
        type=float,
        default=None,
        help="engine: decode iterations shorter than this run on the event loop, not the worker thread "
        "(default 5; 0 = never)",
    )


def _add_bench_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", help="model directory, or a preset name/JSON (random weights)")
    p.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--context", type=int, default=64, help="cached tokens per row before timing")
    p.add_argument("--iters", type=int, default=12, help="timed decode iterations (median)")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--json", help="also write the rows to this JSON file")


def _add_bench_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=None, help="model directory (default: random weights)")
    p.add_argument("--config", default=None, help="preset name or JSON for random weights (no --model-dir)")
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per request")
    p.add_argument("--batch", type=int, default=16, help="concurrent requests")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers GPT-2 comparison")
    p.add_argument("--onnx", action="store_true", help="also compare ONNX Runtime with torch (needs export)")
    p.add_argument(
        "--ctranslate2",
        action="store_true",
        help="also compare CTranslate2 (float32, int8) running the HF peer's GPT-2 (pip install ctranslate2)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch backend with AOT-compiled decode steps (cached after the first run)",
    )
    _add_inline_decode_argument(p)
    p.add_argument("--quick", action="store_true", help="short runs (smoke test)")
    p.add_argument(
        "--speculation",
        action="store_true",
        help="also the speculative-decoding section (runtime/bench_spec.py)",
    )
    p.add_argument("--json", default=None, help="also write the results to this JSON file")


def _add_bench_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-dir", default=None, help="model directory (default: models/zoo/ode-tiny)")
    p.add_argument("--steps", type=int, default=4, help="ODE steps of every request (default 4)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens per generation (default 32)")
    p.add_argument("--runs", type=int, default=40, help="timed runs per path (default 40)")
    p.add_argument("--stream-interval", type=int, default=1, help="tokens per stream message (default 1)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in engine and replica")
    p.add_argument("--port", type=int, default=9100, help="gRPC port of the Serve (+1 HTTP, +2 metrics)")
    p.add_argument("--compile", action="store_true", help="AOT-compiled decode steps in both engines")
    _add_inline_decode_argument(p)


_BENCHES = {
    "model": (
        "decode latency per step count at batch 1 and 16 (bare model)",
        _add_bench_model_arguments,
        "models.bench:cli_main",
    ),
    "engine": (
        "engine: step ratios, concurrency, HF transformers peer",
        _add_bench_engine_arguments,
        "runtime.bench_engine:main",
    ),
    "serve": (
        "serving overhead: gRPC through Ray Serve vs the bare engine",
        _add_bench_serve_arguments,
        "runtime.bench_serve:main",
    ),
}


def _add_bench_arguments(p: argparse.ArgumentParser) -> None:
    kinds = p.add_subparsers(dest="bench", metavar="<what>", required=True)
    for name, (help_text, add, target) in _BENCHES.items():
        sub = kinds.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        add(sub)
        sub.set_defaults(_bench_target=target)


def _run_bench(args: argparse.Namespace) -> int:
    return _resolve(args._bench_target)(args)


register(
    "bench",
    "benchmarks that print side-by-side ratios (model, engine)",
    _add_bench_arguments,
    "runtime.cli:_run_bench",
)


def _add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--model", help="model directory (default: models/zoo/ode-tiny)")
    p.add_argument("--steps", type=int, help="ODE steps (default: the model's default)")
    p.add_argument("--experts", type=int, help="MoE top-k or tree depth (default: maximum)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (0 = greedy)")
    p.add_argument(
        "--seed",
        type=int,
        help="sampling seed, for a repeatable text (default: random, printed with the stats)",
    )
    p.add_argument("--stream", action="store_true", help="flush text as it is produced")
    p.add_argument("--threads", type=int, help="torch threads, local model only (default: all cores)")
    remote = p.add_argument_group("server (with --server the model runs in `leanserve serve`, not here)")
    remote.add_argument(
        "--server",
        metavar="HOST:PORT",
        help="gRPC endpoint, e.g. 127.0.0.1:9000 (default: the model runs here)",
    )
    remote.add_argument("--quality", help="quality tier: fast, balanced or best (default: not set)")
    remote.add_argument(
        "--latency-budget-ms", type=float, help="whole-request budget mapped to steps (default: not set)"
    )
    remote.add_argument(
        "--timeout", type=float, help="gRPC deadline in seconds, also feeds the step policy (default: none)"
    )


register(
    "generate",
    "generate text from a prompt with a local model, or from a server with --server",
    _add_generate_arguments,
    "runtime.client:generate_main",
)


def _add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model_dir",
        nargs="?",
        help="model directory (default: the --config file's, else models/zoo/ode-tiny)",
    )
    p.add_argument(
        "--model-dir",
        dest="model_dir_flag",
        metavar="DIR",
        help="the model directory, as a flag (overrides the --config file's; default: the positional)",
    )
    p.add_argument(
        "--config",
        help="YAML: builder args (model_dir, engine, deployment, ...) or a Serve config such as "
        "deploy/serve/leanserve.yaml, whose first application's args are used (default: none)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        help="weights and KV pool of the torch backend; bfloat16 holds twice the tokens per KV byte "
        "(default: the --config file's, else float32)",
    )
    p.add_argument(
        "--backend",
        choices=("torch", "onnx"),
        help="inference backend; onnx needs `leanserve export` first (default: the --config file's, "
        "else torch)",
    )
    p.add_argument(
        "--served-model-name",
        metavar="NAME",
        help="the model name clients send and /v1/models lists (default: the name in config.json)",
    )
    p.add_argument(
        "--grpc-port",
        type=int,
        default=None,
        help="gRPC proxy port (default: the --config file's, else 9000)",
    )
    p.add_argument(
        "--http-port",
        type=int,
        default=None,
        help="HTTP proxy port (default: the --config file's, else 8000)",
    )
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray metrics export port (default 8080)")
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--num-cpus", type=int, help="CPUs given to the local Ray (default: all)")
    p.add_argument("--replicas", type=int, help="number of replicas (default: the --config file's, else 1)")
    p.add_argument("--threads", type=int, help="torch threads per replica (default: torch's, all cores)")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch backend: AOT-compiled decode (compiled on first use per model shape, then cached; "
        "default: eager)",
    )
    p.add_argument(
        "--compile-steps",
        help="with --compile: step counts with a whole-decode graph, e.g. 2,3,12 or 'all' "
        "(default: the default step count, the SLO controller's range and the quality tiers')",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for readiness")
    p.add_argument(
        "--graceful-shutdown-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="on SIGTERM / Ctrl-C, how long in-flight requests may run before they are cut "
        "(Serve's graceful_shutdown_timeout_s; default: the --config file's, else 20)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help="require this key on every generation call (HTTP `Authorization: Bearer KEY`, gRPC "
        "metadata `authorization: Bearer KEY`); default: $LEANSERVE_API_KEY of the environment, "
        "else no key. Prefer the environment variable: a flag is visible in `ps`",
    )
    from runtime.serve_config import add_engine_arguments  # standard library (+ runtime.settings: no torch)

    add_engine_arguments(p)


register(
    "serve",
    "serve a model over gRPC (:9000) and OpenAI HTTP (:8000) with a local Ray Serve",
    _add_serve_arguments,
    "runtime.serve_cli:main",
)


def _add_loadtest_arguments(p: argparse.ArgumentParser) -> None:
    from loadtest.cli import add_arguments  # standard library only

    add_arguments(p)


register(
    "loadtest",
    "drive a running server: latency vs steps/experts/tiers/rates, overload scenario, reports",
    _add_loadtest_arguments,
    "loadtest.cli:main",
)


def _add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model directory (default: models/zoo/ode-tiny)")


register(
    "info",
    "check a model directory (exit 2 if broken); show its architecture, step range, experts, tiers",
    _add_info_arguments,
    "runtime.local:info",
)


if __name__ == "__main__":
    sys.exit(main())
