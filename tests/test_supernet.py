"""The supernet: sandwich training, the file and its checks, and searches that inherit from it.

Real data (small .npz files of real CIFAR-10 images) and real Ray throughout; a tiny space
and width keep every step fast.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from aebnas.config import EXIT_BRANCHES, SpaceValues, largest_arch, random_arch, smallest_arch
from aebnas.data.datasets import load_dataset
from aebnas.nn import covers, extract
from aebnas.training.supernet_file import (SupernetSettings, check_supernet, image_digests, load_supernet,
                                          read_supernet_info, save_supernet)
from aebnas.training.supernet import SupernetTraining, distillation_loss, score_subnet
from aebnas.training.loop import Scorer, load_checkpoint
from ray_sandbox import ray_sandbox  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
TINY = SpaceValues(depths=(1, 2), kernels=(3, 5), expansions=(2, 3), resolutions=(32,), exit_m1_resizes=(8,),
                   exit_m2_resizes=(0, 8), exit_kernels=(3,), exit_expansions=(1, 2))
TINY_KWARGS = {k: list(v) for k, v in dataclasses.asdict(TINY).items()}
WIDTH = 0.25


@pytest.fixture(scope="module")
def data(small_npz):
    return load_dataset(str(small_npz), val_size=100, seed=0)


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """A tiny supernet trained 2 epochs (1 warm-up, 1 sandwich) and its file."""
    settings = SupernetSettings(epochs=2, batch_size=64, warmup_fraction=0.5, seed=0)
    run = SupernetTraining(TINY, WIDTH, data, settings, torch.device("cpu"), dataset_name=data.name)
    stats = [run.train_epoch() for _ in range(2)]
    path = save_supernet(tmp_path_factory.mktemp("supernet") / "supernet.pt", run.model, run.info())
    return run, stats, path


# ------------------------------------------------------------------ sampling and loss


def test_random_arch_is_a_seeded_subnet_with_enough_exits():
    from aebnas.nn import ElasticEarlyExitNet

    supernet = ElasticEarlyExitNet(TINY, WIDTH, 10)
    archs = [random_arch(TINY, random.Random(i), width_mult=WIDTH, min_exits=2, branches=EXIT_BRANCHES)
             for i in range(40)]
    assert all(covers(supernet, a) is None for a in archs)
    assert all(a.num_exits >= 2 for a in archs)
    assert archs[3] == random_arch(TINY, random.Random(3), width_mult=WIDTH, min_exits=2, branches=EXIT_BRANCHES)
    # It explores the space: both depths, both branches, both depths of the paper's branch, several exit sets.
    assert {s.depth for a in archs for s in a.stages} == {1, 2}
    assert {e.branch for a in archs for e in a.exits} == set(EXIT_BRANCHES)
    assert {e.depth for a in archs for e in a.exits if e.branch == "aebnas"} == {1, 2}
    assert len({a.exit_positions for a in archs}) >= 4


def test_distillation_loss_is_soft_cross_entropy_on_every_output():
    torch.manual_seed(0)
    teacher, final, exit1 = torch.randn(5, 10), torch.randn(5, 10), torch.randn(5, 10)
    p = teacher.softmax(1)

    def soft_ce(z):
        return float(-(p * z.log_softmax(1)).sum(1).mean())

    assert float(distillation_loss([exit1, final], teacher, 0.5)) == pytest.approx(soft_ce(final) + 0.5 * soft_ce(exit1))
    # Learning from the teacher is minimal where the student matches it (Gibbs' inequality).
    assert float(distillation_loss([teacher], teacher, 1.0)) < float(distillation_loss([final], teacher, 1.0))


def test_supernet_settings_refuse_bad_values():
    for bad, message in (({"random_subnets": -1}, "random_subnets=-1"), ({"warmup_fraction": 1.0}, "warmup_fraction=1.0"),
                         ({"epochs": 0}, "epochs=0"), ({"grad_clip": 0}, "grad_clip=0")):
        with pytest.raises(ValueError, match=message):
            SupernetSettings(**bad)


def test_sandwich_subnets_per_step(data):
    settings = SupernetSettings(epochs=4, warmup_fraction=0.25, random_subnets=3)
    one = SupernetTraining(TINY, WIDTH, data, settings, torch.device("cpu"))
    two = SupernetTraining(TINY, WIDTH, data, settings, torch.device("cpu"), rank=1, world_size=2)
    assert one.subnets(0, 0) == [one.largest]  # warm-up: the largest alone
    step = one.subnets(1, 5)
    assert len(step) == 5 and step[0] == largest_arch(TINY, width_mult=WIDTH) and step[1] == smallest_arch(TINY, width_mult=WIDTH)
    assert two.subnets(1, 5) == step  # every worker draws the same subnets
    assert one.subnets(1, 6)[2:] != step[2:]


# ------------------------------------------------------------------ training


def test_training_learns_and_uses_only_the_training_split(trained, data):
    run, stats, _ = trained
    assert stats[0]["warmup"] and not stats[1]["warmup"]
    assert stats[1]["loss_distilled"] > 0 and all(np.isfinite(s["loss"]) for s in stats)
    train, val, test = image_digests(data.x_train), image_digests(data.x_val), image_digests(data.x_test)
    # The splits are disjoint (this file has no duplicate images), ...
    assert not np.intersect1d(train, val).size and not np.intersect1d(train, test).size
    assert not np.intersect1d(val, test).size
    # ... the batches it trained on are the training split's images, ...
    assert np.array_equal(image_digests(run.train_batches.x.numpy()), train)
    # ... so is the BatchNorm calibration sample of every evaluation, ...
    calibration = image_digests(run.scorer(32).calibration.x.numpy())
    assert np.isin(calibration, train).all() and len(calibration) > 0
    # ... and the file records exactly the training split.
    assert np.array_equal(read_supernet_info(trained[2]).train_digests, train)


def test_image_digests_ignore_file_order(data):
    shuffled = data.x_train[np.random.default_rng(0).permutation(len(data.x_train))]
    assert np.array_equal(image_digests(shuffled), image_digests(data.x_train))


def test_two_workers_train_what_one_does(data):
    """Data-parallel arithmetic: 2 shards of half a batch, gradients averaged = 1 worker's step.

    BatchNorm in eval mode: in training mode each worker normalises by its own shard's
    statistics (as DDP without SyncBatchNorm does), which no all-reduce can equal.
    """
    import torch.distributed as dist

    from aebnas.training.supernet import _all_reduce_mean

    settings = SupernetSettings(epochs=1, batch_size=64, warmup_fraction=0.0, random_subnets=1)
    run = SupernetTraining(TINY, WIDTH, data, settings, torch.device("cpu"))
    x, y = next(iter(run.train_batches))
    run.model.eval()

    def loss(part):
        return sum(torch.nn.functional.cross_entropy(o, y[part]) for o in run.model(x[part], run.largest))

    grads = []
    for part in (slice(0, 32), slice(32, 64)):
        run.model.zero_grad(set_to_none=True)
        loss(part).backward()
        grads.append([p.grad.clone() for p in run.params if p.grad is not None])
    run.model.zero_grad(set_to_none=True)
    loss(slice(0, 64)).backward()
    # the largest subnet's parameters (EDANAS's exits and the one-module classifiers are not in it)
    used = [p for p in run.params if p.grad is not None]
    assert len(grads[0]) == len(grads[1]) == len(used) < len(run.params)
    whole = [p.grad.clone() for p in used]
    # A one-process gloo group stands for the all-reduce's sum: give it the sum of both halves.
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        for p, a, b in zip(used, *grads):
            p.grad = a + b
        _all_reduce_mean(used, 2)
        for p, w in zip(used, whole):
            torch.testing.assert_close(p.grad, w, atol=1e-5, rtol=1e-4)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ the file and its checks


def test_file_round_trip(trained, data):
    run, _, path = trained
    supernet, info = load_supernet(path)
    assert info.space == TINY and info.width_mult == WIDTH and info.num_classes == data.num_classes
    assert info.epochs == 2 and info.val_size == 100 and info.classes == list(data.classes)
    assert all(p.dtype == torch.float32 for p in supernet.parameters())
    # float16 storage: the weights are those trained, to float16 precision.
    for (name, a), b in zip(run.model.state_dict().items(), supernet.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(b, a.half().float(), msg=name)
    torch.load(path, weights_only=True)  # tensors and plain values only


def test_not_a_supernet_file_is_refused(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"model": {}}, path)
    with pytest.raises(ValueError, match="is not an aebnas supernet file"):
        read_supernet_info(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_supernet_info(tmp_path / "missing.pt")


def test_a_supernet_file_of_format_version_1_is_refused_with_what_to_do(trained, tmp_path):
    """Version 1 held the depthwise exit modules aebnas had before the paper's: its exit weights fit nothing."""
    record = torch.load(trained[2], weights_only=True)
    record["version"] = 1
    old = tmp_path / "old.pt"
    torch.save(record, old)
    for read in (read_supernet_info, load_supernet):
        with pytest.raises(ValueError) as info:
            read(old)
        message = str(info.value)
        assert "format version 1" in message and "depthwise modules aebnas had before the paper" in message
        assert "reads version 2" in message and "aebnas supernet train" in message


