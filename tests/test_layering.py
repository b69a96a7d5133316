"""The package's layout: subpackages in layers, no module of a lower layer importing a higher one, no import circle,
and a complete top-level API (`sinder_peft.__all__`) that the README's examples use alone.

The layers, lowest first (README, "Map of the code"):

0. `tuner` (the PEFT adapter and the architecture registry) and `version`;
1. `analysis` (directions, detection, preservation) and `visualization` (figures);
2. `synthetic` (the demo and planted models);
3. `models` (loading, processor, Hub, conversion);
4. `images` (preprocessing, datasets, batching);
5. `training` and `evaluation`, which do not import each other;
6. `jobs` (repair, diagnose);
7. `cli` and the package itself (`sinder_peft/__init__.py`, the public API).

The import graph is read twice: statically, every `import` statement of every module (those inside functions too,
which must not exist for our own modules: a lazy import is how a circle hides); and at run time, in a fresh
interpreter per subpackage, by recording every import that each of our modules makes while the subpackage and all its
modules are imported.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = REPO_ROOT / "sinder_peft"

LAYERS: list[tuple[str, ...]] = [
    ("sinder_peft.tuner", "sinder_peft.version"),
    ("sinder_peft.analysis", "sinder_peft.visualization"),
    ("sinder_peft.synthetic",),
    ("sinder_peft.models",),
    ("sinder_peft.images",),
    ("sinder_peft.training", "sinder_peft.evaluation"),
    ("sinder_peft.jobs",),
    ("sinder_peft.cli", "sinder_peft"),
]
SUBPACKAGES = [name for layer in LAYERS for name in layer if (PACKAGE_DIR / name.split(".")[-1]).is_dir()]
REQUIRED_API = (
    "SinderConfig",
    "SinderModel",
    "SinderLayer",
    "SinderLinear",
    "singular_defect_directions",
    "find_defect_tokens",
    "repair",
    "RepairArguments",
    "TrainingArguments",
    "diagnose",
    "evaluate",
    "EvaluationArguments",
    "load_original_checkpoint",
    "export_original_checkpoint",
)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules() -> dict[str, Path]:
    return {module_name(path): path for path in PACKAGE_DIR.rglob("*.py")}


def layer_of(module: str) -> tuple[int, str]:
    """Return the layer of `module` and the group (subpackage or top-level module) that places it."""
    best: tuple[int, str] | None = None
    for index, layer in enumerate(LAYERS):
        for group in layer:
            if (module == group or module.startswith(group + ".")) and (best is None or len(group) > len(best[1])):
                best = (index, group)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS (and to the README's map)"
    return best


def static_imports(path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """Return the modules of ours that `path` imports, each with whether the import is at the module's top level."""
    tree = ast.parse(path.read_text())
    importer = module_name(path)
    package = importer if path.name == "__init__.py" else importer.rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules]
        else:
            continue
        for target in targets:
            if target == "sinder_peft" or target.startswith("sinder_peft."):
                found.append((target, id(node) in top_level))
    return found


def check_edge(importer: str, imported: str) -> str | None:
    """Return why `importer` may not import `imported`, or None when it may."""
    if imported == importer or importer.startswith(imported + "."):
        return None  # a module importing its own package (its __init__) or itself
    low, low_group = layer_of(importer)
    high, high_group = layer_of(imported)
    if importer.startswith("sinder_peft.tuner") and not imported.startswith("sinder_peft.tuner"):
        return "the tuner imports nothing of ours outside itself"
    if high > low:
        return f"layer {low} ({low_group}) imports layer {high} ({high_group})"
    if high == low and low_group != high_group and importer != "sinder_peft":
        return f"{low_group} and {high_group} share layer {low} and do not import each other"
    return None


def test_every_module_has_a_layer() -> None:
    for module in all_modules():
        layer_of(module)
    assert set(SUBPACKAGES) == {
        f"sinder_peft.{path.name}" for path in PACKAGE_DIR.iterdir() if (path / "__init__.py").is_file()
    }


def test_static_import_graph_is_layered_and_acyclic() -> None:
    modules = all_modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    problems = []
    for name, path in modules.items():
        for imported, at_top in static_imports(path, modules):
            if imported not in modules:
                problems.append(f"{name} imports {imported}, which does not exist")
                continue
            if not at_top:
                problems.append(f"{name} imports {imported} inside a function")
            reason = check_edge(name, imported)
            if reason is not None:
                problems.append(f"{name} -> {imported}: {reason}")
            if imported != name and not name.startswith(imported + "."):
                graph[name].add(imported)
    assert not problems, "\n".join(problems)

    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                raise AssertionError("import circle: " + " -> ".join([*path[path.index(target) :], target]))
            if target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


