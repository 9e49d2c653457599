"""Mutation testing of the code whose bugs silently change training: mutmut, one group of modules at a time.

Each group in ``[tool.moxin.mutation.<group>]`` of pyproject.toml names the files to mutate, the functions in them
(``*`` for all; ``Class.method`` or ``function``) and the test files (or node ids) that guard them. A group runs in
its own scratch folder (``build/mutation/<group>``: a copy of moxin/, tests/, conf/ and a pyproject.toml whose
``[tool.mutmut]`` is the project's with the group's files and tests), so its stats pass and its mutants see only
the group's tests; inside that selection mutmut runs, for each mutant, only the tests that executed the mutated
function, fastest first, stopping at the first failure. A rerun with unchanged sources resumes where the last
one stopped (mutmut keeps each mutant's result); changed sources start the group afresh.

Prints killed / survived / total per module (survived counts "no tests" and timeouts apart) and writes the
surviving mutants' diffs to ``build/mutation/<group>/survivors.diff``. See docs/mutation.md.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPIED = ("moxin", "tests", "conf", "notebooks")  # what the tests read from a checkout (those present are copied)
MUTMUT = Path(sys.executable).with_name("mutmut")

# mutmut's exit-code classes (mutmut.stats.status_by_exit_code), folded into the columns printed here
STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 36: "timeout", -24: "timeout",
          24: "timeout", 152: "timeout", 255: "timeout", 34: "skipped", None: "not run"}


def load_groups(pyproject: Path) -> tuple[dict, dict, dict]:
    """The project's ``[tool.mutmut]``, ``[tool.pytest.ini_options]`` and ``[tool.moxin.mutation]`` tables."""
    data = tomllib.loads(pyproject.read_text())
    tool = data.get("tool", {})
    groups = tool.get("moxin", {}).get("mutation", {})
    if not groups:
        raise SystemExit(f"{pyproject}: no [tool.moxin.mutation.<group>] tables; add one per group of modules "
                         "(files, functions, tests)")
    for name, g in groups.items():
        missing = [k for k in ("files", "functions", "tests") if k not in g]
        if missing:
            raise SystemExit(f"{pyproject}: [tool.moxin.mutation.{name}] lacks {', '.join(missing)}")
    return tool.get("mutmut", {}), tool.get("pytest", {}).get("ini_options", {}), groups


