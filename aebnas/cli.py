"""``aebnas`` command line: ``search | analyze | retrain | export | predict | info | supernet | latency``.

All the wiring is here: each command's flags and the call it makes. A command imports
its module only when it runs, so ``aebnas predict`` needs torch alone (no Ray), and
``analyze`` reaches the ``analysis`` package by name (the library never imports it); an
import that fails is shown as it is, not hidden.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from search_spaces import SPACES

from .config import ArchConfig, is_arch_key, refuse_old_keys
from .errors import ExperimentError, UsageError
from .settings import LATENCY_BACKENDS, SETTING_KEYS, int_list


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
    unknown = sorted(k for k in flat if not is_arch_key(k) and k not in SETTING_KEYS)
    try:
        refuse_old_keys(unknown)
    except ValueError as exc:
        raise UsageError(f"{p}: {exc}") from None
    if unknown:
        raise UsageError(f"{p}: unknown key(s) {unknown}: neither architecture keys (see aebnas.config) "
                         f"nor trial settings ({', '.join(sorted(SETTING_KEYS))})")
    try:
        return ArchConfig.from_flat({k: v for k, v in flat.items() if is_arch_key(k)})
    except ValueError as exc:
        raise UsageError(f"{p}: {exc}") from None


def arch_info(arch: ArchConfig) -> dict[str, Any]:
    """Costs (MMACs) and size of ``arch``: C_i per exit with every exit active, static MMACs, parameters."""
    from .cost.macs import exit_costs, param_count, segment_macs  # ptflops: only for this command

    costs = exit_costs(arch)
    cum = costs.cumulative()
    return {
        "exits": [{"exit": j, "position": e.position, "depth": e.depth, "branch": e.describe(), "macs": float(cum[j]),
                   "branch_macs": float(costs.branch[j])} for j, e in enumerate(arch.exits)],
        "final_macs": float(cum[-1]),
        "static_macs": costs.static_cost,
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
    width = max([6] + [len(e["branch"]) for e in info["exits"]])
    print(f"{'exit':>6} {'after':>6} {'modules':>8} {'branch':>{width}} {'C_i (MMACs)':>12} {'branch (MMACs)':>15}")
    for e in info["exits"]:
        print(f"{e['exit'] + 1:>6} {'stage' + str(e['position']):>6} {e['depth']:>8} {e['branch']:>{width}} "
              f"{e['macs']:>12.3f} {e['branch_macs']:>15.3f}")
    print(f"{'final':>6} {'head':>6} {'':>8} {'':>{width}} {info['final_macs']:>12.3f}")
    print(f"static network (no exits): {info['static_macs']:.3f} MMACs")
    return 0


# ----------------------------------------------------------------- commands
def _add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="JSON file with a flat trial config (a trial's arch.json)")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")


def _add_search(p: argparse.ArgumentParser) -> None:
    from .search.experiment import Experiment
    from .search.flags import add_arguments

    add_arguments(p, Experiment())


def _cmd_search(args: argparse.Namespace) -> int:
    from .search.experiment import Experiment
    from .search.flags import experiment_from_args, run_cli

    return run_cli(experiment_from_args(args, Experiment()))


def _add_retrain(p: argparse.ArgumentParser) -> None:
    from .deploy.retrain import DEFAULT_EPOCHS

    p.add_argument("experiment_dir", help="experiment directory of a search (STORAGE_PATH/NAME, or its URI)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--trial", help="trial to retrain: directory name (trial_…), trial id or a unique end of it")
    which.add_argument("--best", action="store_true", help="retrain the trial with the best validation score "
                       "at --target-macs")
    p.add_argument("--target-macs", type=float, help="target average MMACs for ranking and threshold tuning "
                   "(default: the experiment's)")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help="training epochs (default: %(default)s; "
                   "0 with --inherit or --supernet: score the inherited weights as they are)")
    start = p.add_mutually_exclusive_group()
    start.add_argument("--inherit", action="store_true", help="start from the weights of the supernet the trial "
                       "inherited from, fine-tuned at the trial's finetune_lr (default: train from scratch)")
    start.add_argument("--supernet", metavar="PATH", help="start from this supernet file's weights instead")
    p.add_argument("--out", help="run directory (default: EXPERIMENT_DIR/retrain_TRIAL); rerun to resume")
    p.add_argument("--data-dir", help="where the dataset is, if not where the search found it")
    p.add_argument("--download", action=argparse.BooleanOptionalAction, default=None,
                   help="download the dataset with torchvision if missing (default: as the search)")
    p.add_argument("--batch-size", type=int, help="default: the trial's")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle schedule (default: the trial's lr; "
                   "with --inherit or --supernet its finetune_lr)")
    p.add_argument("--seed", type=int, help="seed of initial weights and batch order (default: the trial's; "
                   "the train/val split is always the search's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 …")


def _cmd_retrain(args: argparse.Namespace) -> int:
    from .deploy.retrain import RetrainRequest, retrain
    from .training.loop import NonFiniteLossError

    req = RetrainRequest(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RetrainRequest)})
    try:
        retrain(req)
    except NonFiniteLossError as exc:
        print(f"aebnas retrain: error: {exc}", flush=True)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted; the last finished epoch is saved: run the same command again to resume", flush=True)
        return 130
    return 0


def _add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `aebnas retrain`")
    p.add_argument("--out", required=True, help="TorchScript file to write (model.json goes next to it); with "
                   "--format onnx a directory (ONNX graphs, model.json and the driver aebnas_onnx.py)")
    p.add_argument("--format", choices=("torchscript", "onnx"), default="torchscript",
                   help="torchscript (one file, needs torch) or onnx (needs only onnxruntime and numpy to run; "
                        "the onnx extra to export)")
    p.add_argument("--target-macs", type=float,
                   help="re-tune the thresholds on the run's validation outputs for this target (MMACs)")


def _cmd_export(args: argparse.Namespace) -> int:
    if args.target_macs is not None and not args.target_macs > 0:
        raise UsageError(f"--target-macs={args.target_macs} must be > 0 (MMACs)")
    if args.format == "onnx":
        from .deploy.onnx_export import export_onnx as export
    else:
        from .deploy.torchscript import export
    export(args.run_dir, args.out, target_macs=args.target_macs)
    return 0


def _add_predict(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="TorchScript file or ONNX export directory written by `aebnas export`")
    p.add_argument("images", nargs="+", help="PNG or JPEG files")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of one line per image")


def _cmd_predict(args: argparse.Namespace) -> int:
    from .deploy.torchscript import format_prediction, predict

    predictions = predict(args.model, args.images)
    if args.json:
        print(json.dumps([dataclasses.asdict(p) for p in predictions], indent=1))
    else:
        for p in predictions:
            print(format_prediction(p))
    return 0


def _add_supernet(p: argparse.ArgumentParser) -> None:
    from .training.supernet_file import SupernetSettings

    d = SupernetSettings()
    sub = p.add_subparsers(dest="supernet_command", required=True)
    t = sub.add_parser("train", help="train a weight-sharing supernet (Ray Train; rerun to resume)",
                       description="Train a supernet of a search space by the sandwich rule on Ray Train. "
                       "Rerunning the same command resumes it; a finished one is reused.")
    t.add_argument("--dataset", default="cifar10-subset", help="as `aebnas search --dataset` (default: %(default)s)")
    t.add_argument("--data-dir", help="directory with the dataset in torchvision's layout")
    t.add_argument("--download", action="store_true", help="download the dataset with torchvision if missing")
    t.add_argument("--val-size", type=int, help="validation images held out of training: the searches' own "
                   "(default: the dataset's default)")
    t.add_argument("--test-size", type=float, help="a folder without DIR/test/: the fraction of each class drawn as "
                   "the test split, the searches' own (default: 0.2)")
    t.add_argument("--image-size", type=int, help="a folder of images: the size (px) they are stored at, the "
                   "searches' own (default: from the images, at most 72)")
    t.add_argument("--seed", type=int, default=0, help="seed of the data split (the searches' --seed) and of "
                   "training (default: %(default)s)")
    t.add_argument("--space", default="aebnas", choices=tuple(SPACES),
                   help="the space it is for; the three share their value sets, so one supernet serves all "
                   "three (default: %(default)s)")
    t.add_argument("--resolutions", type=int_list, help="comma-separated input resolutions to cover "
                   "(default: the paper's 32…72)")
    t.add_argument("--width-mult", type=float, default=1.0, help="channel width multiplier (default: %(default)s)")
    t.add_argument("--epochs", type=int, default=d.epochs, help="default: %(default)s")
    t.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (default: %(default)s)")
    t.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default: %(default)s)")
    t.add_argument("--lr-batch", type=int, default=d.lr_batch,
                   help="the batch size --lr is for: at another --batch-size the peak learning rate scales "
                   "linearly, lr x batch-size / lr-batch (default: --lr as given)")
    t.add_argument("--random-subnets", type=int, default=d.random_subnets,
                   help="random subnets per step besides largest and smallest (default: %(default)s)")
    t.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction,
                   help="first fraction of the epochs training the largest subnet alone (default: %(default)s)")
    t.add_argument("--amp", action="store_true", help="mixed precision on CUDA")
    t.add_argument("--compile", action="store_true", help="torch.compile the largest and smallest subnets' "
                   "training steps: compiles for minutes first, speed only (on 2 CPU cores it did not pay: "
                   "docs/benchmarks.md, claim 27)")
    t.add_argument("--static-shapes", action="store_true", help="the static-shape sandwich step (not the static space): every subnet at the "
                   "largest one's shapes with its choices as masks, compiled once per resolution (CUDA graphs on "
                   "a GPU); the same gradients, more arithmetic: for GPUs (docs/supernet.md, \"The static-shape step\")")
    t.add_argument("--workers", type=int, default=1, help="Ray Train workers (data-parallel); 0 trains in "
                   "this process without Ray (default: %(default)s)")
    t.add_argument("--cpus-per-worker", type=float, default=None,
                   help="CPUs (and torch threads) of each worker (default: the cluster's CPUs shared out "
                        "among the workers)")
    t.add_argument("--address", help="Ray cluster address HOST:PORT (default: $RAY_ADDRESS or local)")
    t.add_argument("--out", default="aebnas_supernet", help="run directory; OUT/supernet.pt is the result "
                   "(default: %(default)s)")
    e = sub.add_parser("eval", help="accuracy and MACs of one subnet of a supernet",
                       description="Extract ARCH from SUPERNET, recalibrate BatchNorm and score it as a "
                       "search would, on the split the supernet was trained with.")
    e.add_argument("supernet", help="supernet file (OUT/supernet.pt of `aebnas supernet train`)")
    e.add_argument("config", help="JSON file with a flat config of the subnet (e.g. a trial's arch.json)")
    e.add_argument("--split", default="val", choices=("val", "test"), help="default: %(default)s")
    e.add_argument("--data-dir", help="where the dataset is")
    e.add_argument("--image-size", type=int, help="a folder of images: the --image-size the supernet was trained with")
    e.add_argument("--test-size", type=float, help="a folder of images: the --test-size the supernet was trained with")
    e.add_argument("--json", action="store_true", help="print the figures as JSON")


def _cmd_supernet(args: argparse.Namespace) -> int:
    if args.supernet_command == "train":
        return _supernet_train(args)
    return _supernet_eval(args)


def _supernet_train(args: argparse.Namespace) -> int:
    from .training.supernet_file import SupernetSettings
    from .training.supernet_job import SupernetRequest, train_supernet

    try:
        settings = SupernetSettings(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                                    lr_batch=args.lr_batch, random_subnets=args.random_subnets,
                                    warmup_fraction=args.warmup_fraction, amp=args.amp, seed=args.seed)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    request = SupernetRequest(out=args.out, dataset=args.dataset, space_name=args.space, data_dir=args.data_dir,
                              download=args.download, val_size=args.val_size, image_size=args.image_size,
                              test_size=args.test_size, split_seed=args.seed, width_mult=args.width_mult,
                              space_kwargs={"resolutions": tuple(args.resolutions)} if args.resolutions else {},
                              settings=settings, workers=args.workers, cpus_per_worker=args.cpus_per_worker,
                              address=args.address, compile=args.compile, static_shapes=args.static_shapes)
    try:
        train_supernet(request)
    except ExperimentError as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        print("\ninterrupted; the last finished epoch is saved: run the same command again to resume", flush=True)
        return 130
    return 0


def _supernet_eval(args: argparse.Namespace) -> int:
    from .data.datasets import load_dataset
    from .training.supernet_file import load_supernet
    from .training.supernet import score_subnet
    from .training.loop import Scorer, select_device

    try:
        supernet, info = load_supernet(args.supernet)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    arch = read_arch_json(args.config).replace(width_mult=info.width_mult, num_classes=info.num_classes,
                                               in_channels=info.in_channels)
    try:
        data = load_dataset(info.dataset, data_dir=args.data_dir, val_size=info.val_size, seed=info.split_seed,
                            image_size=args.image_size, test_size=args.test_size)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(f"dataset of {args.supernet}: {exc}") from None
    device = select_device("auto")
    # Evaluation batches of 512 whatever the supernet's eval_batch_size, as this command always scored.
    scorer = Scorer.from_settings(data, arch.resolution, device, info.settings, eval_batch_size=512)
    try:
        outputs = score_subnet(supernet.to(device), arch, scorer, args.split)
    except ValueError as exc:
        raise UsageError(f"{args.config}: {exc}") from None
    acc = outputs.exit_accuracy()
    figures = arch_info(arch)
    result = {"split": args.split, "images": int(len(outputs.labels)),
              "exits": [{**e, "accuracy": float(a)} for e, a in zip(figures["exits"], acc[:-1])],
              "final_accuracy": float(acc[-1]), "final_macs": figures["final_macs"],
              "static_macs": figures["static_macs"], "params": figures["params"], "supernet": info.describe()}
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.config} in {args.supernet} ({info.describe()})")
    print(f"inherited weights, BatchNorm recalibrated; {args.split} split, {result['images']} images")
    print(f"{'exit':>6} {'after':>7} {'accuracy %':>11} {'C_i (MMACs)':>12}")
    for e in result["exits"]:
        print(f"{e['exit'] + 1:>6} {'stage' + str(e['position']):>7} {e['accuracy']:>11.2f} {e['macs']:>12.3f}")
    print(f"{'final':>6} {'head':>7} {result['final_accuracy']:>11.2f} {result['final_macs']:>12.3f}")
    return 0


def _add_latency(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="latency_command", required=True)
    t = sub.add_parser("profile", help="measure every piece of a space on this machine (rerun to resume)",
                       description="Measure the latency of every block choice of every stage at every resolution, "
                       "every exit branch choice, the stem and the head, on this machine, with ONNX Runtime and "
                       "PyTorch: medians after warm-up. The table feeds --cost latency.")
    t.add_argument("--out", required=True, help="JSON table to write (rerun the same command to resume)")
    t.add_argument("--space", default="aebnas", choices=tuple(SPACES),
                   help="the space it is for; the three share their value sets (default: %(default)s)")
    t.add_argument("--resolutions", type=int_list, help="comma-separated input resolutions (default: the paper's "
                   "32…72)")
    t.add_argument("--width-mult", type=float, default=1.0, help="channel width multiplier (default: %(default)s)")
    t.add_argument("--num-classes", type=int, default=10, help="classes of the dataset (default: %(default)s)")
    t.add_argument("--in-channels", type=int, default=3, help="image channels (default: %(default)s)")
    t.add_argument("--threads", type=int, default=1, help="intra-op threads (default: %(default)s)")
    t.add_argument("--batch", type=int, default=1, help="batch size (default: %(default)s)")
    t.add_argument("--backends", default=",".join(LATENCY_BACKENDS),
                   help=f"comma-separated: {', '.join(LATENCY_BACKENDS)} (default: %(default)s)")
    t.add_argument("--warmup", type=int, default=10, help="untimed runs per piece (default: %(default)s)")
    t.add_argument("--repeats", type=int, default=30, help="timed runs per piece; the median is kept "
                   "(default: %(default)s)")
    t.add_argument("--calibration-networks", type=int, default=6, help="random whole networks run with their "
                   "exits to calibrate the sums of pieces on this machine; 0: no calibration (default: %(default)s)")


def _cmd_latency(args: argparse.Namespace) -> int:
    from .deploy.latency_profile import ProfileRequest, profile
    from .space_values import space_values_of

    try:
        space = space_values_of({"resolutions": tuple(args.resolutions)} if args.resolutions else {})
        request = ProfileRequest(out=args.out, space=space, width_mult=args.width_mult, num_classes=args.num_classes,
                                 in_channels=args.in_channels, threads=args.threads, batch=args.batch,
                                 backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
                                 warmup=args.warmup, repeats=args.repeats,
                                 calibration_networks=args.calibration_networks)
        profile(request)
    except (ValueError, ExperimentError) as exc:
        raise UsageError(str(exc)) from None
    except KeyboardInterrupt:
        print("\ninterrupted; the pieces measured so far are saved: run the same command again to resume",
              flush=True)
        return 130
    return 0


def _analysis_cli() -> Any:
    # By name at run time: the analysis package imports aebnas, never the other way round.
    return importlib.import_module("analysis.__main__")


def _add_analyze(p: argparse.ArgumentParser) -> None:
    _analysis_cli().add_arguments(p)


def _cmd_analyze(args: argparse.Namespace) -> int:
    return _analysis_cli().run(args)


Command = tuple[str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]
COMMANDS: dict[str, Command] = {
    "search": ("run a search (same flags as tune_configs/*.py)", _add_search, _cmd_search),
    "analyze": ("Pareto front, post-hoc thresholds and plots of finished or partial searches", _add_analyze,
                _cmd_analyze),
    "retrain": ("train a trial's architecture from scratch for longer, tune its exits, test it",
                _add_retrain, _cmd_retrain),
    "export": ("write a run with its exits, thresholds and preprocessing (TorchScript file or ONNX graphs)",
               _add_export, _cmd_export),
    "predict": ("classify image files with an exported model", _add_predict, _cmd_predict),
    "info": ("MACs per exit, static MACs and parameters of an architecture", _add_info, cmd_info),
    "supernet": ("train a weight-sharing supernet, or score one of its subnets", _add_supernet, _cmd_supernet),
    "latency": ("measure a latency table of a space on this machine (for --cost latency)", _add_latency,
                _cmd_latency),
}
"""name → (help, add the command's flags, run it). Flags are added only for the command given."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; only the command named in ``argv`` gets its flags (and imports its module)."""
    args = sys.argv[1:] if argv is None else list(argv)
    chosen = next((a for a in args if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="aebnas", description="Early-exit network search on Ray Tune (AEBNAS)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_args, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            add_args(p)
        p.set_defaults(_run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except UsageError as exc:
        print(f"aebnas {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