RECORD_IMPORTS = r"""
import builtins, importlib, importlib.util, json, pkgutil, sys
edges = set()
real_import = builtins.__import__

def recording_import(name, globals=None, locals=None, fromlist=(), level=0):
    module = real_import(name, globals, locals, fromlist, level)
    importer = (globals or {}).get("__name__", "")
    if importer == "sinder_peft" or importer.startswith("sinder_peft."):
        base = importlib.util.resolve_name("." * level + name, globals["__package__"]) if level else name
        targets = [base] + [f"{base}.{item}" for item in (fromlist or ()) if f"{base}.{item}" in sys.modules]
        for target in targets:
            if target == "sinder_peft" or target.startswith("sinder_peft."):
                edges.add((importer, target))
    return module

builtins.__import__ = recording_import
package = importlib.import_module(sys.argv[1])
names = [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in names:
    importlib.import_module(name)
builtins.__import__ = real_import
print(json.dumps({"modules": names, "edges": sorted(edges)}))
"""


@pytest.mark.parametrize("subpackage", SUBPACKAGES)
def test_subpackage_imports_alone_in_a_fresh_interpreter(subpackage: str) -> None:
    """Importing the subpackage and every module in it, first thing in a fresh interpreter, works, and no import made
    on the way goes from a lower layer to a higher one."""
    completed = subprocess.run(
        [sys.executable, "-c", RECORD_IMPORTS, subpackage], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    expected = {name for name in all_modules() if name.startswith(subpackage + ".")}
    assert set(result["modules"]) == expected
    problems = [
        f"{importer} -> {imported}: {reason}"
        for importer, imported in result["edges"]
        if (reason := check_edge(importer, imported)) is not None
    ]
    assert not problems, "\n".join(problems)
    assert ("sinder_peft", "sinder_peft.tuner") in {tuple(edge) for edge in result["edges"]}  # the recording works


def test_the_checks_catch_a_wrong_import() -> None:
    """The rules refuse what they must: analysis importing training, the tuner importing analysis, training and
    evaluation importing each other; and allow a job importing anything below it."""
    assert check_edge("sinder_peft.analysis.detection", "sinder_peft.training.loss") is not None
    assert check_edge("sinder_peft.tuner.model", "sinder_peft.analysis.detection") is not None
    assert check_edge("sinder_peft.tuner.model", "sinder_peft.version") is not None
    assert check_edge("sinder_peft.training.trainer", "sinder_peft.evaluation.features") is not None
    assert check_edge("sinder_peft.evaluation.sections", "sinder_peft.training.loss") is not None
    assert check_edge("sinder_peft.images.datasets", "sinder_peft.jobs.repair") is not None
    assert check_edge("sinder_peft.jobs.repair", "sinder_peft.training.trainer") is None
    assert check_edge("sinder_peft.evaluation.evaluate", "sinder_peft.visualization.figures") is None


API_SCRIPT = r"""
import json, sinder_peft
namespace = {}
exec("from sinder_peft import *", namespace)
missing = [name for name in sinder_peft.__all__ if name not in namespace]
foreign = [
    name for name in sinder_peft.__all__
    if name != "__version__" and not callable(namespace[name]) and not isinstance(namespace[name], (str, tuple))
]
origins = {
    name: getattr(namespace[name], "__module__", "") or ""
    for name in sinder_peft.__all__ if callable(namespace[name])
}
print(json.dumps({"all": sinder_peft.__all__, "missing": missing, "foreign": foreign, "origins": origins}))
"""


def test_every_name_of_the_public_api_imports() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", API_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    names = result["all"]
    assert len(names) == len(set(names)) and result["missing"] == [] and result["foreign"] == []
    assert set(REQUIRED_API) <= set(names)
    assert all(origin.startswith("sinder_peft.") for origin in result["origins"].values()), result["origins"]


def test_readme_examples_use_only_the_top_level_api() -> None:
    """Every Python example of the README imports `sinder_peft` alone and uses names of `__all__`."""
    import sinder_peft

    readme = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    assert blocks
    used: set[str] = set()
    for block in blocks:
        assert not re.search(r"from sinder_peft\.|import sinder_peft\.", block), block
        used |= set(re.findall(r"\bsinder_peft\.([A-Za-z_]\w*)", block))
        for imported in re.findall(r"from sinder_peft import \(?([\w, \n]+)\)?", block):
            used |= {name.strip() for name in imported.split(",") if name.strip()}
    assert used and used <= set(sinder_peft.__all__), used - set(sinder_peft.__all__)


def test_the_library_named_subpackages_do_not_shadow_their_libraries() -> None:
    """`sinder_peft.models.timm` and `sinder_peft.models.open_clip` are named after the libraries they read: asking
    for the library from them gives the library itself, or, where it is not installed, the install hint; never the
    subpackage."""
    script = """
import json
import sinder_peft.models.open_clip.loading as open_clip_loading
import sinder_peft.models.timm.loading as timm_loading
found = {}
for name, require in (("timm", timm_loading.require_timm), ("open_clip", open_clip_loading.require_open_clip)):
    try:
        module = require()
        found[name] = [module.__name__, str(getattr(module, "__file__", ""))]
    except ImportError as error:
        found[name] = ["missing", str(error)]
print(json.dumps(found))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    found = json.loads(result.stdout.strip().splitlines()[-1])
    for library, (name, detail) in found.items():
        if name == "missing":
            assert f"pip install 'sinder-peft[{library}]'" in detail
        else:
            assert name == library and str(PACKAGE_DIR) not in detail, (library, detail)
