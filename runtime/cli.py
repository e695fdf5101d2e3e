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


def build_parser() -> argparse.ArgumentParser:
    """Builds the top-level parser with one subparser per registered command."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Serve small elastic-compute transformer LMs; each request chooses its compute.",
    )
    parser.add_argument("--version", action=_VersionAction, help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    if COMMANDS:
        subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
        for command in COMMANDS:
            sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
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

    try:
        rc = _resolve(target)(args)
    except USER_ERRORS as exc:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0 if rc is None else int(rc)


# --- Subcommands -------------------------------------------------------------------------------------
# Register every command here with register(name, help, add_arguments, "package.module:function").


if __name__ == "__main__":
    sys.exit(main())
