"""The command line of a search (``aebnas search`` and every ``tune_configs/*.py``), made from the
settings' own declarations.

Each flag comes from a field of :class:`~aebnas.search.experiment.Experiment` (or the
:class:`~aebnas.settings.TrialSettings` it extends) declared with ``setting(default, help, …)``:
its help, choices and parser live there, once. ``FLAGS`` says which settings have a flag and in
which order ``--help`` lists them; ``--resolutions`` is the one flag that is not a setting of its
own (it goes into ``space_kwargs``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Sequence

from ..data.datasets import DatasetNotFoundError
from ..errors import ExperimentError
from .experiment import Experiment, experiment_path
from ..settings import Flag, int_list
from .storage import read_experiment_settings
from .tuner import run

RESOLUTIONS = "resolutions"  # not a setting: the flag sets space_kwargs["resolutions"]
# The settings that have a flag, in the order --help lists them (related flags together).
FLAGS = ("dataset", "data_dir", "download", "val_size", "test_size", "image_size", "space", RESOLUTIONS, "width_mult",
         "target_macs", "cost", "latency_table", "latency_backend", "target_ms", "epochs", "supernet", "finetune_lr",
         "supernet_epochs", "supernet_workers", "num_samples", "time_budget_s", "search_alg", "surrogate_batch",
         "scheduler", "grace_period", "reduction_factor", "cpus_per_trial", "gpus_per_trial", "amp", "max_concurrent",
         "batch_size", "lr", "storage_path", "name", "address", "seed", "split_seed", "resume")
_RESOLUTIONS_FLAG = Flag("comma-separated input resolutions to search (a dataset of your own: from its image size, "
                         "else the paper's 32…72)", type=int_list)
# The parser of a setting's text, by its annotation (a Flag may name its own).
_PARSERS = {"int": int, "float": float, "str": None}


def flag_of(f: dataclasses.Field) -> Flag:
    """The :class:`Flag` a setting is declared with; ValueError if it has none."""
    if "flag" not in f.metadata:
        raise ValueError(f"setting {f.name!r} is declared without a flag (aebnas.settings.setting)")
    return f.metadata["flag"]


def _parser_keywords(f: dataclasses.Field, flag: Flag) -> dict[str, Any]:
    """argparse's type / action / choices for the setting ``f``."""
    kw: dict[str, Any] = {}
    annotation = str(f.type).split(" |")[0]
    if flag.action is not None:
        kw["action"] = flag.action
    elif annotation == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif flag.type is not None:
        kw["type"] = flag.type
    elif _PARSERS.get(annotation) is not None:
        kw["type"] = _PARSERS[annotation]
    elif annotation not in _PARSERS:
        raise ValueError(f"setting {f.name!r} ({f.type}) needs a parser: setting(..., type=...)")
    if flag.choices and flag.parser_checks:
        kw["choices"] = flag.choices
    return kw


def add_arguments(parser: argparse.ArgumentParser, defaults: Experiment) -> None:
    """The flags of ``aebnas search`` and of every tune_config, defaulting to ``defaults``.

    A flag that is not given is absent from the parsed arguments (``argparse.SUPPRESS``), so that
    :func:`experiment_from_args` can tell it from one given with its default value.
    """
    fields = {f.name: f for f in dataclasses.fields(Experiment)}

    def add(name: str, flag: Flag, default: Any, **kw: Any) -> None:
        if not flag.show_default:
            shown = ""
        elif default is None:
            shown = "" if flag.none_means is None else f" (default: {flag.none_means})"
        else:
            shown = f" (default: {default})"
        parser.add_argument(flag.name or "--" + name.replace("_", "-"), dest=name, default=argparse.SUPPRESS,
                            help=flag.help_text() + shown, **kw)

    for name in FLAGS:
        if name == RESOLUTIONS:
            given = defaults.space_kwargs.get("resolutions")
            add(name, _RESOLUTIONS_FLAG, None if given is None else ",".join(map(str, given)),
                type=_RESOLUTIONS_FLAG.type)
            continue
        flag = flag_of(fields[name])
        add(name, flag, getattr(defaults, name), **_parser_keywords(fields[name], flag))


# Taken from the command line or the script's defaults on --resume, never from the saved experiment.
_NOT_FROM_SAVED = ("address", "resume", "name", "storage_path")


def experiment_from_args(args: argparse.Namespace, defaults: Experiment) -> Experiment:
    """The experiment the flags ask for: each flag not given takes its value from ``defaults`` or, with
    ``--resume``, from the saved experiment (so the same search continues without repeating its flags)."""
    fields = {f.name for f in dataclasses.fields(Experiment)}
    given = {k: v for k, v in vars(args).items() if k in fields}
    exp = dataclasses.replace(defaults, **given)
    if exp.resume and exp.name:
        try:
            saved = read_experiment_settings(experiment_path(exp))
        except FileNotFoundError:
            return exp  # run() says there is nothing to resume
        base = Experiment.from_json({k: v for k, v in saved.items() if k not in _NOT_FROM_SAVED}, defaults)
        exp = dataclasses.replace(base, **given)
    if getattr(args, "resolutions", None):
        exp = dataclasses.replace(exp, space_kwargs={**exp.space_kwargs, "resolutions": tuple(args.resolutions)})
    return exp


def run_cli(exp: Experiment) -> int:
    """``run`` with bad input turned into one message and exit code 2."""
    try:
        results = run(exp)
    except (ExperimentError, DatasetNotFoundError) as exc:
        print(f"aebnas: error: {exc}", file=sys.stderr)
        return 2
    return 1 if len(results) and results.num_errors == len(results) else 0


def main(defaults: Experiment, argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """Command line of a tune_config: flags override ``defaults``; returns the exit code."""
    parser = argparse.ArgumentParser(description=description)
    add_arguments(parser, defaults)
    return run_cli(experiment_from_args(parser.parse_args(argv), defaults))
