"""minidiff's imports run one way, and never in a circle (issue #20).

The test reads the source of every module under minidiff/ (its `ast`: nothing is imported or run) and collects every
import of a minidiff module: at the top, inside functions and methods (the lazy imports a reader does not see at the
top of the file), under `if TYPE_CHECKING:`, relative ones resolved. Two rules hold on the graph:

  1. no cycle: no module reaches itself through its imports (the cycle is printed);
  2. no upward arrow: no module imports one in a layer above its own. LAYERS below lists the layers bottom to top;
     a module may import its own layer and the ones below.

What counts as an import of what:
  * `from pkg import name` imports pkg.name if that is a module, else pkg; `import pkg.mod` imports pkg.mod.
  * importing pkg.mod also runs pkg/__init__.py, so it is an import of pkg too — except from inside pkg (whose
    __init__ is already running) and except the root `minidiff`, whose __init__ imports nothing: it resolves
    `minidiff.load`, `minidiff.save`, ... on first use.
  * `import minidiff` (then `minidiff.load(...)`) is an import of that root, which sits with the commands at the top:
    inside the library, write the module you use (`from .checkpoint import load`), so a reader sees the arrow.
  * code under `if __name__ == "__main__":` is a script's entry point: it runs as the module `__main__`, not as the
    module it is written in, so its imports are not that module's.
  * importlib with a computed name is not seen: the root __init__ and cli.py's table of commands use it, both at the
    top layer.

Where the layers may surprise:
  * formats/ spans two layers. Its tables and its reader — weights.py (the safe reader), keymaps.py (parameter
    names), configs.py (config.json translation) — import no minidiff module but errors.py (CheckpointError is an
    InputError) and sit below the models; the LoRA and
    embedding formats work on models' layers and sit above them.
  * The config dataclasses keep their public names (README: `UNetConfig.from_diffusers`, `cfg.to_diffusers()`,
    `CLIPTextConfig.from_transformers`, ...) as one-line delegations to formats/configs.py, imported at the top of
    unet.py, vae.py and clip.py. That arrow points down, to a module that imports nothing of minidiff, because the
    translation is handed the class to build (`configs.unet_from_diffusers(cls, d)`) rather than importing it.
    So no exception to the rules is needed: the other way — configs.py importing the dataclasses and the one-liners
    importing configs.py inside themselves — would be an upward arrow and a cycle, hidden in a function.

A new module must be given a layer here; the test names any module that has none.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "minidiff"

# Bottom to top. "pkg.*" is the package and everything in it; a name without ".*" is that module alone (it wins over
# a pattern). Names of modules that do not exist yet (DESIGN.md's explain.py, infotext.py, serve/) are placed already.
LAYERS = [
    ("base: files, the error classes, kernels",
     ["minidiff.files", "minidiff.errors", "minidiff.kernels.*"]),
    ("nn: chapter 1's building blocks, the production layers, the LoRA layers",
     ["minidiff.nn.*"]),
    ("format tables: the safe reader, key maps, config translation (they import no minidiff module but errors)",
     ["minidiff.formats", "minidiff.formats.weights", "minidiff.formats.keymaps", "minidiff.formats.configs"]),
    ("models: the networks and their configs, tokenizer, samplers, EMA, datasets",
     ["minidiff.vae", "minidiff.unet", "minidiff.clip", "minidiff.networks", "minidiff.tokenizer",
      "minidiff.schedulers.*", "minidiff.ema", "minidiff.data.*"]),
    ("library: file formats on models, the one door, prompts, images",
     ["minidiff.formats.lora", "minidiff.formats.embeddings", "minidiff.validation", "minidiff.settings",
      "minidiff.prompts", "minidiff.images", "minidiff.infotext"]),
    ("pipeline: sampling, and speed around it",
     ["minidiff.pipeline", "minidiff.speed"]),
    ("tools: load/save, LoRA, training and its recipes, evaluation, looking inside",
     ["minidiff.checkpoint", "minidiff.lora", "minidiff.train.*", "minidiff.recipes.*",
      "minidiff.compare", "minidiff.shapes_eval", "minidiff.annotate", "minidiff.explain"]),
    ("commands: the command lines, the web server, the package's front door",
     ["minidiff", "minidiff.commands.*", "minidiff.cli", "minidiff.__main__", "minidiff.serve.*"]),
]


# ------------------------------------------------------------------------------------------------ reading the graph
def find_modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """{dotted name: (file, is_package)} of every .py file under root (root.name is the top package)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _imports(tree: ast.Module):
    """Every Import / ImportFrom node, inside functions and classes too, but not under `if __name__ == "__main__":`."""
    def is_main_guard(node):
        return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
                and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
                and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))

    stack = [n for n in tree.body if not is_main_guard(n)]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _targets(module: str, is_package: bool, node, modules: dict, top: str) -> set[str]:
    """The modules of package `top` that one import statement imports (before adding parent packages)."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name == top or a.name.startswith(top + ".")}
    if node.level:  # relative: from the module's package, one level up per extra dot
        package = module.split(".") if is_package else module.split(".")[:-1]
        base = ".".join(package[:len(package) - (node.level - 1)] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
        if not (base == top or base.startswith(top + ".")):
            return set()
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """{module: {imported module: line of the first such import}} for the package at root."""
    top = root.name
    modules = find_modules(root)
    graph = {}
    for module, (path, is_package) in modules.items():
        edges = {}
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            for target in _targets(module, is_package, node, modules, top):
                parts = target.split(".")
                # importing a.b.c runs a/b/__init__.py as well: an import of that package, unless we are inside it
                packages = [".".join(parts[:i]) for i in range(2, len(parts))]
                packages = [p for p in packages if not module.startswith(p + ".")]
                for t in [target, *packages]:
                    if t in modules and t != module:
                        edges.setdefault(t, node.lineno)
        graph[module] = edges
    return graph


def layer_of(module: str, layers=LAYERS) -> int | None:
    """The index of the module's layer: an exact name first, else the longest "pkg.*" that contains it."""
    best, best_len = None, -1
    for i, (_, names) in enumerate(layers):
        for name in names:
            if name == module:
                return i
            if name.endswith(".*"):
                pkg = name[:-2]
                if (module == pkg or module.startswith(pkg + ".")) and len(pkg) > best_len:
                    best, best_len = i, len(pkg)
    return best


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each strongly connected component of more than one module (Tarjan), as a path
    [a, b, ..., a]."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    found = []
    for component in components:  # walk inside the component from its first module back to it
        start = min(component)
        path, seen = [start], {start}
        while True:
            nxt = sorted(w for w in graph[path[-1]] if w in component)
            back = [w for w in nxt if w == start]
            if back:
                found.append(path + [start])
                break
            step = next((w for w in nxt if w not in seen), None) or nxt[0]
            if step in seen:  # closed a loop not through start: report that loop
                found.append(path[path.index(step):] + [step])
                break
            path.append(step)
            seen.add(step)
    return found


