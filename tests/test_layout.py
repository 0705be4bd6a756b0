"""The package's shape: no import loops, model code reaches speed code only through `ldm.speed.hooks`, a short
top level, no long modules, and no file that points outside the repository."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO

LDM = REPO / "ldm"
HOOK = "ldm.speed.hooks"
MODEL_PACKAGES = ("ldm.models", "ldm.modules")
MAX_TOP_LEVEL_MODULES = 5
MAX_LINES = 500


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def ldm_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LDM.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every ldm module that `path` imports, wherever the import statement stands (a function-level import is a
    dependency too). `from pkg import sub` counts as an import of the submodule when `sub` is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in known else stem for alias in node.names]
        else:
            continue
        for target in targets:
            # `import ldm.a.b` names ldm.a.b; keep the longest known prefix.
            parts = target.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()
            if parts and ".".join(parts) != name:
                found.add(".".join(parts))
    return found


def import_graph() -> dict[str, set[str]]:
    modules = ldm_modules()
    known = set(modules)
    return {name: imports_of(name, path, known) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep) :] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_walk_sees_every_kind_of_import(tmp_path):
    """The checker itself: absolute, from-submodule, relative and function-level imports all count, so a loop
    hidden in a function body is still a loop."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    known = {"ldm", "ldm.speed", "ldm.speed.native", "ldm.speed.runtime", "ldm.util"}
    probe = tmp_path / "probe.py"
    probe.write_text("from ldm.speed import native\nfrom . import runtime\ndef f():\n    import ldm.util\n")
    assert imports_of("ldm.speed.probe", probe, known) == {"ldm.speed.native", "ldm.speed.runtime", "ldm.util"}


def test_no_import_loops():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import loop: " + " -> ".join(cycle)


def test_model_code_reaches_speed_code_only_through_the_hook():
    graph = import_graph()
    offenders = [
        f"{name} imports {dep}"
        for name, deps in graph.items()
        if name.startswith(MODEL_PACKAGES)
        for dep in deps
        if dep.startswith("ldm.speed") and dep != HOOK
    ]
    assert not offenders, f"model code must import speed code through {HOOK} only: " + "; ".join(offenders)
    hook_deps = graph[HOOK]
    assert not [d for d in hook_deps if d.startswith(MODEL_PACKAGES)], f"{HOOK} must not import model code"
    assert any(d.startswith("ldm.speed") for deps in graph.values() for d in deps)  # the walk sees speed imports


def test_top_level_is_short_and_every_subpackage_says_what_it_holds():
    top_modules = sorted(p.name for p in LDM.glob("*.py") if p.name != "__init__.py")
    assert len(top_modules) <= MAX_TOP_LEVEL_MODULES, top_modules
    for package in sorted(p for p in LDM.iterdir() if p.is_dir() and (p / "__init__.py").exists()):
        tree = ast.parse((package / "__init__.py").read_text())
        assert ast.get_docstring(tree), f"{package.relative_to(REPO)}/__init__.py says nothing about what belongs there"


@pytest.mark.parametrize("path", sorted(LDM.rglob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_no_module_is_long(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


def repository_files() -> list[Path]:
    if (REPO / ".git").exists():
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.splitlines()  # fmt: skip
        return [REPO / f for f in listed if (REPO / f).is_file()]
    return [p for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts]


RELATIVE_PATH = re.compile(r"(?<![\w.])(?:\.\./)+[\w.\-/]*")
PARENTS_INDEX = re.compile(r"Path\(__file__\)\.resolve\(\)\.parents\[(\d+)\]")


def outside_references(path: Path, text: str) -> list[str]:
    """`../` paths that leave the repository (or name nothing in it) from the file's folder, and
    `Path(__file__).parents[N]` that climbs above the repository root."""
    found = []
    for match in RELATIVE_PATH.finditer(text):
        target = (path.parent / match.group(0)).resolve()
        if not target.is_relative_to(REPO) or not target.exists():
            found.append(match.group(0))
    root = len(path.relative_to(REPO).parts) - 1  # parents[root] is the repository root
    found += [m.group(0) for m in PARENTS_INDEX.finditer(text) if int(m.group(1)) > root]
    return found


def test_no_file_refers_to_a_path_outside_the_repository():
    offenders = {}
    for path in repository_files():
        if path.suffix in {".png", ".npy", ".safetensors", ".ckpt", ".pt", ".jpg"}:
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        if found := outside_references(path, text):
            offenders[str(path.relative_to(REPO))] = found
    assert not offenders, f"paths outside the repository: {offenders}"


def test_the_outside_path_check_catches_what_the_suite_used_to_need():
    tests_dir, up = REPO / "tests", "../"  # (written so that this file does not name such a path itself)
    assert outside_references(tests_dir / "x.py", "Path(__file__).resolve().parents[" + '2] / "shared"')
    assert outside_references(tests_dir / "x.md", f"see {up}shared/reference/oracle")
    assert outside_references(REPO / "docs" / "x.md", f"`{up}shared/tools/make_fake_ckpt.py`")  # in-repo, missing
    assert not outside_references(REPO / "docs" / "x.md", "[README](../README.md)")
    assert not outside_references(tests_dir / "x.py", "Path(__file__).resolve().parents[1]")
