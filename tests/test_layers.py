"""The package is layered: each module imports only its own layer and the layers below it (function-level imports
count too). Bottom to top: ir, ops, engine, data, runtime, tasks, quant, train, export, eval; then the pipelines
(api.py) and the command line (cli*.py, demo.py) on top."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "qatool"

LAYERS = ["base", "ir", "ops", "engine", "data", "runtime", "tasks", "quant", "train", "export", "eval", "top"]

# modules at the package's top level, by layer (a package's modules take their package's layer)
TOP_LEVEL = {
    "qatool": "base",  # __init__: the version only
    "qatool.errors": "base",
    "qatool.convert": "engine",  # normalising a model folds constants with the ops' kernels
    "qatool.api": "top",
    "qatool.cli": "top",
    "qatool.cli_options": "top",
    "qatool.cli_eval": "top",
    "qatool.cli_quant": "top",
    "qatool.cli_report": "top",
    "qatool.demo": "top",
    "qatool.__main__": "top",
}

# imports that go up on purpose: (module, imported module) -> why
ALLOWED_UPWARD = {
    # the ops package fills the op registry on import, the fake-quant and integer kernels included (those live in
    # quant/ and import ops.base themselves): a plug-in registration, not a use of quant's code by ops
    ("qatool.ops", "qatool.quant.ops"): "registers the qatool.* fake-quant ops",
    ("qatool.ops", "qatool.quant.integer_eval"): "registers the eval-mode integer kernels",
}


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str:
    if module in TOP_LEVEL:
        return TOP_LEVEL[module]
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    raise AssertionError(f"{module}: no layer (add it to TOP_LEVEL in tests/test_layers.py, or put it in a layer)")


def imported_modules(path: Path, module: str, root: Path = PACKAGE.parent) -> list[tuple[int, str]]:
    """(line, absolute module name) of every qatool import in the file, at any depth (function-level too)."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target != "qatool" and not target.startswith("qatool."):
                continue
            # `from . import x` / `from .. import engine` import submodules or names of the package
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                where = root / Path(*sub.split("."))
                known = where.with_suffix(".py").exists() or where.is_dir()
                found.append((node.lineno, sub if known else target))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "qatool"]
    return found


def upward_imports(package: Path = PACKAGE) -> list[str]:
    problems = []
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package.parent)
        own = LAYERS.index(layer_of(module))
        for line, target in imported_modules(path, module, package.parent):
            their = layer_of(target)
            if LAYERS.index(their) > own and (module, target) not in ALLOWED_UPWARD:
                problems.append(f"{path.relative_to(package.parent)}:{line}: {module} ({layer_of(module)}) imports "
                                f"{target} ({their}), a layer above its own")
    return problems


def test_no_module_imports_a_layer_above_its_own():
    problems = upward_imports()
    assert not problems, "\n".join(problems)


def test_every_module_has_a_layer():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_the_check_sees_function_level_and_absolute_imports(tmp_path):
    root = tmp_path / "qatool"
    (root / "quant").mkdir(parents=True)
    (root / "train").mkdir()
    (root / "__init__.py").write_text("")
    (root / "quant" / "__init__.py").write_text("")
    (root / "train" / "__init__.py").write_text("")
    (root / "train" / "session.py").write_text("")
    (root / "quant" / "calibrate.py").write_text(
        "from .config import X\n"
        "def f():\n    from ..train.session import QatSession\n"
        "def g():\n    import qatool.train.session\n"
        "def h():\n    from .. import train\n")
    (root / "quant" / "config.py").write_text("")
    found = imported_modules(root / "quant" / "calibrate.py", "qatool.quant.calibrate", tmp_path)
    assert [t for _, t in found] == ["qatool.quant.config", "qatool.train.session", "qatool.train.session",
                                     "qatool.train"]
    assert len(upward_imports(root)) == 3
