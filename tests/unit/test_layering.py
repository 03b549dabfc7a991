"""The layer rule as a test: a module of pagoda imports only its own floor and the floors below
it (docs/architecture.md, "Floors"). Read from the source with ``ast``, so every import counts:
top-level, inside a function, under ``TYPE_CHECKING``, and ``importlib.import_module`` of a
literal name (or an f-string's literal start). The upward imports that exist today are listed
in ``ALLOWED``, each with its reason: a new one fails here, and so does an entry whose import
is gone (the list only shrinks)."""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

PAGODA = Path(__file__).resolve().parents[2] / "pagoda"

# Lowest first: a module may import its own floor and those below it.
FLOORS: list[set[str]] = [
    # the ground floor: kernels, the switches, and the plain types everything shares
    {"kernels", "envs", "utils", "config", "sampling", "pooling_params", "request",
     "lora_request"},
    # the scheduler side, pure Python (no torch: test_core_is_torch_free.py and below); the
    # speculator is beside the scheduler, which calls it
    {"core", "spec_decode"},
    # tensors: the model families, their ops, the attention backends, LoRA adapters over
    # the models' linears (models/prepare.py wraps them)
    {"models", "attention", "lora"},
    # running a step (runner, sampler, KV cache); moving KV between instances
    {"worker", "kv_transfer"},
    {"engine"},
    {"entrypoints"},
    {"bench"},
]
FLOOR = {package: i for i, floor in enumerate(FLOORS) for package in floor}
# ``pagoda/__init__.py`` is the public door (``from pagoda import LLM``): it lends the offline
# LLM of entrypoints/, so a name imported from it counts as importing that floor.
ROOT_FLOOR = FLOOR["entrypoints"]

# Upward imports that exist today: (importer, imported) -> why, and what pays the debt.
ALLOWED: dict[tuple[str, str], str] = {
    ("pagoda.request", "pagoda.core.remote_kv"):
        "type-only (TYPE_CHECKING): Request's kv_transfer fields are typed with core's "
        "remote-KV messages; they belong on the ground floor with the one request message "
        "(issue 33 point 4)",
    ("pagoda.entrypoints.cli", "pagoda.bench"):
        "importlib: `pagoda bench NAME` is a command of the CLI, which imports that one "
        "bench module (and only it: the other commands import none)",
}
# The scheduler side knows no torch and no transport, at any level of any function.
TORCH_FREE = ("core", "spec_decode")
FORBIDDEN_THERE = ("torch", "pagoda.kv_transfer")


@dataclass(frozen=True)
class Import:
    importer: str  # pagoda.core.scheduler
    target: str  # a module (pagoda.spec_decode.policy) or a package a name came from
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PAGODA.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PAGODA.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def literal_prefix(node: ast.expr) -> Optional[str]:
    """The module a call of import_module names: its string, or an f-string's literal start."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and node.values:
        first = node.values[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            return first.value.rstrip(".")
    return None


def imports_of(path: Path, source: Optional[str] = None) -> Iterator[Import]:
    """Every pagoda module (or package) ``path`` imports (its text, or ``source`` read as its
    text), wherever the statement is."""
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [
                f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base
                for alias in node.names
            ]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
        ):
            targets = [t for t in [literal_prefix(node.args[0])] if t]
        for target in targets:
            if target == "pagoda" or target.startswith("pagoda."):
                yield Import(importer, target, node.lineno)


def floor_of(module: str) -> int:
    parts = module.split(".")
    return ROOT_FLOOR if len(parts) == 1 else FLOOR[parts[1]]


def all_imports() -> list[Import]:
    return [
        imp
        for path in sorted(PAGODA.rglob("*.py"))
        if path != PAGODA / "__init__.py"  # the public door stands above every floor
        for imp in imports_of(path)
    ]


def upward(imports: list[Import]) -> list[Import]:
    return [imp for imp in imports if floor_of(imp.target) > floor_of(imp.importer)]


def describe(imp: Import) -> str:
    return (f"{imp.importer}:{imp.line} imports {imp.target} "
            f"(floor {floor_of(imp.importer)} -> {floor_of(imp.target)})")


def test_every_package_is_on_a_floor():
    """A new package or top-level module must be given its floor here (and in the docs)."""
    names = {p.stem for p in PAGODA.glob("*.py") if p.name != "__init__.py"}
    names |= {p.parent.name for p in PAGODA.glob("*/__init__.py")}
    assert names - set(FLOOR) == set(), "place these on a floor in FLOORS"
    assert set(FLOOR) - names == set(), "FLOORS names packages that do not exist"


def test_no_floor_imports_a_higher_one():
    new = [describe(imp) for imp in upward(all_imports())
           if (imp.importer, imp.target) not in ALLOWED]
    assert new == [], "upward imports (the layer rule, docs/architecture.md):\n" + "\n".join(new)


def test_the_allowed_upward_imports_still_exist():
    """A debt paid leaves the list: remove its entry from ALLOWED."""
    found = {(imp.importer, imp.target) for imp in upward(all_imports())}
    paid = sorted(set(ALLOWED) - found)
    assert paid == [], f"no longer imported: remove from ALLOWED {paid}"


def test_the_scheduler_side_imports_no_torch_and_no_transport_anywhere():
    """What test_core_is_torch_free.py checks at import time, for function-level imports too."""
    bad = []
    for package in TORCH_FREE:
        for path in sorted((PAGODA / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                bad += [f"{module_name(path)}:{node.lineno} imports {n}" for n in names
                        if any(n == f or n.startswith(f + ".") for f in FORBIDDEN_THERE)]
    assert bad == [], "\n".join(bad)


def test_the_reader_sees_every_kind_of_import():
    """The reader itself: relative, function-level, TYPE_CHECKING and import_module imports."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "import importlib\n"
        "from . import scheduler\n"
        "from .outputs import SchedulerOutput\n"
        "if TYPE_CHECKING:\n"
        "    from pagoda.worker.sampler import SamplingRow\n"
        "def f(name):\n"
        "    import pagoda.engine.core\n"
        "    return importlib.import_module(f'pagoda.bench.{name}')\n"
    )
    found = list(imports_of(PAGODA / "core" / "block_pool.py", source))
    assert {imp.target for imp in found} == {
        "pagoda.core.scheduler", "pagoda.core.outputs", "pagoda.worker.sampler",
        "pagoda.engine.core", "pagoda.bench"}
    assert [describe(imp) for imp in upward(found)] == [
        "pagoda.core.block_pool:6 imports pagoda.worker.sampler (floor 1 -> 3)",
        "pagoda.core.block_pool:8 imports pagoda.engine.core (floor 1 -> 4)",
        "pagoda.core.block_pool:9 imports pagoda.bench (floor 1 -> 6)"]


