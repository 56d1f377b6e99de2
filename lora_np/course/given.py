"""The helpers a student may import, and nothing else: a small `lora_np` package for the
student's process, cut out of the real one.

The handout's files import a few of lora_np's helpers (check_int, adapter_names, the given
forwards, ...). The real modules that hold them also hold the reference solutions, so the
student's process gets a package of its own: for each handout import, the statements of the
real module that define the imported names and everything they use, found by following the
names in the source (a tree shake), and nothing more. Every module lands flat in the package
(lora_np/core/lora.py becomes lora_np/lora.py, as the handout spells it). If an exercise's
function were ever needed by a helper, building the package fails rather than hand it over.
"""

import ast
import functools
import importlib
import inspect
import os

from .exercises import EXERCISES, FILES

PACKAGE = "lora_np"


def _handout_imports():
    """{flat module name: {names}} for every `from lora_np.X import ...` in the handout's files."""
    wanted = {}
    for f in FILES:
        for node in ast.parse(f.imports).body:
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PACKAGE + "."):
                flat = node.module.split(".", 1)[1]
                wanted.setdefault(flat, set()).update(a.name for a in node.names)
    return wanted


def _defined(stmt):
    """The top-level names a statement binds."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {stmt.name}
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return {(a.asname or a.name).split(".")[0] for a in stmt.names}
    if isinstance(stmt, ast.Assign):
        return {n.id for t in stmt.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
        return {stmt.target.id}
    return set()


def _used(stmt):
    return {n.id for n in ast.walk(stmt) if isinstance(n, ast.Name)}


def _flat(module_name):
    return module_name.rsplit(".", 1)[1]


def _resolve(module, node):
    """The full name of the module an ImportFrom inside `module` names."""
    if node.level == 0:
        return node.module
    base = module.__name__.split(".")[: -node.level]
    return ".".join(base + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=1)
def build():
    """{file name inside the package: source} for the student's `lora_np`."""
    forbidden = {(obj.__module__, obj.__qualname__.split(".")[0]) for ex in EXERCISES for obj, method in ex.blanks
                 if method is None}  # fmt: skip
    todo = []  # (real module, names)
    for flat, names in _handout_imports().items():
        todo.append((importlib.import_module(f"{PACKAGE}.{flat}"), names))
    kept = {}  # real module name -> (module, set of kept statement indexes, {index: replacement source})
    while todo:
        module, names = todo.pop()
        tree = ast.parse(inspect.getsource(module))
        body = tree.body
        entry = kept.setdefault(module.__name__, (module, set(), {}))
        need, seen = set(names), set()
        while need - seen:
            name = (need - seen).pop()
            seen.add(name)
            where = [i for i, s in enumerate(body) if name in _defined(s)]
            if not where:
                raise ValueError(f"{module.__name__} defines no {name}, which a handout file imports")
            for i in where:
                stmt = body[i]
                if (module.__name__, name) in forbidden:
                    raise ValueError(f"the helper {names} of {module.__name__} needs the exercise {name}")
                entry[1].add(i)
                if isinstance(stmt, ast.ImportFrom):
                    target = _resolve(module, stmt)
                    if target.split(".")[0] == PACKAGE:
                        # only the names this module uses, from the flat module of the student's package
                        used = {(a.name, a.asname) for a in stmt.names if (a.asname or a.name) in need}
                        todo.append((importlib.import_module(target), {n for n, _ in used}))
                        entry[2].setdefault(i, (target, set()))[1].update(used)
                    continue
                if isinstance(stmt, ast.Import):
                    continue
                need |= _used(stmt) & {n for s in body for n in _defined(s)}
    files = {"__init__.py": '"""The helpers of lora_np a handout may import (lora_np.course.given made it)."""\n'}
    merged = {}
    for module_name, (module, indexes, replaced) in kept.items():
        flat = _flat(module_name)
        src = inspect.getsource(module).splitlines()
        body = ast.parse("\n".join(src)).body
        parts = merged.setdefault(flat, {})
        for i in sorted(indexes):
            stmt = body[i]
            first = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
            if i in replaced:
                target, used = replaced[i]
                names = ", ".join(n + (f" as {a}" if a else "") for n, a in sorted(used, key=str))
                parts[i] = f"from .{_flat(target)} import {names}"
            else:
                parts[i] = "\n".join(src[first - 1 : stmt.end_lineno])
    for flat, parts in merged.items():
        files[f"{flat}.py"] = f'"""Part of {PACKAGE}.{flat}: the helpers the handout imports."""\n\n' + "\n\n\n".join(
            parts[i] for i in sorted(parts)
        ) + "\n"
    return files


def write(folder):
    """Write the package into folder/lora_np; returns its path."""
    root = os.path.join(folder, PACKAGE)
    os.makedirs(root)
    for name, text in build().items():  # the same text every time: the reference does not change in a run
        with open(os.path.join(root, name), "w", encoding="utf-8") as f:
            f.write(text)
    return root
