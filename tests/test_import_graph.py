"""The package's imports only point down its layers, form no cycle, and never reach into another package's
private names (read from the source with ``ast``, like Ray Train's ``test_circular_imports``, without importing).

The layers, bottom first (a unit may import its own layer and the ones below):

- ``core``: the leaf layer (storage, stage dirs, progress, Ray helpers, config base, registries), then ``maths``
  (CRF, PAR, inference, metrics, per-pixel losses)
- ``data``, then ``models`` and ``report``; ``kuberay`` (the manifest checks) stands alone
- ``training``: the method-neutral trainer
- ``methods.base``, then one unit per method family (``methods.cam``, ``methods.bana``, ...), then
  ``methods.registry`` (the tables that name them all)
- ``pipeline_config`` (the stage sections), ``stages``, ``export``, ``preflight``, ``wiring`` (each stage's folder and
  inputs, built from the stages before it), ``pipeline``, ``tuning``, ``cli``

Method families are closed: no family imports another, and only ``methods.registry`` imports a family (the
stages, ``pipeline_config`` and everything above reach a method through the registry and ``methods.base``), so adding a
method is its folder and one registry line.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "wsss_ray"

LAYERS: dict[str, float] = {
    "core": 0, "maths": 0.5, "data": 1, "kuberay": 1, "models": 1.5, "report": 1.5, "training": 2,
    "methods": 3.0, "methods.base": 3.0, "methods.family": 3.1, "methods.registry": 3.2,
    "pipeline_config": 4, "stages": 5, "export": 5.5, "preflight": 5.7, "wiring": 5.8, "pipeline": 6, "tuning": 6.5, "cli": 7,
}


def unit_of(module: str, root: str = "wsss_ray") -> str:
    """``wsss_ray.methods.bana.losses`` → ``methods.bana``; ``wsss_ray.maths.crf`` → ``core``; top modules by name."""
    parts = module.split(".")[1:] if module.startswith(root + ".") else []
    if not parts:
        return ""
    if parts[0] == "methods" and len(parts) > 1:
        return f"methods.{parts[1]}"
    return parts[0]


# The units that are not method families although they live in ``methods/``.
METHODS_SHARED = ("methods.base", "methods.registry")
# The one unit that names the families.
FAMILY_IMPORTERS = ("methods.registry",)


def is_family(unit: str) -> bool:
    return unit.startswith("methods.") and unit not in METHODS_SHARED


def layer_of(unit: str) -> float:
    if unit.startswith("methods.") and unit not in LAYERS:
        return LAYERS["methods.family"]
    if unit not in LAYERS:
        raise KeyError(f"{unit!r} has no layer: add it to LAYERS in tests/test_import_graph.py")
    return LAYERS[unit]


def module_name(path: Path, package: Path, root: str) -> str:
    rel = path.relative_to(package).with_suffix("")
    parts = [root, *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(package: Path, root: str = "wsss_ray") -> Iterator[tuple[str, str, list[str], int]]:
    """(importing module, imported module, names imported from it, line) for every import of ``root``."""
    for path in sorted(package.rglob("*.py")):
        module = module_name(path, package, root)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == root or alias.name.startswith(root + "."):
                        yield module, alias.name, [], node.lineno
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and (
                    node.module == root or node.module.startswith(root + ".")):
                names = [a.name for a in node.names]
                if node.module == root:  # ``from wsss_ray import storage``: each name is a module
                    for name in names:
                        yield module, f"{root}.{name}", [], node.lineno
                else:
                    yield module, node.module, names, node.lineno


def problems(package: Path, root: str = "wsss_ray") -> list[str]:
    """Every upward import, cycle between units, private-name import and import of a method family from outside
    ``methods.registry`` in ``package``."""
    found: list[str] = []
    edges: dict[str, set[str]] = {}
    for source, target, names, line in imports(package, root):
        a, b = unit_of(source, root), unit_of(target, root)
        where = f"{source}:{line}"
        for name in names:
            if name.startswith("_") and a != b:
                found.append(f"{where} imports the private name {name} of {target}")
        if not a or not b or a == b:
            continue
        edges.setdefault(a, set()).add(b)
        if is_family(b) and is_family(a):
            found.append(f"{where} imports {target}: method family {a} imports another family, {b}")
        elif is_family(b) and a not in FAMILY_IMPORTERS:
            found.append(f"{where} imports {target}: {a} reaches into method family {b} (only methods.registry "
                         "names the families)")
        if layer_of(b) > layer_of(a):
            found.append(f"{where} imports {target}: upward from {a} to {b}")
    found += [f"cycle between units: {' -> '.join(cycle)}" for cycle in cycles(edges)]
    return found


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of units (depth-first search)."""
    found, done, stack = [], set(), []

    def visit(node: str) -> None:
        if node in stack:
            found.append([*stack[stack.index(node):], node])
            return
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(edges):
        visit(node)
    return found