def module_of(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def mutant_globs(group: dict) -> list[tuple[str, str]]:
    """(glob given to ``mutmut run``, exact regex of the mutant names it stands for) per selected function.

    mutmut names mutants ``<module>.x_<function>__mutmut_<n>`` and ``<module>.xǁ<Class>ǁ<method>__mutmut_<n>``.
    The glob ends at the function name so that mutmut also narrows its clean-test run to the tests of these
    functions; the regex keeps the report exact where one function's name is a prefix of another's."""
    out = []
    for path in group["files"]:
        mod = module_of(path)
        for fn in group["functions"].get(path, ["*"]) if isinstance(group["functions"], dict) else group["functions"]:
            if fn == "*":
                out.append((f"{mod}.*", rf"^{re.escape(mod)}\.x.*__mutmut_\d+$"))
                continue
            cls, _, meth = fn.rpartition(".")
            mangled = f"xǁ{cls}ǁ{meth}" if cls else f"x_{meth}"
            out.append((f"{mod}.{mangled}*", rf"^{re.escape(mod)}\.{re.escape(mangled)}__mutmut_\d+$"))
    return out


def toml_value(v) -> str:
    """A TOML literal for the strings, numbers, booleans and lists of them that these tables hold."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def sources_hash(root: Path) -> str:
    h = hashlib.sha256()
    for top in COPIED:
        for p in sorted((root / top).rglob("*")) if (root / top).is_dir() else []:
            if p.is_file() and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def present_tests(root: Path, group: dict) -> list[str]:
    """The group's tests that exist in this checkout: one mapping serves a checkout from before a test file was
    added (its BEFORE score) and one from after."""
    return [t for t in group["tests"] if t.startswith("-") or (root / t.split("::")[0]).is_file()]


def prepare(root: Path, work: Path, base: dict, pytest_ini: dict, group: dict, debug: bool = False) -> bool:
    """Lay out the group's scratch folder; True when a previous run with the same sources can be resumed."""
    tests = present_tests(root, group)
    also = list(base.get("also_copy", [])) + [d for d in COPIED[2:] if (root / d).is_dir()]
    cfg = dict(base) | {"only_mutate": list(group["files"]), "pytest_add_cli_args_test_selection": tests,
                        "also_copy": sorted(set(also))}
    if debug:
        cfg["debug"] = True
    digest = sources_hash(root) + " " + hashlib.sha256(json.dumps([cfg, pytest_ini]).encode()).hexdigest()
    stamp = work / "sources.sha256"
    # a generation cut off half-way leaves an empty or unrecorded mutated file, which mutmut would take as done
    complete = all((work / "mutants" / f).is_file() and (work / "mutants" / f).stat().st_size > 0
                   and (work / "mutants" / f"{f}.meta").is_file() for f in group["files"])
    if stamp.is_file() and stamp.read_text() == digest and complete:
        return True
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for top in COPIED:
        if (root / top).is_dir():
            shutil.copytree(root / top, work / top, ignore=shutil.ignore_patterns("__pycache__"))
    lines = ["[tool.mutmut]"] + [f"{k} = {toml_value(v)}" for k, v in cfg.items()]
    lines += ["", "[tool.pytest.ini_options]"] + [f"{k} = {toml_value(v)}" for k, v in pytest_ini.items()]
    (work / "pyproject.toml").write_text("\n".join(lines) + "\n")
    stamp.write_text(digest)
    return False


def mutmut_env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MUTANT_UNDER_TEST")}
    # subprocesses a test starts (python -m moxin.run, torchrun) import the mutated copy too. The folder must exist
    # before mutmut starts: Python caches "no finder" for a path entry that is missing at start-up, and pytest
    # would then not find the `tests` package there.
    (work / "mutants").mkdir(exist_ok=True)
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(work / "mutants")}


def generate(work: Path) -> None:
    """Write the mutants (mutmut's own first step of `run`, alone), so that they can be listed and sampled."""
    code = ("from mutmut.__main__ import copy_src_dir, copy_also_copy_files, create_mutants\n"
            "copy_src_dir(); copy_also_copy_files(); create_mutants(1)\n")
    with open(work / "run.log", "ab") as log:
        subprocess.run([sys.executable, "-c", code], cwd=work, env=mutmut_env(work), stdout=log,
                       stderr=subprocess.STDOUT, check=True)


def in_sample(name: str, sample: int) -> bool:
    """One mutant in `sample`, chosen by a hash of its name: the same mutants in every run and on every checkout
    where the function is unchanged."""
    return sample <= 1 or int(hashlib.sha1(name.encode()).hexdigest(), 16) % sample == 0


def run_group(work: Path, names: list[str], max_children: int) -> int:
    with open(work / "run.log", "ab") as log:
        return subprocess.run([str(MUTMUT), "run", "--max-children", str(max_children), *names], cwd=work,
                              env=mutmut_env(work), stdout=log, stderr=subprocess.STDOUT).returncode


def results(work: Path, group: dict, regexes: list[str], sample: int) -> dict[str, dict[str, str]]:
    """{file: {mutant name: status}} for the group's selected (and sampled) mutants, from mutmut's .meta records."""
    out = {}
    pats = [re.compile(r) for r in regexes]
    for path in group["files"]:
        meta = work / "mutants" / f"{path}.meta"
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.is_file() else {}
        out[path] = {k: STATUS.get(v, "suspicious") for k, v in sorted(codes.items())
                     if any(p.match(k) for p in pats) and in_sample(k, sample)}
    return out


