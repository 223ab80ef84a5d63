"""The project's import graph: no cycles, and the layers point one way. genloc/ is the pure model
package (installable on its own): it imports nothing of the training side or the applications, and
the data converters import nothing heavy."""
import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", ".git", "node_modules"}
# What the pure model package may never import (the training side, measurement, configs, applications).
ABOVE_GENLOC = ("lightning", "lightning_modules", "datamodules", "callbacks", "metrics", "configs", "benchmarks",
                "scripts", "tests", "train", "evaluate", "insert", "demo")


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every Python file of the repository."""
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if SKIP & set(parts) or any(p.startswith(".") for p in parts):
            continue
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules ``name`` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1] if package else []
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from pkg import name`: the module, else its package
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
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
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(edges)))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_relative_lazy_and_package_imports():
    edges = graph()
    assert "genloc.location_model" in edges["genloc.placement"]  # `from .location_model import ...`
    assert "genloc.hub" in edges["genloc.cli.placing"] and "genloc.cli.parsers" in edges["insert"]  # in a function; a module
    assert {"genloc.checkpoint", "lightning_modules.mle"} <= edges["lightning_modules.checkpoint"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_genloc_imports_nothing_above_it():
    upward = {f"{name} -> {target}" for name, targets in graph().items() if name.split(".")[0] == "genloc"
              for target in targets if target.split(".")[0] in ABOVE_GENLOC}
    assert not upward, sorted(upward)
    third_party = {f"{path.relative_to(ROOT)}: {alias}" for path in (ROOT / "genloc").rglob("*.py")
                   for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, (ast.Import, ast.ImportFrom))
                   for alias in ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""])
                   if alias.split(".")[0] == "lightning"}
    assert not third_party, sorted(third_party)


def test_libraries_import_no_application_and_data_imports_no_training():
    """Entry points (train.py, evaluate.py, insert.py, demo.py, scripts/, benchmarks/) sit on top: no
    library package imports them; the data and metrics packages import no training code."""
    applications = ("train", "evaluate", "insert", "demo", "scripts", "benchmarks", "tests")
    libraries = ("genloc", "datamodules", "lightning_modules", "callbacks", "metrics", "configs")
    upward = set()
    for name, targets in graph().items():
        layer = name.split(".")[0]
        banned = applications + (("lightning_modules", "callbacks") if layer in ("datamodules", "metrics") else ())
        if layer in libraries:
            upward |= {f"{name} -> {target}" for target in targets if target.split(".")[0] in banned}
    assert not upward, sorted(upward)


def test_the_data_converters_load_no_model_stack():
    code = ("import sys, datamodules.convert, genloc.images, genloc.files\n"
            "heavy = [m for m in ('genloc.location_model', 'transformers', 'lightning', 'open_clip', 'timm') if m in sys.modules]\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_image_conversion_and_the_writer_load_no_torch():
    code = "import sys, genloc.images, genloc.files; print([m for m in ('torch', 'genloc.location_model') if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_genloc_and_its_public_api_load_no_training_side():
    """Every genloc module, the public API and the command imported in a fresh interpreter: none of the
    training side, its dependencies or the package's old name is loaded (what an install without the
    train extra needs)."""
    code = ("import sys, pkgutil, importlib, genloc\n"
            "from genloc import GenLocModel, place, place_many\n"
            "for info in pkgutil.walk_packages(genloc.__path__, 'genloc.'):\n"
            "    importlib.import_module(info.name)\n"
            "banned = ('lightning', 'lightning_modules', 'datamodules', 'callbacks', 'metrics', 'configs', 'omegaconf',\n"
            "          'webdataset', 'torchmetrics', 'models')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
