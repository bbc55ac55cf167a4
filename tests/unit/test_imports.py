"""Layers point down and imports stay honest: no import between conversion and training; a function-level
import only where it saves start-up time, i.e. it defers a heavy library (torch, megatron, transformers, ...:
seconds per process) that the importing module does not already load, or it says why on its line (`# lazy: ...`)."""

import ast
import pathlib
import sys

import pytest

pytestmark = pytest.mark.unit

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "megatron_mmpl"
HEAVY = ("torch", "megatron", "transformers", "safetensors", "tokenizers", "tiktoken", "tqdm", "matplotlib", "wandb",
         "pypdfium2", "tensorboard", "webdataset", "nemo_run", "PIL", "numpy", "yaml", "psutil")


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
TREES = {name: ast.parse(p.read_text()) for name, p in MODULES.items()}


def _imports(node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom) and node.module:
        subs = [f"{node.module}.{a.name}" for a in node.names]
        return [node.module] + [s for s in subs if s in MODULES]
    return []


def _top_level(name: str) -> list[str]:
    """Modules imported when `name` is imported (module level, including its packages' __init__)."""
    out = []
    for node in TREES[name].body:
        out += _imports(node)
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` and friends
            for sub in node.body:
                out += _imports(sub)
    return out


def _loads_heavy(name: str, seen=None) -> set[str]:
    """Heavy libraries importing `name` loads (transitively through our own modules)."""
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    heavy = set()
    parents = [".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")))]
    for mod in [*_top_level(name), *parents]:
        root = mod.split(".")[0]
        if root in HEAVY:
            heavy.add(root)
        elif mod in MODULES:
            heavy |= _loads_heavy(mod, seen)
    return heavy


def _function_imports():
    for name, tree in TREES.items():
        lines = MODULES[name].read_text().splitlines()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for node in ast.walk(fn):
                    for mod in _imports(node)[:1]:
                        yield name, node.lineno, mod, lines[node.lineno - 1]


def test_conversion_and_training_do_not_import_each_other():
    bad = []
    for name, tree in TREES.items():
        for node in ast.walk(tree):
            for mod in _imports(node):
                for a, b in (("conversion", "training"), ("training", "conversion")):
                    if name.startswith(f"megatron_mmpl.{a}") and mod.startswith(f"megatron_mmpl.{b}"):
                        bad.append(f"{name} imports {mod}")
    assert not bad, bad


def test_function_level_imports_save_start_up_time():
    bad = []
    for name, line, mod, text in _function_imports():
        if "# lazy:" in text:
            continue
        already = _loads_heavy(name)
        root = mod.split(".")[0]
        deferred = ({root} if root in HEAVY else _loads_heavy(mod) if mod in MODULES else set()) - already
        if not deferred:
            bad.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {text.strip()}")
    assert not bad, "import at module level, or say why on the line (`# lazy: ...`):\n" + "\n".join(bad)


def test_the_checker_sees_the_package():
    assert len(MODULES) > 80 and "megatron_mmpl.models.qwen25vl.spec" in MODULES
    assert "torch" in _loads_heavy("megatron_mmpl.models.qwen25vl.build")
    assert not _loads_heavy("megatron_mmpl.models.qwen25vl.spec")  # the planner's model description stays light
    assert not {"torch", "transformers", "megatron"} & _loads_heavy("megatron_mmpl.plan.memory")
    assert sys.version_info >= (3, 10)