def test_check_supernet_names_each_problem(trained, data, small_npz):
    info = read_supernet_info(trained[2])
    check_supernet(info, needs={"kernels": {3}, "resolutions": {32}}, width_mult=WIDTH, data=data)  # fine
    with pytest.raises(ValueError, match=r"kernels \[7\] are not in the supernet's \[3, 5\]"):
        check_supernet(info, needs={"kernels": {3, 7}}, width_mult=WIDTH)
    with pytest.raises(ValueError, match="width_mult 0.5 differs from the supernet's 0.25"):
        check_supernet(info, needs={}, width_mult=0.5)
    # Another split of the same file: the supernet trained on some of its validation images.
    other = load_dataset(str(small_npz), val_size=100, seed=1)
    with pytest.raises(ValueError, match=r"it was trained on \d+ of this search's validation/test images"):
        check_supernet(info, needs={}, width_mult=WIDTH, data=other)


def test_scoring_a_subnet_leaves_the_supernet_untouched(trained, data):
    run, _, path = trained
    supernet, _ = load_supernet(path)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    scorer = Scorer(data, 32, torch.device("cpu"), batch_size=64, bn_batches=2, seed=0)
    arch = random_arch(TINY, random.Random(0), width_mult=WIDTH)
    out = score_subnet(supernet, arch, scorer, "val")
    assert out.prediction.shape == (arch.num_exits + 1, 100)
    assert all(torch.equal(before[k], v) for k, v in supernet.state_dict().items())
    # The same candidate scored twice gets the same outputs (the calibration sample is fixed).
    again = score_subnet(supernet, arch, scorer, "val")
    assert np.array_equal(out.prediction, again.prediction)


