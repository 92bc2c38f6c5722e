"""The layout's rules (DESIGN.md, Layout), read from the source itself: a family is known only in
its folder (engine/models/<family>/), a cache kind only in caching/, and the layers import one
way (launch -> engine -> {parallel, caching}; caching uses parallel's collectives only; the errors
in engine/errors.py are for every layer).

Model and kind names are taken from the registries, so a new family or kind is covered without
editing this file. "Tested" means compared: `==`, `!=`, `in` against a literal, or a literal
dict keyed by the names. Docstrings, messages and help texts may name them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from unison.caching import registry
from unison.engine.models import SPECS, checkpoints

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("engine", "parallel", "caching", "launch")


def _modules(*folders: str):
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield path.relative_to(ROOT), ast.parse(path.read_text(), filename=str(path))


def _model_names() -> set[str]:
    names = set(SPECS) | set(checkpoints())
    for spec in SPECS.values():
        names |= {spec.pipeline_class, spec.transformer_class}
        for checkpoint in spec.checkpoints:
            names |= {cls for library, cls, _ in checkpoint.components.values() if library == "diffusers"}
    return names


def _tested_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, string) for every string literal that is compared with or looked up in code."""
    found = []

    def strings(node) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return [s for element in node.elts for s in strings(element)]
        return []

    # A kind's table of published presets is keyed by the presets' own names (some name the
    # checkpoint they were calibrated on): names of presets, not a test of the model.
    presets = {id(node.value) for node in ast.walk(tree) if isinstance(node, (ast.Assign, ast.AnnAssign))
               and any(isinstance(t, ast.Name) and t.id == "PRESETS"
                       for t in (node.targets if isinstance(node, ast.Assign) else [node.target]))}
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                found += [(node.lineno, s) for s in strings(operand)]
        elif isinstance(node, ast.Dict) and id(node) not in presets:
            found += [(node.lineno, s) for key in node.keys if key is not None for s in strings(key)]
    return found


def _class_references(tree: ast.AST, names: set[str]) -> list[tuple[int, str]]:
    """(line, name) for every use of a model class as code (an import, isinstance, a call)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and node.id in names:
            found.append((node.lineno, node.id))
        elif isinstance(node, ast.Attribute) and node.attr in names:
            found.append((node.lineno, node.attr))
        elif isinstance(node, ast.ImportFrom):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name in names]
    return found


def test_no_family_or_model_class_is_tested_outside_its_folder():
    names = _model_names()
    assert {"wan", "WanTransformer3DModel", "hunyuanvideo"} <= names  # the registries are what is read
    offences = []
    for path, tree in _modules(*PRODUCT):
        if path.parts[:2] == ("engine", "models"):
            continue
        offences += [f"{path}:{line} {name}" for line, name in _tested_literals(tree) if name in names]
        offences += [f"{path}:{line} {name}" for line, name in _class_references(tree, names)]
    assert not offences, "model knowledge outside engine/models/:\n" + "\n".join(offences)


def test_no_cache_kind_is_tested_outside_caching():
    kinds = set(registry.KINDS)
    assert "fbcache" in kinds
    offences = []
    for path, tree in _modules("engine", "parallel", "launch"):
        if path.parts[:2] == ("engine", "models"):  # a checkpoint's published presets, per kind (data)
            continue
        offences += [f"{path}:{line} {name}" for line, name in _tested_literals(tree) if name in kinds]
    assert not offences, "cache kinds named outside caching/:\n" + "\n".join(offences)


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.append((node.lineno, node.module))
    return out


@pytest.mark.parametrize("folder, allowed", [
    ("engine", lambda m: not m.startswith("unison.launch")),
    ("parallel", lambda m: not m.startswith(("unison.launch", "unison.caching", "unison.engine"))
     or m == "unison.engine.errors"),
    ("caching", lambda m: not m.startswith(("unison.launch", "unison.engine", "unison.parallel"))
     or m in ("unison.engine.errors", "unison.parallel.comm")),
])
def test_layers_import_one_way(folder, allowed):
    offences = [f"{path}:{line} imports {module}" for path, tree in _modules(folder)
                for line, module in _imports(tree) if module.startswith("unison") and not allowed(module)]
    assert not offences, "\n".join(offences)


def test_the_guards_find_what_they_look_for():
    """The checks above see a family test, a class import and a kind table when there is one."""
    tree = ast.parse('if spec.family == "wan2.2-ti2v":\n    x = {"fbcache": 2}\n'
                     'from diffusers import AutoencoderKLWan\n')
    assert ("wan2.2-ti2v" in [s for _, s in _tested_literals(tree)]
            and "fbcache" in [s for _, s in _tested_literals(tree)])
    assert [n for _, n in _class_references(tree, {"AutoencoderKLWan"})] == ["AutoencoderKLWan"]
