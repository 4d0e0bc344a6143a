"""The package's layers: imports flow one way, and ``from gpt2lora import *`` works."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2lora"

#: Each layer may import the layers it lists (and itself). ``base`` is errors, config, devices, constants.
ALLOWED: dict[str, set[str]] = {
    "base": set(),
    "ops": {"base"},
    "model": {"ops", "base"},
    "peft": {"model", "ops", "base"},
    "data": {"model", "base"},
    "training": {"peft", "data", "model", "ops", "base"},
    "app": {"training", "peft", "data", "model", "ops", "base"},
    "root": {"app", "training", "peft", "data", "model", "ops", "base"},
}


def layer_of(module: str) -> str:
    """``gpt2lora.peft.lora`` -> ``peft``; a top-level module other than the package's ``__init__`` is ``base``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if parts[1] in ALLOWED and parts[1] not in ("base", "root"):
        return parts[1]
    return "base"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every gpt2lora module ``path`` imports, function-level imports included, as (line, dotted name)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                   and ast.unparse(block.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                   for n in ast.walk(block)}  # imports for annotations only never run
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "gpt2lora"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "gpt2lora":
                continue
            if node.module is None or target.count(".") == 1 and layer_of(target) != "base":
                # `from . import x` / `from gpt2lora.peft import lora`: the names are modules
                found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, target))
    return found


def all_modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_imports_flow_down_the_layers():
    wrong = []
    for path in all_modules():
        source = layer_of(module_name(path))
        for line, target in imported_modules(path):
            dest = layer_of(target)
            if dest != source and dest not in ALLOWED[source]:
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({source}) imports {target} ({dest})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycles():
    modules = {module_name(p): p for p in all_modules()}
    # a package's __init__ re-exporting its own modules is not a cycle worth reporting
    graph = {name: {t for _, t in imported_modules(p) if t in modules and t != name
                    and not (p.name == "__init__.py" and t.startswith(name))}
             for name, p in modules.items()}
    visiting, done, cycles = set(), set(), []

    def visit(node: str, trail: list[str]) -> None:
        visiting.add(node)
        for nxt in sorted(graph[node]):
            if nxt in visiting:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else nxt)
            elif nxt not in done:
                visit(nxt, [*trail, nxt])
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layers_are_subpackages():
    top = {p.stem for p in PACKAGE.glob("*.py")}
    assert top <= {"__init__", "__main__", "errors", "config", "devices", "constants"}, top
    for layer in ("ops", "model", "peft", "data", "training", "app"):
        assert (PACKAGE / layer / "__init__.py").is_file(), layer


def test_star_import_gives_every_public_name():
    namespace: dict = {}
    exec("from gpt2lora import *", namespace)  # noqa: S102 - the statement under test
    import gpt2lora

    assert set(gpt2lora.__all__) <= set(namespace)
    for name in ("GPT2", "GPT2ForSequenceClassification", "LoRAConfig", "apply_lora", "Trainer", "TrainConfig",
                 "save_adapter", "load_adapter", "merge_lora", "unmerge_lora", "save_pretrained",
                 "load_tokenizer", "generate", "RunConfig", "run", "AdapterDiagnostics"):
        assert name in namespace, name
