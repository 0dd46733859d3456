"""Code versions of workflow stages, from the package's import graph (read with `ast`, not imported).

Every Snakemake rule has a `code` param, `code_hash("mpqflow.stages.<stage>")`: a hash of the
source files its stage module runs, i.e. the module and everything it imports inside the package,
transitively (function-level imports included, `if TYPE_CHECKING:` blocks excluded). Editing any
of those files reruns the stage; editing code the stage does not import does not.

Also the package's layering (`LAYERS`) and its checker, shared by bench/import_graph.py and
tests/test_layout.py. Standard library only: the Snakefile imports this at every DAG build.
"""

from __future__ import annotations

import ast
import functools
import hashlib
from pathlib import Path

__all__ = [
    "LAYERS",
    "code_hash",
    "import_graph",
    "layer_of",
    "layering_violations",
    "module_closure",
    "module_file",
    "module_imports",
]

ROOT = Path(__file__).resolve().parent.parent  # the repository root: parent of the package dir

# Lowest layer first. A module may import only from its own layer or lower, and no stage imports
# another stage. "x.*" means x and every module under it; a module matching no entry is an error.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "foundation",
        (
            "mpqflow",
            "mpqflow.io",
            "mpqflow.names",
            "mpqflow.paths",
            "mpqflow.config_checks",
            "mpqflow.validation",
            "mpqflow.config",
            "mpqflow.codehash",
            "mpqflow.checkpoints",
            # the latency table's reader: torch- and numpy-free, read by config_checks at DAG build
            "mpqflow.deploy",
            "mpqflow.deploy.latency",
        ),
    ),
    (
        "core",
        (
            "mpqflow.layers",
            "mpqflow.artifacts",
            "mpqflow.data",
            "mpqflow.models",
            "mpqflow.levels.*",  # ALQ/AMQ levels: a leaf that quant and comm both import
            "mpqflow.quant.*",
            "mpqflow.optimize.*",
            "mpqflow.train.*",  # the data-parallel trainer (issue 12) when it becomes a package
            "mpqflow.comm.*",  # gradient quantizers and the DDP comm hook (issue 14)
            "mpqflow.runtime",
            "mpqflow.metrics",
            "mpqflow.evaluate",
            "mpqflow.finetuned",
            "mpqflow.indicators",  # LIMPQ indicator files and the LIMPQ objective (torch-free)
            "mpqflow.deploy.*",  # ONNX export of quantized models and ONNX Runtime evaluation (issue 25)
        ),
    ),
    ("model-aware", ("mpqflow.methods", "mpqflow.context", "mpqflow.input_checks")),
    (
        "estimators and reports",
        (
            "mpqflow.sensitivity.*",
            "mpqflow.plotting",  # what every figure shares: the Agg backend, the PNG save
            "mpqflow.top1_bars",  # the grouped top-1 bar chart of the PTQ and fine-tuning studies
            "mpqflow.study",
            "mpqflow.study_plots",
            "mpqflow.ptq_study",
            "mpqflow.finetune_study",
            "mpqflow.gradquant_study",
        ),
    ),
    ("stages", ("mpqflow.stages.*",)),
)
STAGES = "mpqflow.stages"