def cycles_within(package: str) -> list[list[str]]:
    """The import cycles among ``package``'s modules (every kind of import counts)."""
    graph: dict[str, set[str]] = {}
    for imp in all_imports():
        if imp.importer.startswith(package + ".") and imp.target.startswith(package + "."):
            graph.setdefault(imp.importer, set()).add(imp.target)
    found: list[list[str]] = []
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            found.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, path + [node])
        done.add(node)

    for start in sorted(graph):
        visit(start, [])
    return found


def test_the_model_modules_import_each_other_without_cycles():
    """Quantization and packing reach MoE layers through an interface (models/base.py's
    ExpertLayer), the registry names classes as strings: models/ is a tree of imports."""
    assert cycles_within("pagoda.models") == []


def test_the_cycle_finder_finds_one():
    graph_imports = [Import("pagoda.x.a", "pagoda.x.b", 1), Import("pagoda.x.b", "pagoda.x.a", 1)]
    import test_layering as me

    saved = me.all_imports
    me.all_imports = lambda: graph_imports  # type: ignore[assignment]
    try:
        assert cycles_within("pagoda.x") == [["pagoda.x.a", "pagoda.x.b", "pagoda.x.a"]]
    finally:
        me.all_imports = saved


# What builds an engine lives in engine/build.py; llm_engine.py takes the built pieces.
CONSTRUCTION = (
    "pagoda.models.loader", "pagoda.models.prepare", "pagoda.models.cpu_int4",
    "pagoda.worker.kv_cache", "pagoda.engine.cpu_budget",
    "pagoda.engine.spec_timing", "pagoda.engine.build", "pagoda.kv_transfer.nixl",
    "pagoda.spec_decode.speculator",
)
MAX_INIT_LINES = 16


def test_llm_engine_builds_nothing():
    """LLMEngine keeps intake, stepping, stats and inspection: it imports none of what
    builds an engine, and its constructor only stores the pieces it is given."""
    path = PAGODA / "engine" / "llm_engine.py"
    grown = sorted({imp.target for imp in imports_of(path)} & set(CONSTRUCTION))
    assert grown == [], f"construction belongs in engine/build.py: {grown}"
    tree = ast.parse(path.read_text())
    init = next(node for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef) and node.name == "__init__")
    lines = init.end_lineno - init.lineno  # type: ignore[operator]
    assert lines <= MAX_INIT_LINES, f"LLMEngine.__init__ is {lines} lines: build in build.py"
    calls = {node.func.id for node in ast.walk(init)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert calls <= {"CoreStep", "Inspector"}, f"__init__ builds {sorted(calls)}"


INTAKE = ("engine/llm_engine.py", "engine/async_engine.py")


def test_a_request_travels_as_one_message():
    """LLMEngine, AsyncEngine and the Engine protocol take an EngineRequest, not its
    fields one by one: a new field is written once (pagoda/request.py)."""
    for rel in INTAKE:
        tree = ast.parse((PAGODA / rel).read_text())
        defs = [node for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and node.name == "add_request"]
        assert defs, f"{rel} has no add_request"
        for node in defs:
            params = [a.arg for a in node.args.args + node.args.kwonlyargs]
            assert params == ["self", "request"], f"{rel}:{node.lineno} takes {params}"
            assert ast.unparse(node.args.args[1].annotation) == "EngineRequest"
