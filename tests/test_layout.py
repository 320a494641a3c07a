"""The repository's shape: the PbPO teaching path stays within its line budget, and every file the code
and docs refer to is in the repository.

    python -m pytest -q -s tests/test_layout.py      # prints the line count of the PbPO path
"""
import ast
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 1650  # about 1,500 readable lines, at most 1,650
GENERATED = {"compare.md", "evil.py"}  # what the harnesses write into their output directories, or a test into its own


def project_imports(module):
    """The top-level project modules `module`.py imports, anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(open(os.path.join(ROOT, module + ".py")).read())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return {n for n in names if os.path.isfile(os.path.join(ROOT, n + ".py"))}


def path_lines(entry="train_pbpo", skip=("toy",)):
    """{module: non-blank lines} for the entry point and every project module it imports,
    transitively, except `skip` (the built-in task is not part of the algorithm)."""
    seen, todo = set(), [entry]
    while todo:
        m = todo.pop()
        if m not in seen and m not in skip:
            seen.add(m)
            todo += project_imports(m)
    return {m: sum(1 for line in open(os.path.join(ROOT, m + ".py")) if line.strip()) for m in seen}


def test_pbpo_path_is_within_the_line_budget():
    lines = path_lines()
    print("\n" + "".join(f"  {m + '.py':<16}{n:>5}\n" for m, n in sorted(lines.items(), key=lambda kv: -kv[1])))
    print(f"train_pbpo.py and what it imports (toy.py apart): {sum(lines.values())} non-blank lines "
          f"(budget {BUDGET})")
    assert {"train_pbpo", "model", "data", "reward", "explore", "run"} <= set(lines)
    assert sum(lines.values()) <= BUDGET, lines


def repo_files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout.split()
    return {f for f in out if os.path.exists(os.path.join(ROOT, f))}


def test_every_referenced_file_is_in_the_repository():
    """Names of .py and .md files in the code and docs resolve inside the repository (relative to the
    root, to the referring file, or as a file name in it); nothing points outside the clone."""
    files = repo_files()
    names = {os.path.basename(f) for f in files}
    outside = re.compile("|".join([r"\.\./" + "shared", r"\bshared/", r"\bthe " + "spec\b", r"\bthe " + "contract\b",
                                   r"\bissue " + r"[0-9]+"]), re.I)
    problems = []
    for f in sorted(files):
        if not f.endswith((".py", ".md")) or f == "tests/test_layout.py":
            continue
        text = open(os.path.join(ROOT, f), encoding="utf-8").read()
        for m in outside.finditer(text):
            problems.append(f"{f}: refers outside the repository: {m.group(0)!r}")
        for ref in set(re.findall(r"[\w./-]*\w\.(?:py|md)\b", text)):
            ref = ref.lstrip("./")
            here = os.path.normpath(os.path.join(os.path.dirname(f), ref))
            known = ref in files or here in files or os.path.basename(ref) in names | GENERATED
            if not known:
                problems.append(f"{f}: refers to {ref}, which the repository does not have")
    assert not problems, "\n".join(problems)
