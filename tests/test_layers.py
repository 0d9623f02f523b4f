"""The import layers, read from the sources with ``ast`` (every import, also those inside functions) over
instructrl_fast/, kernels/ (the package instructrl_fast.kernels) and bench/: no import circle, and no import from a
lower layer to a higher one. Ground up: data; parallel primitives, rng, backend registry, checks; ops and kernels;
model; rollout; train (and the trainers' drop-ins, integrations/); the command line, the planner and the benchmarks.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# module-name prefix -> layer; the longest matching prefix wins
LAYERS = {
    "instructrl_fast.data": 0,
    "instructrl_fast": 1,  # the package root: lazy re-exports of _ext and backend
    "instructrl_fast._ext": 1,
    "instructrl_fast.backend": 1,
    "instructrl_fast.checks": 1,
    "instructrl_fast.parallel": 1,
    "instructrl_fast.weights": 1,  # the single-file weights format: below model and train
    "instructrl_fast.rng": 1,
    "instructrl_fast.ops": 2,
    "instructrl_fast.kernels": 2,
    "instructrl_fast.batch_invariant": 2,
    "instructrl_fast.model": 3,
    "instructrl_fast.rollout": 4,
    "instructrl_fast.train": 5,
    "instructrl_fast.integrations": 5,
    "instructrl_fast.cli": 6,
    "instructrl_fast.plan": 6,
    "bench": 6,
}

# Known violations, each with the change that removes it; an entry that no longer occurs fails the test, so the list
# only shrinks. None is left.
ALLOWED: set[tuple[str, str]] = set()


def _module_files() -> dict[str, Path]:
    files = {}
    for path in sorted((ROOT / "instructrl_fast").rglob("*.py")):
        rel = path.relative_to(ROOT / "instructrl_fast")
        if rel.parts[0] == "kernels":  # a symlink to kernels/ in the checkout, read below
            continue
        files[".".join(("instructrl_fast", *rel.with_suffix("").parts)).removesuffix(".__init__")] = path
    for path in sorted((ROOT / "kernels").glob("*.py")):
        files[f"instructrl_fast.kernels.{path.stem}".removesuffix(".__init__")] = path
    for path in sorted((ROOT / "bench").glob("*.py")):
        files[f"bench.{path.stem}"] = path
    return files


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """The project modules that module ``name`` imports (absolute imports: the project has no relative ones);
    ``from a import b`` names a.b when that is a module, else a."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: relative import"
            out.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                       for a in node.names)
    return (out & modules) - {name}


def _graph() -> dict[str, set[str]]:
    files = _module_files()
    return {name: _imports(path, name, set(files)) for name, path in files.items()}


def _layer(name: str) -> int:
    prefix = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[prefix]


def test_no_import_circle():
    graph, state, cycles = _graph(), {}, []

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles:\n" + "\n".join(cycles)


def test_no_import_runs_up_a_layer():
    graph = _graph()
    upward = {(a, b) for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)}
    assert upward - ALLOWED == set(), "imports from a lower layer to a higher one:\n" + "\n".join(
        f"{a} -> {b}" for a, b in sorted(upward - ALLOWED))
    assert ALLOWED - upward == set(), f"allowed violations that no longer occur (drop them): {sorted(ALLOWED - upward)}"


def test_named_rules():
    """model never imports train, parallel never imports model, ops never import model or train (allow-list aside)."""
    rules = [("instructrl_fast.model", ("instructrl_fast.train",)),
             ("instructrl_fast.parallel", ("instructrl_fast.model",)),
             ("instructrl_fast.ops", ("instructrl_fast.model", "instructrl_fast.train"))]
    broken = [(a, b) for a, deps in _graph().items() for b in deps for low, highs in rules
              if a.startswith(low + ".") and b.startswith(highs) and (a, b) not in ALLOWED]
    assert not broken, f"layering rules broken: {broken}"


def _global_statements(path: Path) -> list[str]:
    return [name for node in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(node, ast.Global)
            for name in node.names]