def write_survivors(work: Path, names: list[str]) -> None:
    """The diff of each surviving mutant, for triage (mutmut's own `show`, in one process)."""
    code = ("import sys, json\nfrom mutmut.mutation.diff_apply import get_diff_for_mutant\n"
            "for n in json.load(sys.stdin):\n    print(f'# {n}')\n    print(get_diff_for_mutant(n))\n    print()\n")
    with open(work / "survivors.diff", "w") as f:
        subprocess.run([sys.executable, "-c", code], cwd=work, input=json.dumps(names), text=True, stdout=f,
                       stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("groups", nargs="*", help="groups to run (default: all in pyproject.toml)")
    ap.add_argument("--root", type=Path, default=ROOT, help="checkout to test (default: this one)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: ROOT/build/mutation)")
    ap.add_argument("--max-children", type=int, default=1, help="parallel mutants (default 1)")
    ap.add_argument("--debug", action="store_true", help="mutmut's debug output (the pytest commands) in run.log")
    ap.add_argument("--sample", type=int, default=0, help="run 1 mutant in N (default: each group's `sample`)")
    ap.add_argument("--report", action="store_true", help="only print the results of the last run")
    ap.add_argument("--json", type=Path, help="also write the per-module counts here")
    a = ap.parse_args()
    root = a.root.resolve()
    base, pytest_ini, groups = load_groups(root / "pyproject.toml")
    unknown = [g for g in a.groups if g not in groups]
    if unknown:
        raise SystemExit(f"unknown group(s) {unknown}; pyproject.toml has {sorted(groups)}")
    work_root = (a.work or root / "build" / "mutation").resolve()
    table, failed = {}, []
    for name in a.groups or list(groups):
        g, work = groups[name], work_root / name
        pairs = mutant_globs(g)
        sample = a.sample or int(g.get("sample", 1))
        if not a.report:
            resumed = prepare(root, work, base, pytest_ini, g, a.debug)
            generate(work)
            todo = [k for r in results(work, g, [r for _, r in pairs], sample).values() for k, s in r.items()
                    if s == "not run"]
            missing = sorted(set(g["tests"]) - set(present_tests(root, g)))
            if missing:
                print(f"[{name}] not in this checkout, left out: {', '.join(missing)}", flush=True)
            print(f"[{name}] {'resuming' if resumed else 'fresh'} run in {work}: {len(todo)} mutants to run, "
                  f"1 in {sample} sampled (log: {work / 'run.log'})", flush=True)
            rc = run_group(work, todo, a.max_children) if todo else 0
            if rc != 0:
                failed.append(name)
                print(f"[{name}] mutmut exited {rc}: see {work / 'run.log'} (a test failing on the unmutated code "
                      "stops the stats pass)", flush=True)
        res = results(work, g, [r for _, r in pairs], sample)
        survivors = [k for r in res.values() for k, s in r.items() if s in ("survived", "no tests")]
        if any(res.values()):
            write_survivors(work, survivors)
        for path, r in res.items():
            table[f"{name}:{path}"] = Counter(r.values())
    cols = ("killed", "survived", "no tests", "timeout", "suspicious", "not run")
    print(f"\n{'group:module':58} " + " ".join(f"{c:>10}" for c in cols) + f" {'total':>6} {'score':>6}")
    total = Counter()
    for key, c in table.items():
        total.update(c)
        n = sum(c.values())
        score = f"{100 * c['killed'] / n:5.1f}%" if n else "    -"
        print(f"{key:58} " + " ".join(f"{c[k]:>10}" for k in cols) + f" {n:>6} {score:>6}")
    n = sum(total.values())
    print(f"{'all':58} " + " ".join(f"{total[k]:>10}" for k in cols) + f" {n:>6} "
          + (f"{100 * total['killed'] / n:5.1f}%" if n else "-"))
    if a.json:
        a.json.write_text(json.dumps({k: dict(v) for k, v in table.items()}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
