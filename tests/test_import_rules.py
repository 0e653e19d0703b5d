"""The module map of docs/design.md holds: which room may import which, and no import cycle among the package's modules.

Imports are read from the source with `ast`, those inside functions included (a function-level import is still a
dependency, only a hidden one), and relative imports are resolved against their module.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "peft_parscale"
# The tuner core (docs/design.md, "Module map"); every other module of the package is a workflow.
CORE = {
    "__init__",
    "config",
    "layer",
    "model",
    "cache",
    "architecture",
    "probe",
    "adapter_file",
    "prefix_init",
    "model_card",
}
WORKFLOWS = {
    "checkpoint_files",
    "cli",
    "data",
    "decode",
    "decode_attention",
    "end_of_sequence",
    "eval",
    "function_pairs",
    "fused_projections",
    "generation_settings",
    "humaneval",
    "interop",
    "precision",
    "pretrained",
    "released_format",
    "sampling",
    "scaling_law",
    "sft",
    "stats",
    "testing",
}
EXPERIMENTS = {path.stem for path in (ROOT / "experiments").glob("*.py")}
# the experiments' scripts; the other modules there (common.py, stream_diversity.py) are what they share
SCRIPTS = {
    stem for stem in EXPERIMENTS if '__name__ == "__main__"' in (ROOT / "experiments" / f"{stem}.py").read_text()
}


def imported_modules(path: Path, package: str | None) -> set[str]:
    """The dotted names of the modules `path` imports anywhere in its source; `package` resolves relative imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = (package or "").split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([base] if base else [])])
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from package import module`
    return found


def package_imports() -> dict[str, set[str]]:
    """For each module of the package (by its name within it), the package modules it imports."""
    modules = {path.stem: path for path in (ROOT / PACKAGE).glob("*.py")}
    imports = {}
    for name, path in modules.items():
        names = imported_modules(path, PACKAGE)
        imports[name] = {
            other.split(".")[1] if other.count(".") else "__init__"
            for other in names
            if (other == PACKAGE or other.startswith(f"{PACKAGE}."))
            and (other.split(".")[1] if other.count(".") else "__init__") in modules
        } - {name}
    return imports


def test_every_package_module_is_in_a_room():
    modules = {path.stem for path in (ROOT / PACKAGE).glob("*.py")}
    assert modules == CORE | WORKFLOWS, "place a new module in CORE or WORKFLOWS (and in docs/design.md's map)"


def test_the_core_imports_only_the_core():
    imports = package_imports()
    wrong = {name: sorted(imports[name] - CORE) for name in sorted(CORE) if imports[name] - CORE}
    assert not wrong, f"tuner-core modules import workflows: {wrong}"


def test_the_package_and_the_examples_never_import_the_experiments():
    scripts = [*(ROOT / PACKAGE).glob("*.py"), *(ROOT / "examples").glob("*.py")]
    wrong = {
        path.relative_to(ROOT).as_posix(): sorted(
            name for name in imported_modules(path, PACKAGE) if name.split(".")[0] in EXPERIMENTS | {"experiments"}
        )
        for path in scripts
    }
    assert not {path: names for path, names in wrong.items() if names}


def test_experiments_import_only_the_package_and_their_shared_modules():
    assert "common" not in SCRIPTS and {"humaneval_experiment", "stream_sweep"} <= SCRIPTS
    for path in (ROOT / "experiments").glob("*.py"):
        scripts = {name.split(".")[0] for name in imported_modules(path, None)} & (SCRIPTS - {path.stem})
        assert not scripts, f"{path.name} imports {sorted(scripts)}: share code through a module without a __main__"


def test_no_import_cycle_in_the_package():
    imports = package_imports()
    # depth-first search; a module met again while it is still on the path closes a cycle
    state, path = {}, []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        path.append(name)
        for other in sorted(imports[name]):
            if state.get(other) == "open":
                return [*path[path.index(other) :], other]
            if other not in state and (cycle := visit(other)):
                return cycle
        state[name] = "done"
        path.pop()
        return None

    for name in sorted(imports):
        if name not in state and (cycle := visit(name)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))