def module_file(module: str, root: Path) -> Path | None:
    """The source file of dotted `module` under `root` (`a/b.py` or `a/b/__init__.py`), or None."""
    base = Path(root, *module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _namespace(module: str, root: Path) -> bool:
    """Whether `module` is a package directory without __init__.py (no code to run or hash)."""
    return Path(root, *module.split(".")).is_dir() and module_file(module, root) is None


def _ancestors(module: str) -> list[str]:
    """The packages above `module`, outermost first: "a.b.c" -> ["a", "a.b"]."""
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


@functools.cache
def _raw_imports(source: bytes, filename: str) -> tuple[tuple[int, str, tuple[str, ...]], ...]:
    """(level, module, imported names) per import statement; `import a.b` is (0, "a.b", ())."""
    out = []
    stack: list[ast.AST] = [ast.parse(source, filename)]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)  # the guarded imports never run
            continue
        if isinstance(node, ast.Import):
            out += [(0, alias.name, ()) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            out.append((node.level, node.module or "", tuple(a.name for a in node.names)))
        stack.extend(ast.iter_child_nodes(node))
    return tuple(out)


def module_imports(module: str, root: Path) -> set[str]:
    """The modules of `module`'s own top-level package that `module` imports, anywhere in its
    source, with the packages above each (importing a.b.c runs a/__init__ and a/b/__init__).
    `from pkg import name` means pkg.name when that is a module file, else pkg."""
    path = module_file(module, root)
    if path is None:
        raise ModuleNotFoundError(f"no source file for {module} under {root}")
    top = module.split(".")[0]
    # the package that relative imports start from: the module itself when it is a package
    here = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found: set[str] = set()
    for level, name, names in _raw_imports(path.read_bytes(), str(path)):
        if level:
            if level - 1 >= len(here):
                continue  # beyond the top-level package: not ours
            base = ".".join(here[: len(here) - level + 1] + ([name] if name else []))
        else:
            base = name
        if base.split(".")[0] != top:
            continue
        targets = (
            [base]
            if not names or names == ("*",)
            else [f"{base}.{n}" if module_file(f"{base}.{n}", root) else base for n in names]
        )
        for target in targets:
            found.update(_ancestors(target), [target])
    found.discard(module)
    return {m for m in found if not _namespace(m, root)}


def module_closure(module: str, root: Path) -> list[str]:
    """Every module that importing `module` runs (sorted): itself, the packages above it and all
    it imports, transitively. Raises ModuleNotFoundError for an import without a source file."""
    seen: set[str] = set()
    todo = [module, *(a for a in _ancestors(module) if not _namespace(a, root))]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            todo += module_imports(name, root)
        except ModuleNotFoundError:
            who = sorted(m for m in seen if m != name and name in module_imports(m, root))
            why = f"imported by {', '.join(who)}" if who else f"needed to import {module}"
            raise ModuleNotFoundError(f"no source file for {name} under {root} ({why})") from None
    return sorted(seen)


def code_hash(*modules: str, root: Path | None = None) -> str:
    """16 hex chars of sha256 over the files of the modules' closures: each file's path (relative
    to `root`, the repository root by default) and bytes, in sorted path order."""
    root = Path(root) if root is not None else ROOT
    names = set().union(*(module_closure(m, root) for m in modules))
    files = sorted(module_file(n, root).relative_to(root).as_posix() for n in names)
    h = hashlib.sha256()
    for rel in files:
        data = (root / rel).read_bytes()
        h.update(f"{rel}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()[:16]


def import_graph(root: Path | None = None, package: str = "mpqflow") -> dict[str, set[str]]:
    """Direct imports of every module of `package` under `root`: {module: module_imports(...)}.
    Targets without a source file (a broken import) stay in the edges; they are not keys."""
    root = Path(root) if root is not None else ROOT
    graph = {}
    for path in sorted(Path(root, package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        if path.name == "__init__.py":
            parts = parts[:-1]
        if all(p.isidentifier() for p in parts):
            name = ".".join(parts)
            graph[name] = module_imports(name, root)
    return graph


def _matches(module: str, pattern: str) -> bool:
    if pattern.endswith(".*"):
        return module == pattern[:-2] or module.startswith(pattern[:-1])
    return module == pattern


def layer_of(module: str) -> int | None:
    """The index in LAYERS of `module`'s layer, or None when it is in none."""
    for i, (_, patterns) in enumerate(LAYERS):
        if any(_matches(module, p) for p in patterns):
            return i
    return None


def _is_stage(module: str) -> bool:
    return module.startswith(STAGES + ".")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    """One line per breach of LAYERS in an import graph: unplaced modules, imports of missing
    modules, upward imports, and a stage (or the stages package, which every stage runs)
    importing another stage."""
    out = []
    for module in sorted(graph):
        if layer_of(module) is None:
            out.append(f"{module}: in no layer (add it to LAYERS in mpqflow/codehash.py)")
    for module in sorted(graph):
        mine = layer_of(module)
        for dep in sorted(graph[module]):
            theirs = layer_of(dep)
            if dep not in graph:
                out.append(f"{module} -> {dep}: no such module")
            elif mine is None or theirs is None:
                continue  # reported above
            elif theirs > mine:
                out.append(
                    f"{module} -> {dep}: {LAYERS[mine][0]} (layer {mine}) imports {LAYERS[theirs][0]} (layer {theirs})"
                )
            elif _is_stage(dep) and (_is_stage(module) or module == STAGES):
                out.append(f"{module} -> {dep}: a stage imports another stage")
    return out
