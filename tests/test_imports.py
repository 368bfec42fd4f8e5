"""The package's structure: imports go one way, and the commands load only what they need."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aebnas"

# Imports of aebnas modules inside functions that are there by design; every other one is how an
# import circle hides. (importing module, imported module): why.
LAZY_BY_DESIGN = {
    # The command line imports a command's module when that command runs, so `aebnas predict` loads
    # neither Ray nor the search, and `--help` stays fast.
    ("cli", "*"): "per-command imports",
    # cluster imports Ray: only Ray Train needs it, so `aebnas supernet train --workers 0` runs without Ray.
    ("training.supernet_job", "cluster"): "Ray Train only",
    # optuna_search imports Optuna, an optional extra: loaded only for search_alg tpe / nsga2.
    ("*", "search.optuna_search"): "optional extra",
}


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _name(path: Path) -> str:
    """``aebnas/nn/network.py`` → ``nn.network`` (the module's name inside the package; "" for aebnas itself)."""
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _package(path: Path) -> list[str] | None:
    """The aebnas package a relative import in ``path`` starts from (None outside aebnas)."""
    if not path.is_relative_to(PACKAGE):
        return None
    here = [p for p in _name(path).split(".") if p]
    return here if path.name == "__init__.py" else here[:-1]


def _package_imports(path: Path, tree: ast.AST) -> list[tuple[int, str]]:
    """(line, imported module inside aebnas) of every import of an aebnas module under ``tree`` (the code of
    ``path``), relative (``from .x import``, ``from . import x``) or absolute (``from aebnas.x import``,
    ``import aebnas.x``)."""
    package = _package(path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level > 0:
                if package is None:  # a relative import of another package (analysis/)
                    continue
                base = package[:len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "aebnas":
                base = node.module.split(".")[1:]
            else:
                continue
            if node.module in (None, "aebnas"):  # `from . import x` / `from aebnas import x`: x is a module
                found += [(node.lineno, ".".join([*base, a.name])) for a in node.names]
            else:
                found.append((node.lineno, ".".join(base)))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".", 1)[1] if "." in a.name else "")
                      for a in node.names if a.name.split(".")[0] == "aebnas"]
    return found


def _exempt(importer: str, imported: str) -> bool:
    return any(key in LAZY_BY_DESIGN for key in ((importer, "*"), (importer, imported), ("*", imported)))


