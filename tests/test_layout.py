"""The house's floors (README, "Layout"): imports only go down or sideways without a cycle, no package imports a
top-level script, no module edits sys.path. Read from the source with ast; nothing is imported."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# From the ground up; a package may import its own floor and those below. The scripts (top-level *.py) are
# floor 4; analysis/ and benchmarks/ sit on top of them but may import no script.
FLOORS = {
    "foundation": 1,
    "models": 2, "diffusion": 2,
    "imagedata": 3, "storage": 3, "launch": 3, "sampling": 3, "monitoring": 3, "evaluations": 3, "training": 3,
    "analysis": 5, "benchmarks": 5,
}
SCRIPT_FLOOR = 4
# demo.py shows the project off with analysis' own tools (the study's FID scorer, the Fig. 2 mask plot): top floor
TOP_SCRIPTS = {"demo": 5}
# Below-floor imports that are still out: storage reads and writes files and never builds a model.
EXCLUDED = {"storage": {"models", "diffusion"}}
SKIPPED = {"tests", "docs", "configs", "results", "data", "samples", "features"}


def source_files():
    """{unit: [paths]}: unit = top-level package folder, or script name for a top-level .py file."""
    units = {}
    for name in sorted(os.listdir(ROOT)):
        path = os.path.join(ROOT, name)
        if name.endswith(".py"):
            units[name[:-3]] = [path]
        elif os.path.isdir(path) and not name.startswith(".") and name not in SKIPPED:
            files = [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(".py")]
            if files:
                units[name] = sorted(files)
    return units


def imported_modules(path):
    """Absolute names of every module `path` imports, at any depth (relative imports stay in their package)."""
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module


def import_graph():
    """{unit: {units it imports}} between this repository's packages and scripts."""
    units = source_files()
    return {unit: {m.split(".")[0] for p in paths for m in imported_modules(p)} & set(units) - {unit}
            for unit, paths in units.items()}


def find_cycle(graph):
    """One cycle of `graph` as a list of nodes, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [node])
            if cycle:
                return cycle
    return None


def test_every_package_has_a_floor():
    packages = {u for u in source_files() if os.path.isdir(os.path.join(ROOT, u))}
    assert packages - set(FLOORS) == set(), "give the new package a floor in FLOORS and in README's layout table"


def test_imports_only_go_down_and_never_in_a_cycle():
    graph = import_graph()
    floor = lambda unit: FLOORS.get(unit, TOP_SCRIPTS.get(unit, SCRIPT_FLOOR))
    upward = sorted(f"{a} (floor {floor(a)}) -> {b} (floor {floor(b)})"
                    for a, targets in graph.items() for b in targets if floor(b) > floor(a))
    assert upward == []
    excluded = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets & EXCLUDED.get(a, set()))
    assert excluded == []
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_no_package_imports_a_script():
    graph = import_graph()
    scripts = {u for u in graph if u not in FLOORS}
    assert {"train", "sample", "sample_ddp", "extract_features", "demo"} <= scripts
    offending = sorted(f"{a} -> {b}" for a, targets in graph.items() if a in FLOORS for b in targets & scripts)
    assert offending == []


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_edits_sys_path():
    paths = [p for ps in source_files().values() for p in ps]
    paths += [os.path.join(ROOT, "tests", f) for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")]
    edits = []
    for path in paths:
        for node in ast.walk(ast.parse(open(path).read(), path)):
            target = node.func.value if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) else None
            if isinstance(target, ast.Attribute) and target.attr == "path" and getattr(target.value, "id", None) == "sys":
                edits.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert edits == []
