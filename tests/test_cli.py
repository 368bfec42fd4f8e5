"""Tests for aebnas/cli.py: `aebnas info` on real architectures, JSON output, errors."""

import json
import shutil
import subprocess

import pytest

from aebnas.cli import main
from aebnas.config import largest_arch, smallest_arch, uniform_arch
from aebnas.cost.macs import exit_costs, param_count, segment_macs

ARCHS = {"smallest": smallest_arch(), "largest": largest_arch(),
         "edanas": uniform_arch(2, 3, 3, exits=(1, 3), exit_branch="edanas", resolution=40)}


def _write(tmp_path, flat, name="arch.json"):
    path = tmp_path / name
    path.write_text(json.dumps(flat))
    return path


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ARCHS)
def test_info_prints_costs_and_params(tmp_path, capsys, name):
    arch = ARCHS[name]
    path = _write(tmp_path, arch.to_flat())
    code, out, err = _run(capsys, "info", str(path))
    assert code == 0 and err == ""
    costs = exit_costs(arch)
    c = costs.cumulative()
    lines = out.splitlines()
    assert f"{param_count(arch):,} parameters" in lines[0]
    assert f"resolution {arch.resolution}" in lines[0]
    exit_rows = [line.split() for line in lines if line.split()[:1] and line.split()[0].isdigit()]
    assert len(exit_rows) == arch.num_exits
    for j, (row, e) in enumerate(zip(exit_rows, arch.exits)):
        assert row == [str(j + 1), f"stage{e.position}", str(e.depth), e.describe(), f"{c[j]:.3f}",
                       f"{costs.branch[j]:.3f}"]
    final = [line.split() for line in lines if line.startswith(" final")]
    assert final == [["final", "head", f"{c[-1]:.3f}"]]
    assert lines[-1] == f"static network (no exits): {costs.static_cost:.3f} MMACs"


@pytest.mark.parametrize("name", ARCHS)
def test_info_json_equals_the_cost_module(tmp_path, capsys, name):
    arch = ARCHS[name]
    flat = dict(arch.to_flat(), dataset="cifar10", epochs=5, target_macs=10.0, seed=0)  # a trial config
    code, out, err = _run(capsys, "info", str(_write(tmp_path, flat)), "--json")
    assert code == 0 and err == ""
    info = json.loads(out)
    costs = exit_costs(arch)
    c = costs.cumulative()
    assert [e["macs"] for e in info["exits"]] == pytest.approx(list(c[:-1]), rel=1e-12)
    assert [e["branch_macs"] for e in info["exits"]] == pytest.approx(list(costs.branch), rel=1e-12)
    assert [(e["exit"], e["position"], e["depth"], e["branch"]) for e in info["exits"]] == \
        [(j, e.position, e.depth, e.describe()) for j, e in enumerate(arch.exits)]
    assert info["final_macs"] == pytest.approx(c[-1], rel=1e-12)
    assert info["static_macs"] == pytest.approx(costs.static_cost, rel=1e-12)
    assert info["segments_macs"] == pytest.approx(segment_macs(arch), rel=1e-12)
    assert info["params"] == param_count(arch)
    assert (info["resolution"], info["num_classes"]) == (arch.resolution, arch.num_classes)


def test_info_console_script(tmp_path):
    exe = shutil.which("aebnas")
    assert exe, "the aebnas console script is not installed (pip install -e .)"
    arch = ARCHS["smallest"]
    path = _write(tmp_path, arch.to_flat())
    proc = subprocess.run([exe, "info", str(path), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert info["static_macs"] == pytest.approx(exit_costs(arch).static_cost, rel=1e-12)
    assert info["params"] == param_count(arch)


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object of flat config keys, got list"),
])
def test_info_bad_file(tmp_path, capsys, content, message):
    path = tmp_path / "arch.json"
    if content is not None:
        path.write_text(content)
    code, out, err = _run(capsys, "info", str(path))
    assert code == 2 and out == ""
    assert err.startswith(f"aebnas info: error: {path}: ")
    assert message in err


@pytest.mark.parametrize("change, message", [
    ({"exit1_m1_kernel": 4}, "exit1_m1_kernel=4 is not one of (1, 3, 5, 7, 9)"),
    ({"stage2_depth": 9}, "stage2_depth=9 is not an integer in [1, 8]"),
    ({"stage3_depth": None}, "missing key 'stage3_depth' in the architecture config"),
    ({"width_mult": 0}, "width_mult=0 is not a number in [0.05, 4.0]"),
])
def test_info_bad_key_names_it(tmp_path, capsys, change, message):
    flat = smallest_arch().to_flat()
    for key, value in change.items():
        if value is None:
            del flat[key]
        else:
            flat[key] = value
    path = _write(tmp_path, flat)
    code, out, err = _run(capsys, "info", str(path))
    assert (code, out) == (2, "")
    assert err == f"aebnas info: error: {path}: {message}\n"


def test_usage_errors_exit_with_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["info"])
    assert info.value.code == 2
    assert "config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["no-such-command"])
    assert info.value.code == 2


def test_info_names_a_misspelt_key(tmp_path, capsys):
    """A typo in an optional key must not silently build another architecture."""
    from aebnas.cli import main
    from aebnas.config import smallest_arch

    flat = {**smallest_arch().to_flat(), "width_mul": 0.5, "target_macs": 5.0}
    path = tmp_path / "typo.json"
    path.write_text(json.dumps(flat))
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert "unknown key(s) ['width_mul']" in err


def test_info_refuses_a_config_with_the_old_exit_module_keys(tmp_path, capsys):
    """An arch.json written before the paper's exit modules: one message saying what changed, no traceback."""
    flat = smallest_arch().to_flat()
    flat["exit1_m1_channels"] = flat.pop("exit1_m1_resize")
    code, out, err = _run(capsys, "info", str(_write(tmp_path, flat)))
    assert code == 2 and out == "" and "Traceback" not in err
    assert "'exit1_m1_channels' is a key of the exit module aebnas had before the paper's" in err
