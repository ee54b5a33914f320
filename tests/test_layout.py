"""The layout shows the architecture (README, "Where each part of the paper lives"): the design's files at the top,
everything else in folders named for their role, in layers that import only downwards, with no import circle, and
every file and function short enough to read in a sitting (issue 32)."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# from the bottom up; a module may import its own layer's and the layers below
LAYERS = [("model", ["model", "sd_unet", "clip_text", "vae"]), ("data", ["data"]), ("methods", ["selora", "methods"]),
          ("fast", ["fast"]), ("metrics", ["metrics"]), ("training", ["training"]),
          ("commands", ["train", "eval_fid", "sample", "reproduce", "evaluation"])]
TOP = {"selora.py", "sd_unet.py", "clip_text.py", "vae.py", "train.py", "eval_fid.py", "sample.py", "reproduce.py"}
MAX_FILE, MAX_FUNCTION = 450, 70


def library() -> dict[str, Path]:
    """{module name: file} of the library: the top level's modules and those of its folders (not tests, bench,
    tools)."""
    files = [*ROOT.glob("*.py"), *(p for p in ROOT.glob("*/*.py") if p.parent.name in dict(LAYERS_BY_ROOT))]
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in files}


LAYERS_BY_ROOT = [(root, i) for i, (_, roots) in enumerate(LAYERS) for root in roots]


def layer(module: str) -> int:
    return dict(LAYERS_BY_ROOT)[module.split(".")[0]]


def imports(path: Path, modules: set[str]) -> set[str]:
    """The library modules that `path` imports, at any depth of its code (lazy imports too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
    return {m for m in found if m in modules and not m.endswith("__init__")} - {
        m for m in found if m in modules and (ROOT / m.replace(".", "/")).is_dir()}


def graph() -> dict[str, set[str]]:
    modules = library()
    return {name: imports(path, set(modules)) for name, path in modules.items()}


def test_the_top_level_holds_the_design_and_the_commands():
    assert {p.name for p in ROOT.glob("*.py")} == TOP


def test_every_module_imports_only_its_own_layer_and_those_below():
    upward = [(m, i) for m, imported in graph().items() for i in imported if layer(i) > layer(m)]
    assert not upward, f"imports from a higher layer: {upward}"


def test_no_import_circle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(edges[module]):
            assert state.get(other) != 1, f"import circle: {' -> '.join(path + [module, other])}"
            if other not in state:
                visit(other, path + [module])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [])


def test_files_and_functions_fit_in_a_sitting():
    long_files, long_functions = [], []
    for path in [*ROOT.glob("*.py"), *ROOT.glob("*/*.py")]:
        if path.relative_to(ROOT).parts[0].startswith("."):
            continue
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_FILE:
            long_files.append(path.relative_to(ROOT).as_posix())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= MAX_FUNCTION:
                long_functions.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.name}")
    assert not long_files, f"over {MAX_FILE} lines: {long_files}"
    assert not long_functions, f"over {MAX_FUNCTION} lines: {long_functions}"
