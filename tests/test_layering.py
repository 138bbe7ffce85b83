"""Module edges: no library module imports the command-line modules (cli.py, console.py), and the data layer
reaches up into the model, the tiny-model builder or the stage nowhere but where it must load the recipe
model's tokenizer. Imports are read from every module's source, those inside functions included (most of
remix_ds imports lazily), and checked once more by importing every module in a fresh interpreter."""
import ast
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import remix_ds

REPO = Path(__file__).resolve().parent.parent
COMMAND_LINE = {"remix_ds.cli", "remix_ds.console", "remix_ds.__main__"}
UP_FROM_DATA = {"remix_ds.model", "remix_ds.tiny", "remix_ds.stage"}


def all_modules() -> List[Tuple[str, Path]]:
    """(dotted name, source path) of remix_ds and every module below it."""
    out = [("remix_ds", Path(remix_ds.__file__))]
    for info in pkgutil.walk_packages(remix_ds.__path__, "remix_ds."):
        spec = info.module_finder.find_spec(info.name)
        out.append((info.name, Path(spec.origin)))
    return out


def imports_of(name: str, source: str, is_package: bool = False) -> List[Tuple[str, str]]:
    """(imported module, enclosing function or '') for every import statement of module `name`'s source, anywhere
    in it; relative imports resolved. ``from X import y`` counts both X and X.y (y may be a submodule)."""
    package = name if is_package else name.rpartition(".")[0]
    found: List[Tuple[str, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name)
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name, func) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                found.append((target, func))
                found.extend((f"{target}.{alias.name}", func) for alias in child.names)
            visit(child, func)
    visit(ast.parse(source), "")
    return found


def test_the_import_scanner_sees_lazy_relative_and_absolute_imports():
    src = ("import os\nfrom . import cli\n"
           "def f():\n    from ..console import main\n    import remix_ds.model\n"
           "class C:\n    def g(self):\n        from .. import tiny\n")
    got = imports_of("remix_ds.data.x", src)
    assert ("remix_ds.data.cli", "") in got                 # `from . import cli` inside remix_ds.data
    assert ("remix_ds.console", "f") in got and ("remix_ds.model", "f") in got
    assert ("remix_ds.tiny", "g") in got
    assert ("remix_ds.cli", "") in imports_of("remix_ds.adapters", "from . import cli\n")
    assert ("remix_ds.cli", "") in imports_of("remix_ds.data", "from .. import cli\n", is_package=True)


def test_no_library_module_imports_the_command_line_modules():
    modules = all_modules()
    assert {"remix_ds.cli", "remix_ds.adapters", "remix_ds.modes", "remix_ds.data.sources"} <= {m for m, _ in modules}
    offenders = [(name, target) for name, path in modules if name not in COMMAND_LINE
                 for target, _ in imports_of(name, path.read_text(), path.name == "__init__.py")
                 if target in ("remix_ds.cli", "remix_ds.console")]
    assert offenders == []


def test_data_reaches_up_only_to_load_the_recipe_models_tokenizer():
    reach = sorted({(name, target, func) for name, path in all_modules() if name.startswith("remix_ds.data")
                    for target, func in imports_of(name, path.read_text(), path.name == "__init__.py")
                    if target in UP_FROM_DATA})
    assert reach == [("remix_ds.data", "remix_ds.model", "recipe_tokenizer"),
                     ("remix_ds.data", "remix_ds.tiny", "recipe_tokenizer")]


def test_every_module_imports_and_none_loads_the_command_line_modules():
    """In a fresh interpreter: every library module imports (no cycle breaks one), and after all of them
    neither cli nor console has been loaded."""
    names = [name for name, _ in all_modules() if name not in COMMAND_LINE]
    code = ("import importlib, json, sys\n"
            f"for name in {names!r}:\n    importlib.import_module(name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m in ('remix_ds.cli', 'remix_ds.console'))))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == []
