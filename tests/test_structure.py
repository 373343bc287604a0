"""The parts and who may import whom (docs/architecture.md), read from the source with ``ast``.

Every rule is checked on every module of ``interp``, ``adapters``, ``benchmarks``
and ``examples``; a failure lists each offending import with its file and line.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

PACKAGES = ("interp", "adapters", "benchmarks", "examples")
OURS = ("interp", "adapters", "benchmarks")
#: Optional extras (and the references of the benchmarks): the only imports allowed inside a function,
#: so that the package imports without them.
OPTIONAL = ("timm", "h5py", "tflite", "ai_edge_litert", "captum", "zennit")
MAX_FILE_LINES = 600
MAX_FUNCTION_LINES = 120


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # the imported module, dotted and absolute
    name: str | None  # the imported name for ``from target import name``
    line: int
    in_function: bool

    def where(self) -> str:
        what = f"{self.target}.{self.name}" if self.name else self.target
        return f"{self.module}:{self.line} imports {what}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend(Import(module, a.name, None, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                target = _absolute(module, path.name == "__init__.py", child)
                out.extend(Import(module, target, a.name, child.lineno, in_function) for a in child.names)
            visit(child, inside)

    visit(tree, False)
    return out


IMPORTS = [imp for path in source_files() for imp in _imports_of(path)]
MODULES = {module_name(p) for p in source_files()}


def _is_module(dotted: str) -> bool:
    return dotted in MODULES


def _private_parts(dotted: str) -> list[int]:
    return [i for i, part in enumerate(dotted.split(".")) if part.startswith("_") and not part.startswith("__")]


def _fail(bad: list[str], rule: str) -> None:
    if bad:
        pytest.fail(f"{rule}:\n  " + "\n  ".join(bad), pytrace=False)


def _top(dotted: str) -> str:
    return dotted.split(".")[0]


def _in_cli(module: str) -> bool:
    return module == "interp.cli" or module.startswith("interp.commands")


def _in_training(module: str) -> bool:
    return module.startswith("adapters.training")


def test_engine_outside_its_cli_never_imports_adapters():
    bad = [i.where() for i in IMPORTS
           if _top(i.module) == "interp" and not _in_cli(i.module) and _top(i.target) == "adapters"]
    _fail(bad, "the engine knows no model: only interp.cli and interp.commands may import adapters")


def test_model_side_never_imports_training_or_the_engine():
    bad = [i.where() for i in IMPORTS
           if _top(i.module) == "adapters" and not _in_training(i.module)
           and (_in_training(i.target) or _top(i.target) == "interp"
                or (i.target == "adapters" and i.name == "training"))]
    _fail(bad, "model files, the hub, importers and readers import nothing from training or interp")


def test_no_private_names_or_private_modules_across_boundaries():
    bad = []
    for i in IMPORTS:
        if _top(i.target) not in OURS:
            continue
        full = f"{i.target}.{i.name}" if i.name and _is_module(f"{i.target}.{i.name}") else i.target
        # A private module may be imported only from inside the package that holds it.
        for k in _private_parts(full):
            owner = ".".join(full.split(".")[:k])
            if not (i.module == owner or i.module.startswith(owner + ".")):
                bad.append(i.where() + f" (private module of {owner})")
        # A private name may not be taken from another module.
        if i.name and i.name.startswith("_") and not i.name.startswith("__") \
                and not _is_module(f"{i.target}.{i.name}") and i.target != i.module:
            bad.append(i.where() + " (private name)")
    _fail(bad, "private names and private modules stay inside their module / package")


def test_benchmarks_and_examples_use_public_names_only():
    bad = [i.where() for i in IMPORTS
           if _top(i.module) in ("benchmarks", "examples") and _top(i.target) in ("interp", "adapters")
           and (_private_parts(i.target) or (i.name or "").startswith("_"))]
    _fail(bad, "benchmarks and examples use the public API")


def test_no_import_inside_a_function_except_optional_extras():
    bad = [i.where() for i in IMPORTS
           if i.in_function and _top(i.target) not in OPTIONAL and i.target != "__future__"]
    _fail(bad, f"imports go at the top of the module (inside a function only for {', '.join(OPTIONAL)})")


def test_no_file_over_the_size_limit():
    bad = []
    for path in source_files():
        n = len(path.read_text(encoding="utf-8").splitlines())
        if n > MAX_FILE_LINES:
            bad.append(f"{path.relative_to(REPO)}: {n} lines")
    _fail(bad, f"files stay under {MAX_FILE_LINES} lines")


def test_no_function_over_the_size_limit():
    bad = []
    for path in source_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    bad.append(f"{module_name(path)}.{node.name} ({path.relative_to(REPO)}:{node.lineno}): {n} lines")
    _fail(bad, f"functions stay under {MAX_FUNCTION_LINES} lines")


def test_the_rules_see_the_imports():
    """The checks above read real imports: a few known edges must be found."""
    edges = {(i.module, i.target) for i in IMPORTS}
    assert ("interp.mine", "interp.topk") in edges
    assert any(m.startswith("interp.commands") and _top(t) == "adapters" for m, t in edges)
    assert len(IMPORTS) > 300
