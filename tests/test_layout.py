"""The repository's shape: the PbPO teaching path stays within its line budget and reads one
statement a line, project files import one another without a circle, and every file the code and
docs refer to is in the repository.

    python -m pytest -q -s tests/test_layout.py      # prints the line count of the PbPO path
"""
import ast
import glob
import io
import os
import re
import subprocess
import tokenize

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUDGET = 1650  # about 1,500 readable lines, at most 1,650
WIDTH = 100  # characters a line
# what the harnesses write into their output directories, or a test into its own
GENERATED = {"compare.md", "evil.py"}


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
    return {m: sum(1 for line in open(os.path.join(ROOT, m + ".py")) if line.strip())
            for m in seen}


def test_pbpo_path_is_within_the_line_budget():
    lines = path_lines()
    by_size = sorted(lines.items(), key=lambda kv: -kv[1])
    print("\n" + "".join(f"  {m + '.py':<16}{n:>5}\n" for m, n in by_size))
    print(f"train_pbpo.py and what it imports (toy.py apart): {sum(lines.values())} non-blank "
          f"lines (budget {BUDGET})")
    assert {"train_pbpo", "model", "data", "reward", "explore", "run"} <= set(lines)
    assert sum(lines.values()) <= BUDGET, lines


def node_kind(node):
    return "Constant" if isinstance(node, ast.Constant) else type(node).__name__


def crammed_statements(tree):
    """(line, what) for each statement written densely to save a line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Tuple):
            targets_a_tuple = any(isinstance(t, ast.Tuple) for t in node.targets)
            if targets_a_tuple and len({node_kind(e) for e in node.value.elts}) > 1:
                found.append((node.lineno, "tuple assignment of values of different kinds"))
        elif isinstance(node, ast.Expr) and isinstance(node.value, (ast.BoolOp, ast.IfExp)):
            found.append((node.lineno, f"{type(node.value).__name__} as a statement"))
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            if isinstance(node.iter, ast.IfExp):
                found.append((node.iter.lineno, "iterates over a conditional expression"))
    return found


def backslash_continuations(source):
    """Lines that end in a backslash outside a string: the tokenizer joins them to the next line
    without a token of its own, where brackets give an NL token and statements a NEWLINE."""
    ends_of_line = {tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT, tokenize.INDENT,
                    tokenize.DEDENT, tokenize.ENCODING}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    return [a.end[0] for a, b in zip(tokens, tokens[1:])
            if a.type not in ends_of_line and b.start[0] > a.end[0]]


def test_pbpo_path_has_no_crammed_line():
    """One statement a line on the PbPO path (toy.py apart): no tuple assignment of unrelated
    values (`micro, temp = ids.split(b), cfg.temperature`), no `a and f()` or conditional
    expression as a statement, no loop over `xs if c else ()`, no backslash continuation, no line
    over 100 characters."""
    problems = []
    for module in sorted(path_lines()):
        name = module + ".py"
        source = open(os.path.join(ROOT, name), encoding="utf-8").read()
        found = crammed_statements(ast.parse(source))
        found += [(n, "backslash continuation") for n in backslash_continuations(source)]
        found += [(n, f"{len(line)} characters") for n, line in enumerate(source.splitlines(), 1)
                  if len(line) > WIDTH]
        problems += [f"{name}:{n}: {what}" for n, what in sorted(found)]
    print("\n" + "\n".join(problems))
    assert not problems, f"{len(problems)} crammed lines on the PbPO path"


def module_imports(path, module, modules):
    """The project modules (dotted names, as in `modules`) that the file imports, anywhere in it."""
    package = module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative to the file's package: `from . import tune`
                base = ".".join(p for p in [package, base] if p)
            names.add(base)
            names |= {f"{base}.{a.name}" if base else a.name for a in node.names}
    found = set()
    for name in names:
        parts = name.split(".")
        # `import experiments.tune.x` names experiments.tune; `import a.b` also a when a is ours
        found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(modules)
    return found - {module}


def import_circles():
    """Every circle of imports among the project's .py files, top level and experiments/: each
    as the modules along it, starting and ending at the same one."""
    paths = [*glob.glob(os.path.join(ROOT, "*.py")),
             *glob.glob(os.path.join(ROOT, "experiments", "*.py"))]
    modules = {}
    for path in paths:
        module = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
        modules[module.removesuffix(".__init__")] = path
    graph = {m: module_imports(p, m, modules) for m, p in modules.items()}
    circles = set()

    def visit(module, stack):
        for imported in sorted(graph[module]):
            if imported in stack:
                circle = stack[stack.index(imported):]
                first = circle.index(min(circle))  # one spelling per circle, whoever it starts at
                circles.add(tuple(circle[first:] + circle[:first]))
            else:
                visit(imported, stack + [imported])

    for module in sorted(graph):
        visit(module, [module])
    return [" -> ".join(c + (c[0],)) for c in sorted(circles)]


def test_project_files_import_one_another_without_a_circle():
    """A file that imports, directly or through others, a file that imports it can only be read
    (and loaded) with the other in mind: concepts lean one way."""
    circles = import_circles()
    print("\n" + "\n".join(circles))
    assert not circles, circles


def repo_files():
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    out = subprocess.run(listed, cwd=ROOT, capture_output=True, text=True, check=True)
    return {f for f in out.stdout.split() if os.path.exists(os.path.join(ROOT, f))}


def test_every_referenced_file_is_in_the_repository():
    """Names of .py and .md files in the code and docs resolve inside the repository (relative to
    the root, to the referring file, or as a file name in it); nothing points outside the clone."""
    files = repo_files()
    names = {os.path.basename(f) for f in files}
    outside = re.compile("|".join([r"\.\./" + "shared", r"\bshared/", r"\bthe " + r"spec\b",
                                   r"\bthe " + r"contract\b", r"\bissue " + r"[0-9]+"]), re.I)
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