def _function_imports(path: Path) -> list[tuple[int, str]]:
    functions = [fn for fn in ast.walk(ast.parse(path.read_text()))
                 if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return sorted({imp for fn in functions for imp in _package_imports(path, fn)})


def test_the_import_scanner_sees_every_form(tmp_path):
    """Relative, absolute and `import aebnas.x` forms, in a nested module, are all found."""
    path = PACKAGE / "nn" / "probe.py"
    code = ("def f():\n    from ..cli import main\n    from aebnas.cli import main\n    import aebnas.cli\n"
            "    from . import blocks\n    from .. import cli\n    from aebnas import cli\n    import numpy\n")
    found = sorted(_package_imports(path, ast.parse(code)))
    assert found == [(2, "cli"), (3, "cli"), (4, "cli"), (5, "nn.blocks"), (6, "cli"), (7, "cli")]
    assert not _exempt("nn.probe", "cli") and _exempt("cli", "training.loop")
    assert _exempt("search.experiment", "search.optuna_search")


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_no_package_import_inside_a_function(path):
    """An aebnas import inside a function is how an import circle hides; only LAZY_BY_DESIGN ones exist."""
    hidden = [f"{line}: {imported}" for line, imported in _function_imports(path)
              if not _exempt(_name(path), imported)]
    assert not hidden, f"{path.name} imports aebnas modules inside functions: {hidden}"


@pytest.mark.parametrize("path", [*_modules(), *sorted((ROOT / "analysis").glob("*.py"))],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_nothing_imports_the_command_line(path):
    """cli.py sits on top: no module imports it, at the top or inside a function (errors live in aebnas.errors)."""
    if path == PACKAGE / "cli.py":
        return
    imports = _package_imports(path, ast.parse(path.read_text()))
    bad = [f"{line}: {name}" for line, name in imports if name.split(".")[0] == "cli"]
    assert not bad, f"{path.name} imports aebnas.cli: {bad}"


# The layers of the package, bottom up: a module imports only from its own layer or below (the same
# order docs/design.md draws). Inside a layer, test_every_module_imports_first finds any circle.
LAYERS = (
    ("errors", "files", "progress", "space_values", "config", "settings", "onnx_runner", "exit_policy", "reference",
     "cluster"),  # the foundations at the package's root
    ("data",),
    ("nn",),
    ("cost",),
    ("training",),
    ("search",),
    ("deploy",),
    ("pipeline", "cli"),
)


def _layer(module: str) -> int:
    """The layer of an aebnas module given as ``search.tuner`` / ``config`` ("": the package itself, -1)."""
    unit = module.split(".")[0]
    if not unit:
        return -1
    return next(i for i, names in enumerate(LAYERS) if unit in names)


def test_every_module_has_a_layer():
    assert sorted(_name(p).split(".")[0] for p in _modules() if _name(p) and "." not in _name(p)
                  and _name(p) not in {n for names in LAYERS for n in names}) == []


@pytest.mark.parametrize("path", _modules(), ids=_name)
def test_imports_go_down_the_layers(path):
    """No module imports from a layer above its own: the house reads from the bottom up."""
    here = _layer(_name(path))
    up = [f"{line}: {imported}" for line, imported in _package_imports(path, ast.parse(path.read_text()))
          if _layer(imported) > here]
    assert not up, f"{_name(path)} (layer {here}: {LAYERS[here]}) imports from a layer above: {up}"


def test_the_layer_check_sees_an_import_running_up():
    path = PACKAGE / "data" / "probe.py"
    found = _package_imports(path, ast.parse("from ..search.tuner import run\nfrom .npz import read\n"))
    assert [(line, _layer(name) > _layer("data.probe")) for line, name in found] == [(1, True), (2, False)]


MODULES = sorted(f"aebnas.{_name(p)}" if _name(p) else "aebnas" for p in _modules())
# For each module: forget every aebnas module, then import that one first; no order of
# imports may reveal a circle. torch and ray stay loaded, so this takes seconds.
FRESH_IMPORTS = """
import importlib, sys
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "aebnas" or m.startswith("aebnas.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
"""


def test_every_module_imports_first():
    proc = subprocess.run([sys.executable, "-c", FRESH_IMPORTS, *MODULES], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


# `import ray` (and `from ray… import`) raise ImportError, as on a machine without Ray.
WITHOUT_RAY = "import sys; sys.modules['ray'] = None\n"


def _run_without_ray(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY + code], capture_output=True, text=True, cwd=ROOT)


@pytest.mark.parametrize("command", ["retrain", "predict", "export"])
def test_commands_without_ray(command):
    """``aebnas retrain/predict/export --help`` load their whole module chain and never need Ray."""
    proc = _run_without_ray(f"from aebnas.cli import main\nmain([{command!r}, '--help'])")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout


def test_analysis_without_ray():
    proc = _run_without_ray("import analysis, analysis.results, analysis.pareto, analysis.posthoc, analysis.plots\n"
                            "import analysis.__main__")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_the_ray_blocker_blocks():
    """The prelude of the two tests above does stop Ray: a Ray module fails under it."""
    proc = _run_without_ray("import aebnas.search.moasha")
    assert proc.returncode != 0 and "ray" in proc.stderr


def test_predict_and_export_need_no_ray():
    code = ("import sys; import aebnas.cli, aebnas.deploy.torchscript, aebnas.deploy.retrain, aebnas.search.trials, aebnas.search.pareto; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
