"""Packaging: whatever the main job imports must be a runtime dependency, not a dev extra.

A fresh ``pip install -e .`` once trained for many minutes and then died in the probe stage on a
missing ``matplotlib`` (it was only in the ``dev`` extra, which CI always installed). This test
reads every import in the shipped packages and fails on any third-party module that is neither a
declared dependency nor imported under an ``except ImportError`` guard (an optional feature that
says what to install).
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("lvm", "kernels", "tokenizer")


def _declared(extra: str | None = None) -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {_norm(re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0]) for r in reqs}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _guarded(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Inside a ``try`` whose handlers catch ImportError (or anything broader)."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Try):
            for h in node.handlers:
                names = [h.type] if not isinstance(h.type, ast.Tuple) else list(h.type.elts)
                if h.type is None or any(isinstance(n, ast.Name) and n.id in
                                         ("ImportError", "ModuleNotFoundError", "Exception") for n in names):
                    return True
    return False


def unguarded_third_party_imports() -> dict[str, list[str]]:
    """Top-level module name -> files importing it without a guard (stdlib and our packages excluded)."""
    found: dict[str, list[str]] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            tree = ast.parse(path.read_text())
            parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in PACKAGES or top == "__future__":
                        continue
                    if not _guarded(node, parents):
                        found.setdefault(top, []).append(str(path.relative_to(ROOT)))
    return found


def test_every_unguarded_import_is_a_runtime_dependency():
    dists = packages_distributions()
    declared = _declared()
    missing = {}
    for module, files in unguarded_third_party_imports().items():
        names = {_norm(d) for d in dists.get(module, [module])}
        if not names & declared:
            missing[module] = sorted(set(files))
    assert not missing, f"imported by the shipped code but not in [project].dependencies: {missing}"


def test_the_check_sees_an_optional_import_as_optional():
    """The guard detection itself: scikit-image is imported only under ``except ImportError``."""
    assert "skimage" not in unguarded_third_party_imports()
    assert "scikit-image" in _declared("domains")


def test_benchmarks_import_without_the_quantizer_library():
    """A lent GPU box holds torch and triton but not vector-quantize-pytorch: the kernel and training-step
    benchmarks (through lvm.runtime -> tokenizer.atomic) must import there, and `tokenizer` still serves
    its names on first use."""
    import subprocess

    code = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'vector_quantize_pytorch':\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import bench.kernels, bench.train_step, bench.segment_attention\n"
        "assert 'tokenizer.model' not in sys.modules\n"
        "import tokenizer\n"
        "assert callable(tokenizer.psnr)\n"
        "try:\n"
        "    tokenizer.Tokenizer\n"
        "except ImportError:\n"
        "    print('lazy ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1],
                         env={"PATH": "", "TRITON_INTERPRET": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy ok"
