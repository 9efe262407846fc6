"""The package's imports flow one way: front ends -> training and generation -> LoRA files and run folders ->
bases, data and settings. Read from the source (every import, also those inside functions)."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "sdlora"
# Each home's layer; a module may import its own layer or lower ones. The built-in base's build (tinybase)
# stands apart: it imports nothing of the rest, so the product never depends on how the toy base was made.
LAYERS = {"version": 0, "config": 0, "setting": 0, "safefiles": 0, "bases": 0, "data": 0, "tinybase": 0,
          "loras": 1, "runs": 1,
          "generate": 2,
          "training": 3,
          "cli": 4, "webui": 4}


def home(module: str) -> str:
    """'sdlora.loras.check' -> 'loras'; 'sdlora' itself (the public API) -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports_of(path: Path) -> set[str]:
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("sdlora")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdlora"):
            out |= {node.module if node.module != "sdlora" else f"sdlora.{a.name}" for a in node.names}
    return out


def test_imports_flow_one_way():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name in ("sdlora.__init__", "sdlora.__main__"):
            continue
        mine = home(name)
        assert mine in LAYERS, f"{name}: a new home; give it a layer in LAYERS"
        for imported in imports_of(path) - {""}:
            theirs = home(imported)
            if theirs and theirs != mine and LAYERS[theirs] > LAYERS[mine]:
                wrong.append(f"{name} imports {imported} ({mine} is below {theirs})")
            if mine == "tinybase" and theirs not in ("tinybase", ""):
                wrong.append(f"{name} imports {imported}: the built-in base's build stands apart")
    assert not wrong, "\n".join(wrong)


def test_the_documented_public_api_still_imports():
    import sdlora
    for name in ("DataConfig", "LoraSpec", "TrainConfig", "GenerateConfig", "Generator", "LoraChoice", "train"):
        assert name in sdlora.__all__ and getattr(sdlora, name) is not None, name
    assert callable(sdlora.train) and sdlora.train.__module__ == "sdlora.training.loop"