def test_imports_point_down_and_form_no_cycle() -> None:
    assert problems(PACKAGE) == []


def test_every_unit_has_a_layer() -> None:
    units = {unit_of(module_name(p, PACKAGE, "wsss_ray")) for p in PACKAGE.rglob("*.py")} - {""}
    for unit in units:
        layer_of(unit)


def _write(root: Path, files: dict[str, str]) -> Path:
    package = root / "wsss_ray"
    for name, text in files.items():
        path = package / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package


@pytest.mark.parametrize(("files", "expected"), [
    # the leaf layer importing a stage
    ({"core/a.py": "from wsss_ray.stages.x import run\n", "stages/x.py": "def run(): ...\n"},
     "upward from core to stages"),
    # two method families importing each other (inside a function counts too)
    ({"methods/cam/a.py": "def f():\n    from wsss_ray.methods.bana import b\n",
      "methods/bana/b.py": "import wsss_ray.methods.cam.a\n"},
     "cycle between units: methods.bana -> methods.cam -> methods.bana"),
    # a method family importing another one (one way: no cycle, same layer)
    ({"methods/cdsp/a.py": "from wsss_ray.methods.robust.b import loss\n", "methods/robust/b.py": "loss = 1\n"},
     "method family methods.cdsp imports another family, methods.robust"),
    # a stage importing a method family instead of the registry
    ({"stages/x.py": "from wsss_ray.methods.bana.boxes import boxes_array\n",
      "methods/bana/boxes.py": "def boxes_array(): ...\n"},
     "stages reaches into method family methods.bana"),
    # the experiment config importing a method family for a default
    ({"pipeline_config.py": "from wsss_ray.methods.cam.config import GapHeadConfig\n",
      "methods/cam/config.py": "GapHeadConfig = 1\n"},
     "pipeline_config reaches into method family methods.cam"),
    # the infrastructure layer reaching up into the segmentation maths
    ({"core/storage.py": "from wsss_ray.maths.crf import crf_inference\n",
      "maths/crf.py": "def crf_inference(): ...\n"},
     "upward from core to maths"),
    # another package's private name
    ({"stages/x.py": "from wsss_ray.core.config_base import _secret\n", "core/config_base.py": "_secret = 1\n"},
     "imports the private name _secret of wsss_ray.core.config_base"),
])
def test_the_checker_catches_what_it_claims(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    found = problems(_write(tmp_path, files))
    assert any(expected in problem for problem in found), found


def test_the_checker_accepts_downward_imports(tmp_path: Path) -> None:
    package = _write(tmp_path, {"stages/x.py": "from wsss_ray.core.config_base import Public\nfrom wsss_ray import core\n"
                                               "from wsss_ray.methods.registry import GENERATORS\n",
                                "core/config_base.py": "Public = 1\n", "core/__init__.py": "",
                                "methods/registry.py": "from wsss_ray.methods.cam.gen import GENERATORS\n",
                                "methods/cam/gen.py": "from wsss_ray.methods.base import Generator\nGENERATORS = 1\n",
                                "methods/base.py": "Generator = 1\n"})
    assert problems(package) == []
