"""``aebnas`` command line: ``search | analyze | retrain | export | predict | info``.

``info`` lives here; the other modules register theirs in a ``CLI_COMMANDS`` dict
(``aebnas.experiment``, ``aebnas.deploy``, and ``analysis``, looked up by name at run time
so that the library never imports the analysis package).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from .config import ArchConfig, is_arch_key


class UsageError(Exception):
    """Bad input from the command line: printed as one message, exit code 2."""


def read_arch_json(path: str | Path) -> ArchConfig:
    """ArchConfig from a JSON file holding a flat trial config (trial settings are accepted and ignored)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such file (expected a JSON file with a flat trial config, e.g. a trial's arch.json)")
    try:
        flat = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise UsageError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(flat, dict):
        raise UsageError(f"{p}: expected a JSON object of flat config keys, got {type(flat).__name__}")
    from .trainable import SETTING_KEYS  # training settings travel in the same flat dict

    unknown = sorted(k for k in flat if not is_arch_key(k) and k not in SETTING_KEYS)
    if unknown:
        raise UsageError(f"{p}: unknown key(s) {unknown}: neither architecture keys (see aebnas.config) "
                         f"nor trial settings ({', '.join(sorted(SETTING_KEYS))})")
    try:
        return ArchConfig.from_flat({k: v for k, v in flat.items() if is_arch_key(k)})
    except ValueError as exc:
        raise UsageError(f"{p}: {exc}") from None


def arch_info(arch: ArchConfig) -> dict[str, Any]:
    """Costs (MMACs) and size of ``arch``: C_i per exit with every exit active, static MMACs, parameters."""
    from .cost import exit_costs, param_count, segment_macs

    costs = exit_costs(arch)
    cum = costs.cumulative()
    return {
        "exits": [{"exit": j, "position": e.position, "depth": e.depth, "macs": float(cum[j]),
                   "branch_macs": float(costs.branch[j])} for j, e in enumerate(arch.exits)],
        "final_macs": float(cum[-1]),
        "static_macs": costs.static_macs,
        "segments_macs": segment_macs(arch),
        "params": param_count(arch),
        "resolution": arch.resolution,
        "num_classes": arch.num_classes,
    }


def cmd_info(args: argparse.Namespace) -> int:
    info = arch_info(read_arch_json(args.config))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"{args.config}: resolution {info['resolution']}, {info['num_classes']} classes, "
          f"{info['params']:,} parameters")
    print(f"{'exit':>6} {'after':>6} {'modules':>8} {'C_i (MMACs)':>12} {'branch (MMACs)':>15}")
    for e in info["exits"]:
        print(f"{e['exit'] + 1:>6} {'stage' + str(e['position']):>6} {e['depth']:>8} "
              f"{e['macs']:>12.3f} {e['branch_macs']:>15.3f}")
    print(f"{'final':>6} {'head':>6} {'':>8} {info['final_macs']:>12.3f}")
    print(f"static network (no exits): {info['static_macs']:.3f} MMACs")
    return 0


# Subcommands: name → (help, add_arguments, run). Other modules register theirs here.
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="JSON file with a flat trial config (a trial's arch.json)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {
    "info": ("MACs per exit, static MACs and parameters of an architecture", _add_info, cmd_info),
}


def _load_command_modules() -> None:
    import importlib

    for mod in ("aebnas.experiment", "aebnas.deploy"):
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise
            continue
        COMMANDS.update(getattr(module, "CLI_COMMANDS", {}))
    try:
        from analysis.__main__ import CLI_COMMANDS as analysis_commands
    except ModuleNotFoundError:
        return
    COMMANDS.update(analysis_commands)


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = argparse.ArgumentParser(prog="aebnas", description="Early-exit network search on Ray Tune (AEBNAS)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"aebnas {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