def test_parallel_state_is_passed_not_kept_in_a_global():
    """``init_distributed`` returns the ParallelState and every stage, trainer or function receives it as an argument:
    instructrl_fast.parallel keeps no process-wide state (no ``global`` statement) and no module defines or calls a
    getter of one (``parallel_state()``)."""
    files = _module_files()
    kept = {name: g for name, path in files.items() if name.startswith("instructrl_fast.parallel")
            if (g := _global_statements(path))}
    assert not kept, f"module globals in the parallel package: {kept}"
    getters = sorted(name for name, path in files.items()
                     if any(isinstance(n, (ast.FunctionDef, ast.Name, ast.Attribute))
                            and "parallel_state" in (getattr(n, "name", None), getattr(n, "id", None),
                                                     getattr(n, "attr", None))
                            for n in ast.walk(ast.parse(path.read_text(), str(path)))))
    assert not getters, f"modules defining or reading parallel_state(): {getters}"


def _is_module(module: str, name: str, files: dict[str, Path]) -> bool:
    """Whether ``module.name`` is a module: a source file of the project or a compiled extension (``_C``)."""
    if f"{module}.{name}" in files:
        return True
    package = files.get(module)
    return package is not None and package.name == "__init__.py" and any(package.parent.glob(f"{name}.*.so"))


def _triton_jit(path: Path, name: str) -> bool:
    """Whether ``name`` is a ``@triton.jit`` function of the module at ``path``."""
    for node in ast.parse(path.read_text(), str(path)).body:
        if isinstance(node, ast.FunctionDef) and node.name == name:
            return any(ast.unparse(d).startswith(("triton.jit", "jit")) for d in node.decorator_list)
    return False


def _private_uses(name: str, path: Path, files: dict[str, Path]) -> list[str]:
    """``module._name`` that module ``name`` takes from another project module, by ``from module import _name``
    or as an attribute of an imported project module (``module._name``)."""
    tree = ast.parse(path.read_text(), str(path))
    aliases: dict[str, str] = {}  # local name -> project module it is bound to
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update((a.asname, a.name) for a in node.names if a.asname and a.name in files)
        elif isinstance(node, ast.ImportFrom) and node.module in files:
            for a in node.names:
                if _is_module(node.module, a.name, files):
                    aliases[a.asname or a.name] = f"{node.module}.{a.name}"
                elif a.name.startswith("_"):
                    uses.append(f"{node.module}.{a.name}")
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            uses.append(f"{aliases[node.value.id]}.{node.attr}")
    return [u for u in uses if u.rpartition(".")[0] != name]


def test_no_private_name_taken_from_another_module():
    """What two modules of the package (instructrl_fast/ and kernels/) share is public: none takes a ``_name``
    from another project module. Allowed: a module whose own name starts with ``_`` (``_ext``, the compiled
    ``_C``, kernels' ``_launch``: internal to the package, imported by its siblings), and a ``@triton.jit`` device
    function of kernels/ (the kernels' naming keeps their underscore; a kernel calls another file's device
    function, the only way to share device code). bench/ and tests/ may reach into internals to check them."""
    files = _module_files()
    broken = []
    for name, path in files.items():
        if not name.startswith("instructrl_fast"):
            continue
        for use in _private_uses(name, path, files):
            module, _, attr = use.rpartition(".")
            if not _is_module(module, attr, files) and not _triton_jit(files[module], attr):
                broken.append(f"{name} uses {use}")
    assert not broken, "private names taken from another module:\n" + "\n".join(sorted(broken))


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """A function's lines from its ``def`` to its last line, less its docstring's."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_over_80_lines_of_code():
    """Functions stay short: every function and method of the package (instructrl_fast/ and kernels/, Triton kernels
    included) has at most 80 lines from its ``def`` to its last line, its docstring (the Args and Returns of a
    public op) not counted."""
    long = []
    for name, path in _module_files().items():
        if not name.startswith("instructrl_fast"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > 80:
                long.append(f"{name}.{node.name}: {_code_lines(node)} lines")
    assert not long, "functions over 80 lines of code:\n" + "\n".join(long)
