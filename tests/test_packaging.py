"""The tree as a package: installed (not found through sys.path edits), and clean under the agreed linter."""
from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_files(*roots: str) -> list[str]:
    found = []
    for root in roots:
        for folder, _, files in os.walk(os.path.join(REPO, root)):
            found += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    return sorted(found)


def path_edits(source: str) -> list[str]:
    """Places that change the import path: any use of sys.path, or the PYTHONPATH variable by name."""
    edits = []
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
                and node.value.id == "sys"):
            edits.append(f"line {node.lineno}: sys.path")
        elif isinstance(node, ast.Constant) and node.value == "PYTHONPATH":
            edits.append(f"line {node.lineno}: PYTHONPATH")
        elif isinstance(node, ast.keyword) and node.arg == "PYTHONPATH":
            edits.append(f"line {node.lineno}: PYTHONPATH=")
    return edits


def test_path_edit_detector_finds_both_kinds():
    assert path_edits("import sys\nsys.path.insert(0, 'x')\n") == ["line 2: sys.path"]
    assert path_edits("import os\nenv = dict(os.environ, PYTHONPATH='x')\nos.environ['PYTHONPATH'] = 'y'\n") == [
        "line 2: PYTHONPATH=", "line 3: PYTHONPATH"]
    assert path_edits("import sys\nprint(sys.argv)\n") == []


def test_no_module_script_or_test_edits_the_import_path():
    """The project is installed (pip install -e .); nothing finds it by editing sys.path or PYTHONPATH."""
    offenders = {}
    for path in python_files("recipe", "data_prep", "tests", "launch"):
        with open(path) as f:
            edits = path_edits(f.read())
        if edits and path != os.path.abspath(__file__):
            offenders[os.path.relpath(path, REPO)] = edits
    assert offenders == {}
    for folder, _, files in os.walk(REPO):
        if any(part in folder for part in (".venv", ".git", "demo", "runs")):
            continue
        for name in files:
            if name.endswith(".sh") or name == "run" or name.endswith(".sbatch"):
                with open(os.path.join(folder, name)) as f:
                    assert "PYTHONPATH" not in f.read(), os.path.join(folder, name)


def test_recipe_is_imported_from_this_checkout():
    out = subprocess.run([sys.executable, "-c", "import recipe; print(recipe.__file__)"], cwd="/",
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == os.path.join(REPO, "recipe", "__init__.py")


def test_ruff_is_clean():
    ruff = shutil.which("ruff", path=os.path.dirname(sys.executable)) or shutil.which("ruff")
    assert ruff, "ruff is part of the test extra: pip install -e .[test]"
    out = subprocess.run([ruff, "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
