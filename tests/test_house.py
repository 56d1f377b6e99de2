"""The house: folders are layers, imports run down, the reading path names LoRA alone.

Every module of the package is parsed (ast), never imported, so an import written inside a
function counts as much as one at the top. The layers, lowest first:

    core      the reading path: config, params, layers, model, lora, gradcheck (the paper alone)
    methods   what came after LoRA, and the adapter baselines: layers and techniques only
    training  data, optimizers, the training loop, checkpoints, counting, Section 7's measures
    io        GPT-2's published files and PEFT's format
    studies   the programs that train and write results files (and what they share)
    bench     the cost model, measured
    figures   every figure
    course    the homework and its grader
    cli       lora_np/__main__.py, the commands

A module imports from its own layer or a lower one, never a higher one; no import cycle, even
within a layer; a name with a leading underscore is used only in its own module. The package
root, lora_np/__init__.py, is the public face: it gathers core, methods, training and io (and
keeps their earlier flat paths), so only layers above io may import it.
"""

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lora_np"
LAYERS = ("core", "methods", "training", "io", "studies", "bench", "figures", "course", "cli")
ROOT_LAYER = "io"  # the layer of lora_np/__init__.py: what it imports
MAX_LINES = 500
# Later methods, and words for them, that the reading path's code must not name (its docstrings may).
LATER = ("dora", "vera", "pissa", "nf4", "qlora", "adapter_h", "adapter_l", "adapterh", "adapterl", "loraplus")
# LoraConfig's fields are its public signature, fixed for the notebooks and results files that use them;
# what they mean and how they are checked lives in the methods' own modules.
SIGNATURE = {("config.py", "dora_exact_norm")}


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module):
    if module == "lora_np":
        return ROOT_LAYER
    if module == "lora_np.__main__":
        return "cli"
    return module.split(".")[1]


def resolve(target):
    """The module a flat path of earlier versions stands for: lora_np.dora is lora_np.methods.dora
    (lora_np/__init__.py keeps those paths for the library's layers, core to io)."""
    parts = target.split(".")
    if len(parts) < 2 or parts[1] in LAYERS or parts[1].startswith("__"):
        return target
    for layer in LAYERS[: LAYERS.index(ROOT_LAYER) + 1]:
        moved = ".".join(["lora_np", layer, *parts[1:]])
        if moved in MODULES or moved.rsplit(".", 1)[0] in MODULES:
            return moved
    return target


