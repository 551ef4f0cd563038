"""The package layout holds: imports run one way (cli -> training -> evaluation -> data / files -> models), no
import circles, no imports tucked into functions outside the command line, and files a reader finishes in one
sitting. Read from the source with `ast`, so it stays true as the code changes."""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "latentvae"

# Lower layers never import higher ones. `pretrained` (backbone weights) is a leaf beside data and files; the
# benchmarks measure evaluation's and training's pieces, so they sit above both.
LAYERS = {
    "models": 0,
    "files": 1,
    "data": 1,
    "pretrained": 1,
    "evaluation": 2,
    "training": 3,
    "benchmark": 4,
    "cli": 5,
    "__init__": 6,
    "__main__": 6,
    # 0.1's module paths of the two model classes, which saved pipelines' model_index.json files name
    "autoencoder_kl": 6,
    "vq_model": 6,
}
MAX_LINES = 400
# Longer modules, each one concept that reads top to bottom (their docstrings say so too).
LONG_MODULES = {
    "latentvae.data.sources": "three image sources and the one call that picks among them",
    "latentvae.evaluation.evaluate": "the evaluation protocol, from images to results, in reading order",
    "latentvae.benchmark.modes": "the benchmark's modes, each a short measuring function",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> list[tuple[str, bool]]:
    """(imported latentvae module, whether the import sits inside a function) for every import in `path`."""
    module = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = resolve(module, node, path.name == "__init__.py")
            # `from latentvae.x import y` may import the submodule y
            names = [target] + [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name == "latentvae" or name.startswith("latentvae."):
                found.append((name, id(node) in in_function))
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for target, _ in imports_of(path):
            if target in modules and target != name:
                edges[name].add(target)
    return edges


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_every_module_has_a_layer():
    for name in graph():
        assert name == "latentvae" or name.split(".")[1] in LAYERS, f"{name}: add its subpackage to LAYERS"


def test_no_import_climbs_to_a_higher_layer():
    climbs = [
        f"{source} -> {target}"
        for source, targets in graph().items()
        for target in targets
        if layer(target) > layer(source) and target != "latentvae"
    ]
    assert not climbs, "imports from a lower layer to a higher one:\n" + "\n".join(climbs)


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_imports_inside_functions_only_in_the_command_line():
    # The subcommands import torch and diffusers where they run, so `latentvae --help` stays fast; everywhere
    # else an import inside a function would be hiding a circle or a climb from the checks above.
    deferred = [
        f"{module_name(path)} imports {target} inside a function"
        for path in PACKAGE.rglob("*.py")
        if not module_name(path).startswith("latentvae.cli")
        for target, inside in imports_of(path)
        if inside
    ]
    assert not deferred, "\n".join(deferred)


def test_modules_are_short():
    too_long = [
        f"{module_name(path)}: {lines} lines"
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES and module_name(path) not in LONG_MODULES
    ]
    assert not too_long, (
        f"modules over {MAX_LINES} lines (split them, or say why in LONG_MODULES):\n" + "\n".join(too_long)
    )


def test_the_graph_sees_a_planted_climb_and_circle(tmp_path, monkeypatch):
    """The checks above fail on a package that breaks the rules (so they are not vacuous)."""
    fake = tmp_path / "latentvae"
    (fake / "models").mkdir(parents=True)
    (fake / "cli").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "models" / "__init__.py").write_text("")
    (fake / "cli" / "__init__.py").write_text("")
    (fake / "models" / "a.py").write_text("from latentvae.cli import b\n")  # a climb
    (fake / "cli" / "b.py").write_text("from latentvae.models import a\n")  # and with it a circle
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    edges = graph()
    assert edges["latentvae.models.a"] == {"latentvae.cli", "latentvae.cli.b"}
    assert "latentvae.models.a" in edges["latentvae.cli.b"]
    for check in (test_no_import_climbs_to_a_higher_layer, test_no_import_circle):
        try:
            check()
        except AssertionError:
            continue
        raise AssertionError(f"{check.__name__} passed on a package with a climb and a circle")


def test_help_does_not_load_torch_or_diffusers():
    """`latentvae --help` and `latentvae info PATH --help` build their parsers without the heavy libraries (their
    speed follows; a time limit would be flaky on a shared machine, so the imports are checked)."""
    code = (
        "import sys; from latentvae.cli import build_parser; build_parser('info'); "
        "print(sorted(m for m in ('torch', 'diffusers', 'accelerate') if m in sys.modules))"
    )
    started = time.perf_counter()
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]", loaded
    for argv in (["--help"], ["info", "x", "--help"]):
        done = subprocess.run([sys.executable, "-m", "latentvae", *argv], capture_output=True, text=True)
        assert done.returncode == 0 and "usage: latentvae" in done.stdout, done.stderr
    print(f"parsers built in {time.perf_counter() - started:.2f} s")
