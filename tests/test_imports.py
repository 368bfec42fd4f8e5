"""The package's structure: imports go one way, and the commands load only what they need."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "aebnas"
# cli.py imports a command's module when the command runs, so `aebnas predict` needs no Ray.
# cli.py imports a command's module when it runs; supernet_train.py imports Ray (and cluster,
# which imports Ray) only for Ray Train, so `aebnas supernet train --workers 0` runs without Ray.
LAZY_BY_DESIGN = {"cli.py", "supernet_train.py"}


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_package_import_inside_a_function(path):
    """A relative import inside a function is how an import circle hides; there is none."""
    if path.name in LAZY_BY_DESIGN:
        return
    hidden = [f"{node.lineno}: from {'.' * node.level}{node.module or ''}"
              for fn in ast.walk(ast.parse(path.read_text()))
              if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
              for node in ast.walk(fn) if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert not hidden, f"{path.name} imports aebnas modules inside functions: {hidden}"


MODULES = sorted("aebnas." + str(p.relative_to(PACKAGE).with_suffix("")).replace("/", ".").removesuffix(".__init__")
                 for p in _modules())
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


def test_predict_and_export_need_no_ray():
    code = ("import sys; import aebnas.cli, aebnas.export; "
            "sys.exit(1 if any(m == 'ray' or m.startswith('ray.') for m in sys.modules) else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