def imports_of(module):
    """[(imported module, [names imported from it], line)] for every import of a lora_np module."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(resolve(a.name), [], node.lineno) for a in node.names if a.name.split(".")[0] == "lora_np"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target.split(".")[0] != "lora_np":
                continue
            target = resolve(target)
            names = [a.name for a in node.names]
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(m, [], node.lineno) for m in submodules]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not submodules:
                found.append((target, rest, node.lineno))
    return found


def test_every_module_is_in_a_layer():
    assert {layer_of(m) for m in MODULES} <= set(LAYERS), sorted({layer_of(m) for m in MODULES} - set(LAYERS))
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert folders == set(LAYERS) - {"cli"}, folders  # one folder a layer, nothing loose beside them
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"], loose


def test_imports_run_down():
    upward = []
    for module in MODULES:
        here = LAYERS.index(layer_of(module))
        for target, _, line in imports_of(module):
            if LAYERS.index(layer_of(target)) > here:
                upward.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} ({layer_of(module)}) "
                              f"imports {target} ({layer_of(target)})")  # fmt: skip
    assert not upward, "imports that run up the house:\n" + "\n".join(upward)


def test_no_import_cycle():
    graph = defaultdict(set)
    for module in MODULES:
        for target, _, _ in imports_of(module):
            if target != module and target in MODULES:
                graph[module].add(target)
    # depth-first search, reporting the first cycle found as a path
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(MODULES):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_private_names_stay_private():
    leaks = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        for target, names, line in imports_of(module):
            leaks += [f"{path.name}:{line} imports {target}.{n}" for n in names if n.startswith("_") and not
                      n.startswith("__") and target != module]  # fmt: skip
        # package.module._name, written out: the dotted name of an Attribute chain
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                chain, value = [], node.value
                while isinstance(value, ast.Attribute):
                    chain.append(value.attr)
                    value = value.value
                if isinstance(value, ast.Name) and value.id == "lora_np":
                    dotted = ".".join(["lora_np", *reversed(chain)])
                    if resolve(dotted) != module:
                        leaks.append(f"{path.name}:{node.lineno} uses {dotted}.{node.attr}")
        # module._name, for a lora_np module bound to a name by an import
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                for a in node.names:
                    aliases[a.asname or a.name] = a.name
            elif isinstance(node, ast.Import):
                for a in node.names:
                    aliases[(a.asname or a.name).split(".")[0]] = a.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):  # fmt: skip
                imported = [t for t, _, _ in imports_of(module) if t.rsplit(".", 1)[-1] == aliases[node.value.id]]
                if imported:
                    leaks.append(f"{path.name}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not leaks, "private names used outside their module:\n" + "\n".join(leaks)


def test_no_module_is_over_the_limit():
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in MODULES.values()}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def _code_words(path):
    """Every identifier, attribute and non-docstring string of a module's code: what it names."""
    tree = ast.parse(path.read_text())
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef)) and ast.get_docstring(node) is not None:
            docstrings.add(id(node.body[0].value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            yield node.lineno, node.id
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node.lineno, node.name
        elif isinstance(node, ast.arg):
            yield node.lineno, node.arg
        elif isinstance(node, ast.keyword) and node.arg is not None:
            yield node.value.lineno, node.arg
        elif isinstance(node, ast.alias):
            yield node.lineno, node.name
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            yield node.lineno, node.value


def test_the_reading_path_names_lora_alone():
    named = []
    for path in sorted((PACKAGE / "core").glob("*.py")):
        for line, word in _code_words(path):
            hits = [w for w in LATER if w in word.lower().replace("-", "").replace("+", "plus")]
            if hits and (path.name, word) not in SIGNATURE:
                named.append(f"core/{path.name}:{line} {word!r:.60} names {hits}")
    assert not named, "the reading path's code names later methods:\n" + "\n".join(named)


def test_the_checks_of_this_file_can_fail(tmp_path, monkeypatch):
    """Each check above, on a planted module: an upward import, a cycle, a private name, a later method."""
    planted = {
        "core/leak.py": "from ..studies import demo\nfrom .params import _private\n",
        "core/dora_in_core.py": "def f(lora):\n    return lora.method == 'dora'\n",
        "core/vera_kw.py": "def g(f):\n    return f(vera_scale=1)\n",
        "methods/dotted.py": "import lora_np.core.params\n\nX = lora_np.core.params._secret\n",
        "methods/__init__.py": "from . import dotted\n",
        "training/a.py": "from .b import x\n",
        "training/b.py": "def x():\n    from .a import y\n",
    }
    for name, text in planted.items():
        (tmp_path / "lora_np" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "lora_np" / name).write_text(text)
    this = sys.modules[__name__]
    monkeypatch.setattr(this, "PACKAGE", tmp_path / "lora_np")
    monkeypatch.setattr(this, "MODULES", {module_name(p): p for p in sorted((tmp_path / "lora_np").rglob("*.py"))})
    expected = {
        test_imports_run_down: ["lora_np.studies"],
        test_no_import_cycle: ["lora_np.training.a"],
        test_private_names_stay_private: ["_private", "lora_np.core.params._secret"],
        test_the_reading_path_names_lora_alone: ["'dora'", "'vera_scale'"],
    }
    for check, words in expected.items():
        with pytest.raises((AssertionError, pytest.fail.Exception)) as failed:
            check()
        assert all(w in str(failed.value) for w in words), (check.__name__, str(failed.value))


def test_the_readme_states_the_reading_path_and_the_layers_as_they_are():
    """The README's reading order lists core/'s modules in the package docstring's order, with their size;
    both state the layers as LAYERS above."""
    readme = (PACKAGE.parent / "README.md").read_text()
    docstring = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text()))
    lines = sum(len(p.read_text().splitlines()) for p in (PACKAGE / "core").glob("*.py"))
    assert f"About {round(lines, -2):,} lines, an afternoon" in readme, lines
    order = ["config", "params", "layers", "model", "lora", "gradcheck"]
    assert {p.stem for p in (PACKAGE / "core").glob("*.py")} - {"__init__"} == set(order)
    rows = [readme.index(f"| {i} | `core/{name}.py` |") for i, name in enumerate(order, 1)]
    assert rows == sorted(rows)
    places = [docstring.index(f"{i}. core/{name}.py") for i, name in enumerate(order, 1)]
    assert places == sorted(places)
    stated = "Layers, lowest first: " + ", ".join(LAYERS[:-1]) + ", cli (__main__.py)"
    assert stated in " ".join(readme.split()) and stated in " ".join(docstring.split())
    assert f"tests/{Path(__file__).name}" in docstring and f"tests/{Path(__file__).name}" in readme