def upward(graph: dict[str, dict[str, int]], layers=LAYERS) -> list[str]:
    """Every import of a module in a higher layer, as readable lines."""
    out = []
    for module, edges in sorted(graph.items()):
        for target, line in sorted(edges.items()):
            mine, theirs = layer_of(module, layers), layer_of(target, layers)
            if mine is not None and theirs is not None and theirs > mine:
                out.append(f"{module} (line {line}, layer {layers[mine][0].split(':')[0]!r}) imports {target} "
                           f"(layer {layers[theirs][0].split(':')[0]!r}, above it)")
    return out


# ------------------------------------------------------------------------------------------------ the rules
@pytest.fixture(scope="module")
def graph():
    return import_graph(ROOT)


def test_every_module_has_a_layer(graph):
    missing = [m for m in sorted(graph) if layer_of(m) is None]
    assert not missing, "\n".join(f"module {m} has no layer: add it to LAYERS in tests/test_imports.py"
                                  for m in missing)


def test_no_import_cycles(graph):
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in found)


def test_no_module_imports_one_above_it(graph):
    found = upward(graph)
    assert not found, "upward imports:\n" + "\n".join("  " + line for line in found)


def test_the_graph_sees_lazy_imports_and_the_rules_catch_what_they_must(tmp_path):
    """The reader itself, on a package written here: a cycle closed by an import inside a function, an upward
    arrow from a relative import, a parent package run by a submodule import, a __main__ block left out."""
    pkg = tmp_path / "toy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g\n    return g\n")     # lazy, upward
    (pkg / "high.py").write_text("from toy.low import f\nfrom .sub.leaf import x\n"
                                 "if __name__ == '__main__':\n    from . import cli\n")
    (pkg / "cli.py").write_text("import toy.high\n")
    (pkg / "sub" / "deep.py").write_text("import toy\n")                            # the root, by name
    g = import_graph(pkg)
    assert g["toy.low"] == {"toy.high": 2}
    assert g["toy.high"] == {"toy.low": 1, "toy.sub.leaf": 2, "toy.sub": 2}   # no toy.cli: the __main__ block
    assert g["toy.sub"] == {"toy.sub.leaf": 1}                                  # its own package: no edge back
    assert g["toy.cli"] == {"toy.high": 1}
    assert g["toy.sub.deep"] == {"toy": 1}
    assert cycles(g) == [["toy.high", "toy.low", "toy.high"]]
    layers = [("bottom", ["toy.low", "toy.sub.*"]), ("middle", ["toy.high"]), ("top", ["toy", "toy.cli"])]
    assert upward(g, layers) == ["toy.low (line 2, layer 'bottom') imports toy.high (layer 'middle', above it)",
                                 "toy.sub.deep (line 1, layer 'bottom') imports toy (layer 'top', above it)"]
    assert layer_of("toy.sub.leaf", layers) == 0 and layer_of("toy.nowhere", layers) is None
