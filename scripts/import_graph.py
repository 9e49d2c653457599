"""The package's import graph: circles, wrong-way dependencies, function-local imports, docstring and file sizes.

Reads `moxin/` with `ast` (nothing is imported, so it runs without torch). A circle is a strongly connected
component of the module graph; imports inside functions count as edges too (they still tie the modules
together), and `--top-level` leaves them out. The layering rules below are docs/architecture.md's.

    python scripts/import_graph.py            # report; exit 1 if a circle or a forbidden dependency exists
    python scripts/import_graph.py --json     # the same figures as JSON (for before/after tables)
"""

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path.cwd() if (Path.cwd() / "moxin").is_dir() else Path(__file__).resolve().parents[1]  # the tree run in
PACKAGE = "moxin"

# (importer prefix, imported prefix, why): an importer module starting with the first may not import the second.
FORBIDDEN = [
    ("moxin.config", "moxin.", "moxin.config is a leaf: it imports nothing from moxin outside moxin.config"),
    ("moxin.data", "moxin.losses", "the data layer does not depend on the losses"),
    ("moxin.data", "moxin.rewards", "the data layer does not depend on the verifiers"),
    ("moxin.data", "moxin.stages", "the data layer does not know the stages"),
    ("moxin.model", "moxin.paths", "the model core does not read conf/"),
    ("moxin.model", "moxin.stages", "the model never knows which stage drives it"),
    ("moxin.model", "moxin.data", "the model core has no data code"),
    ("moxin.losses", "moxin.model", "losses are pure tensor functions"),
    ("moxin.losses", "moxin.stages", "losses are pure tensor functions"),
    ("moxin.distributed", "moxin.losses", "parallelism does not depend on the losses"),
    ("moxin.", "moxin.run", "nothing below run.py imports it"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(importer: str, is_package: bool, node: ast.AST, modules: set[str]) -> list[str]:
    """The moxin modules an import statement names (a `from pkg import sub` counts the submodule)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [_closest(name, modules) for name in names if name.split(".")[0] == PACKAGE]
    assert isinstance(node, ast.ImportFrom)
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return []
    found = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        found.append(sub if sub in modules else _closest(target, modules))
    return found


def _closest(name: str, modules: set[str]) -> str:
    while name not in modules and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def scan(top_level_only: bool):
    files = sorted(p for p in (ROOT / PACKAGE).rglob("*.py") if "sample" not in p.relative_to(ROOT).parts[:-1])
    modules = {module_name(p): p for p in files}
    names = set(modules)
    edges: dict[str, set[str]] = defaultdict(set)
    counts = {"top": 0, "local": 0}
    local_by_file: dict[str, int] = defaultdict(int)
    docstrings, lines = {}, {}
    for name, path in modules.items():
        source = path.read_text()
        tree = ast.parse(source)
        lines[name] = source.count("\n") + 1
        doc = ast.get_docstring(tree) or ""
        docstrings[name] = len(doc.split())
        is_package = path.name == "__init__.py"
        local_nodes = set()
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(fn):
                    if isinstance(inner, (ast.Import, ast.ImportFrom)):
                        local_nodes.add(id(inner))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            local = id(node) in local_nodes
            counts["local" if local else "top"] += 1
            if local:
                local_by_file[name] += 1
            if node_is_type_checking(tree, node) or (local and top_level_only):
                continue
            for target in resolve(name, is_package, node, names):
                if target != name and not name.startswith(target + "."):
                    edges[name].add(target)
    return modules, edges, counts, local_by_file, docstrings, lines


def node_is_type_checking(tree: ast.AST, node: ast.AST) -> bool:
    for guard in ast.walk(tree):
        if isinstance(guard, ast.If) and "TYPE_CHECKING" in ast.unparse(guard.test):
            if any(inner is node for inner in ast.walk(guard)):
                return True
    return False


def circles(nodes, edges) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                found.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return sorted(found, key=len, reverse=True)


def forbidden(edges) -> list[str]:
    broken = []
    for importer, targets in sorted(edges.items()):
        for target in sorted(targets):
            for src, dst, why in FORBIDDEN:
                if importer.startswith(src) and (target == dst or target.startswith(dst)):
                    if src == "moxin.config" and target.startswith("moxin.config"):
                        continue
                    if dst == "moxin.run" and target != "moxin.run":
                        continue
                    broken.append(f"{importer} -> {target}: {why}")
    return broken


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--top-level", action="store_true", help="ignore imports inside functions")
    args = parser.parse_args()
    modules, edges, counts, local_by_file, docstrings, lines = scan(args.top_level)
    found = circles(modules, edges)
    broken = forbidden(edges)
    folders: dict[str, int] = defaultdict(int)
    for name, n in lines.items():
        folders[str(modules[name].parent.relative_to(ROOT))] += n
    total_imports = counts["top"] + counts["local"]
    report = {
        "modules": len(modules),
        "circles": found,
        "forbidden": broken,
        "imports": total_imports,
        "function_local_imports": counts["local"],
        "function_local_share": round(counts["local"] / max(total_imports, 1), 3),
        "function_local_by_file": dict(sorted(local_by_file.items(), key=lambda kv: -kv[1])),
        "longest_docstrings_words": dict(sorted(docstrings.items(), key=lambda kv: -kv[1])[:10]),
        "lines_total": sum(lines.values()),
        "lines_by_folder": dict(sorted(folders.items())),
        "longest_files": dict(sorted(lines.items(), key=lambda kv: -kv[1])[:10]),
    }
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['modules']} modules, {report['lines_total']} lines")
        print(f"circles: {len(found)}")
        for component in found:
            print(f"  ({len(component)}) " + " ".join(component))
        print(f"forbidden dependencies: {len(broken)}")
        for line in broken:
            print(f"  {line}")
        print(f"function-local imports: {counts['local']}/{total_imports} ({report['function_local_share']:.1%})")
        for name, n in list(report["function_local_by_file"].items())[:10]:
            print(f"  {n:3d} {name}")
        print("longest module docstrings (words):")
        for name, n in report["longest_docstrings_words"].items():
            print(f"  {n:4d} {name}")
        print("lines by folder:")
        for folder, n in report["lines_by_folder"].items():
            print(f"  {n:6d} {folder}")
    return 1 if found or broken else 0


if __name__ == "__main__":
    sys.exit(main())