def test_supernet_eval_command(trained, tmp_path):
    _, _, path = trained
    arch = tmp_path / "arch.json"
    arch.write_text(json.dumps(smallest_arch(TINY, width_mult=WIDTH).to_flat()))
    from aebnas.cli import main

    proc = subprocess.run([sys.executable, "-m", "aebnas.cli", "supernet", "eval", str(path), str(arch), "--json"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["images"] == 100 and len(result["exits"]) == 1 and 0 <= result["final_accuracy"] <= 100
    assert result["final_macs"] > result["exits"][0]["macs"] > 0
    bad = dict(json.loads(arch.read_text()), stage1_block0_kernel=7)
    arch.write_text(json.dumps(bad))
    assert main(["supernet", "eval", str(path), str(arch)]) == 2


# ------------------------------------------------------------------ searches that inherit


def _search(storage, small_npz, supernet, **changes):
    """A tiny search whose candidates inherit from ``supernet`` (a path, or None)."""
    from aebnas.search.experiment import Experiment

    base = Experiment(dataset=str(small_npz), val_size=100, space="aebnas", space_kwargs=TINY_KWARGS,
                      width_mult=WIDTH, target_macs=0.5, supernet=supernet and str(supernet), epochs=0, num_samples=3,
                      scheduler="fifo", batch_size=64, storage_path=str(storage), name="inherit", seed=0, verbose=0)
    return dataclasses.replace(base, **changes)


def test_search_inherits_weights_from_the_supernet(ray_local, trained, small_npz, tmp_path):
    from aebnas.search.tuner import run
    from aebnas.training.supernet_file import inherited_network

    _, _, path = trained
    exp = _search(tmp_path, small_npz, path, num_samples=2)
    results = run(exp)
    assert len(results) == 2 and not results.errors
    from analysis.results import load_experiment

    assert set(load_experiment(tmp_path / "inherit").trials["status"]) == {"finished"}  # epoch 0 finishes them
    record = load_checkpoint(path)
    for r in results:
        m = r.metrics
        assert m["epoch"] == 0 and m["inherited"] and "loss" not in m and "test_accuracy" in m
        assert 0 <= m["early_exit"] <= 1 and 0 <= m["test_early_exit"] <= 1
        # The trial scored the very weights the supernet holds for its architecture.
        flat = json.loads((Path(r.path) / "arch.json").read_text())
        from aebnas.settings import parse_trial_config

        arch, settings = parse_trial_config(flat)
        ckpt = load_checkpoint(Path(r.checkpoint.path) / "checkpoint.pt")
        inherited = inherited_network(record, arch, "margin").state_dict()
        for name, value in inherited.items():
            if "running" not in name and name != "thresholds" and value.is_floating_point():  # BN stats: recalibrated
                torch.testing.assert_close(ckpt["model"][name], value, msg=name)


def test_search_fine_tunes_inherited_weights(ray_local, trained, small_npz, tmp_path):
    from aebnas.search.tuner import run

    results = run(_search(tmp_path, small_npz, trained[2], epochs=2, num_samples=1, name="finetune",
                          finetune_lr=0.005))
    assert not results.errors
    for r in results:
        history = r.metrics_dataframe
        assert list(history["epoch"]) == [1, 2] and history["inherited"].all()
        assert np.isfinite(history["loss"]).all()


def test_search_refuses_a_supernet_that_does_not_fit(trained, small_npz, tmp_path):
    from aebnas.search.tuner import run
    from aebnas.errors import ExperimentError

    path = trained[2]
    with pytest.raises(ExperimentError, match=r"kernels \[7\] are not in the supernet's \[3, 5\]; train one") \
            as refused:  # no flag makes the kernels fit: no flags are named
        run(_search(tmp_path, small_npz, path, space_kwargs={**TINY_KWARGS, "kernels": (3, 7)}))
    assert "--width-mult" not in str(refused.value)
    with pytest.raises(ExperimentError, match=r"width_mult 0.5 differs.*search the supernet's own space "
                       r"\(--width-mult 0.25 --resolutions 32\)"):  # the flags that make it fit
        run(_search(tmp_path, small_npz, path, width_mult=0.5))
    with pytest.raises(ExperimentError, match="supernet file .* does not exist"):
        run(_search(tmp_path, small_npz, tmp_path / "none.pt"))
    with pytest.raises(ExperimentError, match=r"epochs=0 must be an integer ≥ 1 \(≥ 0 with a supernet"):
        run(_search(tmp_path, small_npz, None))


def test_search_refuses_a_supernet_trained_on_its_validation_images(ray_local, trained, small_npz, tmp_path):
    from aebnas.search.tuner import run
    from aebnas.errors import ExperimentError

    with pytest.raises(ExperimentError, match="validation/test images"):
        run(_search(tmp_path, small_npz, trained[2], seed=1))  # seed 1: another train/val split
    assert not (tmp_path / "inherit").exists() or not list((tmp_path / "inherit").glob("trial_*"))


# ------------------------------------------------------------------ retraining from the supernet


@pytest.fixture(scope="module")
def inherited_trial(ray_local, trained, small_npz, tmp_path_factory):
    """A search whose candidates scored their inherited weights (epoch 0), and one of its trials."""
    from aebnas.search.tuner import run
    from aebnas.search.trials import read_experiment_dir

    storage = tmp_path_factory.mktemp("inherited")
    results = run(_search(storage, small_npz, trained[2], num_samples=2, name="picked"))
    assert not results.errors
    return storage / "picked", read_experiment_dir(storage / "picked").trials[0]


def test_retrain_inherit_with_0_epochs_is_the_trial_itself(inherited_trial, trained):
    """`retrain --inherit --epochs 0` scores the weights the trial inherited, as the trial did:
    the same outputs, thresholds and reported numbers, and model.pt holds the supernet's slices."""
    from aebnas.exit_policy import load_exit_outputs
    from aebnas.deploy.retrain import RetrainRequest, retrain
    from aebnas.settings import parse_trial_config
    from aebnas.training.supernet_file import inherited_network

    path, trial = inherited_trial
    out = path.parent / "r0"
    lines: list[str] = []
    metrics = retrain(RetrainRequest(str(path), trial=trial.name, epochs=0, inherit=True, out=str(out)),
                      log=lines.append)
    assert metrics["source"]["supernet"] == str(trained[2]) and metrics["epochs"] == 0
    assert any(line.startswith(f"starting from {trained[2]} (supernet of") for line in lines), lines
    searched, _ = load_exit_outputs(trial.path / "exit_outputs.npz")
    retrained, _ = load_exit_outputs(out / "exit_outputs.npz")
    for split in ("val", "test"):
        np.testing.assert_array_equal(retrained[split].prediction, searched[split].prediction)
        np.testing.assert_allclose(retrained[split].confidence, searched[split].confidence, rtol=1e-5, atol=1e-6)
    assert metrics["thresholds"] == trial.last["thresholds"]
    assert metrics["val"]["accuracy"] == pytest.approx(trial.last["accuracy"], abs=1e-9)
    assert metrics["test"]["accuracy"] == pytest.approx(trial.last["test_accuracy"], abs=1e-9)
    arch, _ = parse_trial_config(trial.config)
    inherited = inherited_network(load_checkpoint(trained[2]), arch, "margin").state_dict()
    weights = load_checkpoint(out / "model.pt")
    for name, value in inherited.items():
        if "running" not in name and name != "thresholds" and value.is_floating_point():  # BN stats: recalibrated
            torch.testing.assert_close(weights[name], value, msg=name)


def test_retrain_inherit_fine_tunes_at_the_given_rate_and_resumes_only_alike(inherited_trial, trained, capsys):
    from aebnas.cli import main
    from aebnas.settings import parse_trial_config

    path, trial = inherited_trial
    out = path.parent / "r1"
    assert main(["retrain", str(path), "--trial", trial.name, "--inherit", "--epochs", "1", "--lr", "0.005",
                 "--out", str(out)]) == 0
    assert "from the supernet's weights at lr 0.005 for 1 epochs" in capsys.readouterr().out
    _, settings = parse_trial_config(json.loads((out / "arch.json").read_text()))
    _, trial_settings = parse_trial_config(trial.config)
    # --lr sets the fine-tuning rate of inherited weights; the from-scratch rate stays the trial's
    assert (settings.supernet, settings.finetune_lr, settings.lr) == (str(trained[2]), 0.005, trial_settings.lr)
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    # The fine-tuned weights moved away from the inherited ones.
    arch, _ = parse_trial_config(trial.config)
    from aebnas.training.supernet_file import inherited_network

    inherited = inherited_network(load_checkpoint(trained[2]), arch, "margin").state_dict()
    weights = load_checkpoint(out / "model.pt")
    moved = [name for name, value in inherited.items() if value.is_floating_point() and "running" not in name
             and name != "thresholds" and not torch.equal(weights[name], value)]
    assert "head.0.0.weight" in moved and len(moved) > len(inherited) // 3
    # The same run directory resumes only the same run: here one from scratch is refused.
    assert main(["retrain", str(path), "--trial", trial.name, "--epochs", "1", "--out", str(out)]) == 2
    assert f"holds another run (finetune_lr: 0.005 there, {trial_settings.finetune_lr!r} now, supernet: " \
           f"'{trained[2]}' there, None now)" in capsys.readouterr().err


def test_retrain_refuses_a_supernet_it_cannot_start_from(inherited_trial, tmp_path, capsys):
    from aebnas.cli import main

    path, trial = inherited_trial
    argv = ["retrain", str(path), "--trial", trial.name, "--out", str(tmp_path / "run")]
    assert main([*argv, "--supernet", str(tmp_path / "none.pt")]) == 2
    assert f"supernet {tmp_path / 'none.pt'}: the file does not exist" in capsys.readouterr().err
    not_one = sorted(trial.path.glob("checkpoint_*/checkpoint.pt"))[-1]
    assert main([*argv, "--supernet", str(not_one)]) == 2
    assert "is not an aebnas supernet file" in capsys.readouterr().err
    assert main([*argv, "--epochs", "0"]) == 2  # 0 epochs from scratch: nothing to score
    assert "epochs=0 scores inherited weights only" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: --inherit and --supernet exclude each other
        main([*argv, "--inherit", "--supernet", str(not_one)])
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------ Ray Train: 2 workers, kill, resume


def test_supernet_request_refuses_a_space_that_is_not_in_the_registry():
    from aebnas.errors import ExperimentError
    from aebnas.training.supernet_job import SupernetRequest

    with pytest.raises(ExperimentError, match=r"space='nope' is not one of \('aebnas', 'fixed_exits', 'static'\)"):
        SupernetRequest(out="unused", space_name="nope").validate()


def _supernet_argv(dataset: Path, out: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "aebnas.cli", "supernet", "train", "--dataset", str(dataset), "--val-size", "100",
            "--resolutions", "32", "--width-mult", "0.25", "--epochs", "3", "--batch-size", "64",
            "--warmup-fraction", "0", "--workers", "2", "--out", str(out), *flags]


@pytest.mark.slow  # about 110 s on 2 cores: Ray Train starts three times
def test_ray_train_two_workers_killed_and_resumed(ray_sandbox, small_npz, tmp_path):  # noqa: F811
    """`aebnas supernet train --workers 2` on local Ray, SIGKILLed after its first checkpoint; the
    same command resumes from that checkpoint, and a third run reuses the finished supernet."""
    import signal
    import time

    out = tmp_path / "sn"
    args = _supernet_argv(small_npz, out)
    driver = ray_sandbox.spawn(args, "first.log")
    deadline = time.time() + 300
    while not list((out / "train").glob("checkpoint_*/supernet.pt")):
        assert driver.poll() is None, ray_sandbox.log("first.log")[-4000:]
        assert time.time() < deadline, "no checkpoint within 300 s:\n" + ray_sandbox.log("first.log")[-4000:]
        time.sleep(0.2)
    killed_at = time.time()
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=30)
    ray_sandbox.wait_until_gone(timeout=10)
    ray_sandbox.kill_leftovers()
    first = ray_sandbox.log("first.log")
    assert "Ray Train worker" in first or "RayTrainWorker" in first, first[-3000:]
    # Ray Train's cleaner asks a State API that needs ray[default]'s dashboard: its warning, once a second,
    # was all a user saw for minutes; and Ray Train's INFO lines repeated each epoch's figures
    assert "State API may be temporarily unavailable" not in first
    assert "Reporting training result" not in first
    assert not (out / "supernet.pt").exists()  # killed before the end

    assert ray_sandbox.run(args, "second.log", timeout=300) == 0, ray_sandbox.log("second.log")[-4000:]
    second = ray_sandbox.log("second.log")
    info = read_supernet_info(out / "supernet.pt")
    assert info.epochs == 3 and [h["epoch"] for h in info.history] == [1, 2, 3]
    # Resumed, not trained again from scratch: epoch 1 is the killed run's (finished before the kill),
    # and the second run trained no epoch 1. (Its "resuming the supernet after epoch N" line is printed
    # by a Ray Train worker; Ray's log streaming to the driver does not always deliver it.)
    assert info.history[0]["time"] < killed_at < info.history[-1]["time"]
    assert "supernet epoch 1/3" not in second
    assert all(0 <= h["val_acc_largest"] <= 100 for h in info.history)

    # Finished: the same command reuses it; another request in the same directory is refused.
    assert ray_sandbox.run(args, "third.log", timeout=120) == 0
    assert "is already trained" in ray_sandbox.log("third.log")
    assert ray_sandbox.run(_supernet_argv(small_npz, out, "--lr", "0.05"), "fourth.log", timeout=120) == 2
    assert "holds a supernet run with other settings" in ray_sandbox.log("fourth.log")


def test_search_trains_its_supernet_first_then_reuses_it(ray_local, small_npz, tmp_path, capsys):
    """A tune_config without --supernet (supernet_epochs > 0): one command trains a supernet under the
    storage path, then searches with it; the next search on the same split reuses it (the first
    step of its run, called here alone)."""
    from aebnas.search.tuner import run

    exp = _search(tmp_path, small_npz, None, supernet_epochs=1, supernet_workers=0, num_samples=2, name="auto")
    expected = Path(exp.supernet_path())
    assert expected.parent.parent == tmp_path and not expected.exists()
    results = run(exp)
    assert not results.errors and expected.exists()
    assert all(r.metrics["inherited"] and r.metrics["epoch"] == 0 for r in results)
    saved = json.loads((tmp_path / "auto" / "aebnas_experiment.json").read_text())
    assert saved["supernet"] == str(expected)  # a --resume continues with the same supernet
    assert "training the supernet in this process" in capsys.readouterr().out
    from aebnas.search.tuner import train_supernet_first

    data = load_dataset(str(small_npz), val_size=100, seed=0)
    assert train_supernet_first(dataclasses.replace(exp, name="again"), data) == str(expected)
    assert "is already trained" in capsys.readouterr().out


# ------------------------------------------------------------------ the shipped supernet

# The best candidate at 5 MMACs of a quickstart run (trial 9 of 100, seed 0) on the shipped supernet: one exit after
# stage 3 whose branch (10 px, k5, ×1) is 0.92 of its 4.34 MMACs.
QUICKSTART_PICK = {
    "resolution": 40, "stage1_depth": 2, "stage1_block0_kernel": 7, "stage1_block0_expansion": 4,
    "stage1_block1_kernel": 5, "stage1_block1_expansion": 4, "stage2_depth": 3, "stage2_block0_kernel": 5,
    "stage2_block0_expansion": 3, "stage2_block1_kernel": 7, "stage2_block1_expansion": 3,
    "stage2_block2_kernel": 3, "stage2_block2_expansion": 3, "stage3_depth": 3, "stage3_block0_kernel": 7,
    "stage3_block0_expansion": 4, "stage3_block1_kernel": 7, "stage3_block1_expansion": 3,
    "stage3_block2_kernel": 3, "stage3_block2_expansion": 3, "stage4_depth": 2, "stage4_block0_kernel": 3,
    "stage4_block0_expansion": 4, "stage4_block1_kernel": 7, "stage4_block1_expansion": 3, "stage5_depth": 3,
    "stage5_block0_kernel": 7, "stage5_block0_expansion": 6, "stage5_block1_kernel": 3,
    "stage5_block1_expansion": 6, "stage5_block2_kernel": 5, "stage5_block2_expansion": 6, "exit1_enabled": False,
    "exit2_enabled": False, "exit3_enabled": True, "exit3_branch": "aebnas", "exit3_m1_resize": 10,
    "exit3_m1_kernel": 5, "exit3_m1_expansion": 1, "exit3_m1_pool": 0, "exit3_m2_resize": 0,
    "exit4_enabled": False,
}


def test_shipped_supernet_gives_a_network_worth_having():
    """The quickstart's goal on the shipped weights, without Ray: a candidate at 5 MMACs inherits ≥ 45%
    test accuracy (the from-scratch quickstart reached 34%) with ≥ 20% of test images leaving early,
    thresholds tuned on validation only. Deterministic: inherited weights, seeded calibration sample."""
    from aebnas.config import ArchConfig
    from aebnas.cost.macs import exit_costs
    from aebnas.exit_policy import simulate, tune_thresholds
    from aebnas.settings import PAPER_GRID, PAPER_LAMBDA
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET

    supernet, info = load_supernet(EMBEDDED_SUPERNET)
    assert info.width_mult == 0.75 and info.resolutions == (32, 36, 40) and info.epochs == 60
    data = load_dataset(info.dataset, val_size=info.val_size, seed=info.split_seed)
    check_supernet(info, needs={}, width_mult=0.75, data=data)  # trained on the quickstart's training split only
    arch = ArchConfig.from_flat(QUICKSTART_PICK).replace(width_mult=0.75)
    scorer = Scorer(data, arch.resolution, torch.device("cpu"), batch_size=64, bn_batches=10, seed=0)
    net = extract(supernet, arch)
    outputs = scorer(net)
    costs = exit_costs(arch)
    tuned = tune_thresholds(outputs["val"], costs, 5.0, PAPER_GRID, PAPER_LAMBDA)
    test = simulate(outputs["test"], tuned.thresholds, costs)
    assert abs(test.avg_cost - 5.0) <= 0.5
    assert test.accuracy >= 45.0, test
    assert 1.0 - test.utilization[-1] >= 0.20, test


def test_supernet_settings_are_typed_and_old_records_still_read():
    from aebnas.training.supernet_file import EMBEDDED_SUPERNET, SupernetSettings, read_supernet_info

    info = read_supernet_info(EMBEDDED_SUPERNET)
    assert isinstance(info.settings, SupernetSettings) and info.settings.label_smoothing == 0.1
    assert info.to_record()["settings"] == info.settings.to_dict()  # the file keeps plain values
    # A record of an older or newer aebnas: a missing field takes the default, an unknown key is ignored.
    old = SupernetSettings.from_dict({"epochs": 3, "batch_size": 64, "some_future_field": 1})
    assert (old.epochs, old.batch_size, old.eval_batch_size) == (3, 64, SupernetSettings().eval_batch_size)


def test_the_directory_supernet_train_wrote_is_taken_as_the_supernet(trained, tmp_path, capsys):
    """`aebnas supernet train --out DIR` prints DIR; `--supernet DIR` must take it (it means DIR/supernet.pt)."""
    from aebnas.errors import ExperimentError
    from aebnas.search.experiment import Experiment
    from aebnas.settings import TrialSettings

    directory = trained[2].parent
    assert Experiment(supernet=str(directory)).supernet == str(trained[2])
    assert TrialSettings(supernet=str(directory)).supernet == str(trained[2])
    assert read_supernet_info(directory).epochs == 2
    with pytest.raises(ExperimentError, match="does not exist"):  # a directory without one stays refused
        Experiment(supernet=str(tmp_path)).supernet_info()


def test_supernet_epochs_show_progress_inside_the_epoch(data):
    from aebnas.training.supernet_job import run_epochs

    settings = SupernetSettings(epochs=1, batch_size=64, warmup_fraction=0.0, seed=0)
    run = SupernetTraining(TINY, WIDTH, data, settings, torch.device("cpu"), dataset_name=data.name)
    lines = []
    run_epochs(run, True, save=lambda record: None, log=lines.append, progress_every_s=0.0)
    steps = len(run.train_batches)
    inside = [line for line in lines if "left in the epoch" in line]
    assert len(inside) == steps and inside[-1].startswith(f"supernet epoch 1/1: step {steps}/{steps} (100%)")
    assert sum(line.startswith("supernet epoch 1/1: loss") for line in lines) == 1  # the epoch's line, once


def test_the_supernet_is_built_once_per_process_for_the_same_weights():
    """Trials of a search run one after another in one worker process, each handed the same record:
    the supernet module is built once, candidates take copies, and other weights build another."""
    from aebnas.config import random_arch
    from aebnas.training.supernet_file import (EMBEDDED_SUPERNET, SupernetInfo, built_supernet, inherited_network,
                                              supernet_from_state)

    record = load_checkpoint(EMBEDDED_SUPERNET)
    again = {**record, "model": {k: v.clone() for k, v in record["model"].items()}}  # as Ray hands it: a fresh copy
    supernet = built_supernet(record)
    assert built_supernet(again) is supernet
    info = SupernetInfo.from_record(dict(record), "x")
    arch = random_arch(info.space, random.Random(3), width_mult=info.width_mult, num_classes=info.num_classes,
                       in_channels=info.in_channels)
    fresh = extract(supernet_from_state(record["model"], info), arch, "margin").state_dict()
    candidate = inherited_network(again, arch, "margin")
    for name, value in candidate.state_dict().items():  # the same weights as a supernet built for this trial alone
        torch.testing.assert_close(value, fresh[name], rtol=0, atol=0, msg=name)
    before = {k: v.clone() for k, v in supernet.state_dict().items()}
    with torch.no_grad():
        for p in candidate.parameters():
            p.add_(1.0)  # a trial fine-tunes its copy ...
    for name, value in supernet.state_dict().items():  # ... and the shared supernet stays as it was
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    changed = {**record, "model": {k: v + 1 if v.is_floating_point() else v for k, v in record["model"].items()}}
    assert built_supernet(changed) is not supernet


def test_the_learning_rate_scales_with_the_batch_when_asked(data):
    """--lr-batch: the peak learning rate is set for one batch size and scales linearly to the one used."""
    plain = SupernetSettings(epochs=2, batch_size=64, lr=0.1)
    assert plain.peak_lr == 0.1  # default: lr as given
    scaled = SupernetSettings(epochs=2, batch_size=64, lr=0.1, lr_batch=16)
    assert scaled.peak_lr == pytest.approx(0.4)
    run = SupernetTraining(TINY, WIDTH, data, scaled, torch.device("cpu"))
    assert run.optimizer.param_groups[0]["max_lr"] == pytest.approx(0.4)
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(0.04)  # one-cycle: warms up from max / 10
    assert SupernetSettings.from_dict(scaled.to_dict()) == scaled  # kept in the supernet file
    for bad in (0, -128, 1.5, True):
        with pytest.raises(ValueError, match="lr_batch"):
            SupernetSettings(lr_batch=bad)


def test_a_run_directory_of_an_older_aebnas_is_still_resumed(tmp_path):
    """A request file written before a setting existed (here lr_batch) matches a request that leaves it at
    its default: a finished or interrupted supernet stays usable after an upgrade; other values are refused."""
    from aebnas.errors import ExperimentError
    from aebnas.training.supernet_job import REQUEST_FILE, SupernetRequest, _check_request_file

    request = SupernetRequest(out=str(tmp_path), settings=SupernetSettings(epochs=3))
    _check_request_file(tmp_path, request)
    saved = json.loads((tmp_path / REQUEST_FILE).read_text())
    del saved["settings"]["lr_batch"]  # as an older aebnas wrote it
    (tmp_path / REQUEST_FILE).write_text(json.dumps(saved))
    _check_request_file(tmp_path, request)  # accepted
    with pytest.raises(ExperimentError, match="other settings"):
        _check_request_file(tmp_path, SupernetRequest(out=str(tmp_path), settings=SupernetSettings(epochs=3,
                                                                                                  lr_batch=64)))


def test_compile_is_asked_for_by_the_request_and_is_not_part_of_its_identity(data):
    """`--compile` reaches the training run (the two fixed subnets get a compiled module, nothing compiles
    until their first step), and a run started without it resumes with it: speed only."""
    from aebnas.training.supernet_job import SupernetRequest, _loop_config, _make_run

    plain = SupernetRequest(out="unused", space_kwargs=TINY_KWARGS, width_mult=WIDTH,
                            settings=SupernetSettings(epochs=1, batch_size=64), workers=0)
    compiled = dataclasses.replace(plain, compile=True)
    assert plain.identity() == compiled.identity()
    assert _make_run(_loop_config(plain, None), data, torch.device("cpu"), 0, 1).compiled is None
    run = _make_run(_loop_config(compiled, None), data, torch.device("cpu"), 0, 1)
    assert run.compiled is not None and run.compiled._orig_mod is run.model
    assert list(run.state_dict()["model"]) == list(run.model.state_dict())  # no wrapper's prefix in checkpoints


@pytest.mark.slow  # about 3 min on 2 cores: inductor compiles the two subnets' steps on the CPU (twice)
def test_compiled_supernet_training_trains_what_the_eager_one_does(data, small_npz, tmp_path, capsys):
    """torch.compile changes speed, not training. One sandwich step's gradients, compiled and eager, agree
    up to the float rounding of fused kernels; and `aebnas supernet train --compile` trains an epoch with the
    eager run's losses and says that it compiles.

    (Weights are compared after one step only: the tiny supernet's training is chaotic enough that two eager
    runs whose weights differ by 1e-7 differ by 20% in some depthwise weights after 4 steps, measured.)"""
    from aebnas.cli import main
    from aebnas.data.preprocess import resize

    settings = SupernetSettings(epochs=1, batch_size=64, warmup_fraction=0.0, random_subnets=1)
    grads = []
    for compile in (False, True):
        run = SupernetTraining(TINY, WIDTH, data, settings, torch.device("cpu"), compile=compile)
        x, y = next(iter(run.train_batches))
        for arch in run.subnets(0, 0):  # largest and smallest (compiled when asked), one random (eager)
            outputs = run._forward(resize(x, arch.resolution), arch)
            sum(torch.nn.functional.cross_entropy(o, y) for o in outputs).backward()
        # parameters of this step's subnets (an exit's other branch, or a depth no subnet had, gets no gradient)
        grads.append({n: p.grad.clone() for n, p in run.model.named_parameters() if p.grad is not None})
    eager, compiled = grads
    assert eager.keys() == compiled.keys() and eager
    total = float(torch.stack([g.norm() for g in eager.values()]).norm())
    for name, g in eager.items():  # measured: within 0.3% of each gradient's norm; the 1e-6 x total covers the
        # BatchNorm biases whose gradient is 0 up to rounding (norms of 1e-8, before a BatchNorm of the next layer)
        assert float((compiled[name] - g).norm()) <= 1e-2 * float(g.norm()) + 1e-6 * total, name

    def train(name: str, *flags: str) -> list[dict]:
        out = tmp_path / name
        assert main(["supernet", "train", "--dataset", str(small_npz), "--val-size", "100", "--resolutions", "32",
                     "--width-mult", "0.25", "--epochs", "1", "--batch-size", "64", "--warmup-fraction", "0",
                     "--random-subnets", "1", "--workers", "0", "--out", str(out), *flags]) == 0
        return read_supernet_info(out / "supernet.pt").history

    plain = train("eager")
    capsys.readouterr()
    fast = train("compiled", "--compile")
    assert "torch.compile of the largest and smallest subnets" in capsys.readouterr().out
    for key in ("loss", "loss_largest", "loss_distilled"):
        assert fast[0][key] == pytest.approx(plain[0][key], rel=1e-2), key
