"""Mutation testing of a module's checks: does some test fail when a check is changed?

Each mutant changes one check of the module: a comparison operator (== and !=, < and <=,
in and not in, is and is not), an ``and`` for an ``or``, a condition for its negation (``if``,
``elif``, ``while``, conditional expressions and comprehension filters), or a ``raise``
for ``pass``. Every mutant is written into a scratch copy of the tree (never into the tree
itself), the given tests run against the copy, and a mutant that they all pass is reported
as surviving: either a test is missing or the mutant does not change what the code does.

    .venv/bin/python tools/mutate_checks.py configserver/images.py \\
        --tests tests/unit/test_api.py tests/unit/test_tftp_files.py

``--list`` shows the mutants without running them, ``--only N ...`` runs some of them and
``--show N`` prints one as a diff.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("configserver", "nodeagent", "tests", "images", "elements", "systemd", "bench",
          "pyproject.toml")

_SWAP = {
    ast.Eq: ast.NotEq, ast.NotEq: ast.Eq, ast.Lt: ast.LtE, ast.LtE: ast.Lt,
    ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.In: ast.NotIn, ast.NotIn: ast.In,
    ast.Is: ast.IsNot, ast.IsNot: ast.Is,
}
_SYMBOL = {
    ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=",
    ast.In: "in", ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not",
}
# A condition that is one of these comparisons is already inverted by swapping its operator.
_INVERTING = (ast.Eq, ast.NotEq, ast.In, ast.NotIn, ast.Is, ast.IsNot)


@dataclass(frozen=True)
class Mutant:
    number: int
    line: int
    description: str
    start: int  # byte offsets of the replaced text in the source
    end: int
    replacement: str

    def apply(self, source: bytes) -> bytes:
        return source[:self.start] + self.replacement.encode() + source[self.end:]


def mutants(source: bytes) -> list[Mutant]:
    tree = ast.parse(source)
    line_starts = [0]
    for line in source.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def span(node: ast.AST) -> tuple[int, int]:
        return (line_starts[node.lineno - 1] + node.col_offset,
                line_starts[node.end_lineno - 1] + node.end_col_offset)

    def text(node: ast.AST) -> str:
        start, end = span(node)
        return source[start:end].decode()

    found: list[tuple[int, int, str, ast.AST, str]] = []

    def negate(test: ast.expr, where: str) -> None:
        if isinstance(test, ast.Compare) and len(test.ops) == 1 and \
                isinstance(test.ops[0], _INVERTING):
            return
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            found.append((test.lineno, test.col_offset, f"{where}: drop the 'not'", test,
                          f"({text(test.operand)})"))
        else:
            found.append((test.lineno, test.col_offset, f"{where}: negated", test,
                          f"not ({text(test)})"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            for i, op in enumerate(node.ops):
                swapped = ast.Compare(node.left, list(node.ops), node.comparators)
                swapped.ops[i] = _SWAP[type(op)]()
                found.append((node.lineno, node.col_offset,
                              f"{_SYMBOL[type(op)]} -> {_SYMBOL[_SWAP[type(op)]]}", node,
                              f"({ast.unparse(swapped)})"))
        elif isinstance(node, ast.BoolOp):
            other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
            found.append((node.lineno, node.col_offset,
                          "and -> or" if isinstance(node.op, ast.And) else "or -> and", node,
                          f"({ast.unparse(ast.BoolOp(other, node.values))})"))
        elif isinstance(node, ast.If | ast.While):
            negate(node.test, type(node).__name__.lower())
        elif isinstance(node, ast.IfExp):
            negate(node.test, "conditional expression")
        elif isinstance(node, ast.comprehension):
            for condition in node.ifs:
                negate(condition, "comprehension filter")
        elif isinstance(node, ast.Raise):
            found.append((node.lineno, node.col_offset, "raise -> pass", node, "pass"))

    result = []
    for number, (line, _, description, node, replacement) in enumerate(
            sorted(found, key=lambda f: (f[0], f[1], f[2])), start=1):
        start, end = span(node)
        mutant = Mutant(number, line, description, start, end, replacement)
        ast.parse(mutant.apply(source))  # every mutant must still be valid Python
        result.append(mutant)
    return result


def run_tests(copy: Path, tests: list[str], timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
               "-m", "not integration and not netns and not vm and not browser", *tests]
    try:
        done = subprocess.run(command, cwd=copy, env=env, capture_output=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    if done.returncode == 0:
        return "SURVIVED"
    if done.returncode == 1:
        return "killed"
    return f"error (pytest exit {done.returncode})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("module", help="the module to mutate, e.g. configserver/images.py")
    parser.add_argument("--tests", nargs="+", default=["tests/unit"],
                        help="test files or directories to run against each mutant")
    parser.add_argument("--only", nargs="+", type=int, help="run only these mutants")
    parser.add_argument("--list", action="store_true", help="list the mutants and stop")
    parser.add_argument("--show", type=int, help="print one mutant as a diff and stop")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds before a test run counts as killing its mutant")
    args = parser.parse_args(argv)
    # Stopped from outside, still remove the scratch copy.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    module = Path(args.module)
    source = (ROOT / module).read_bytes()
    found = mutants(source)
    if args.show is not None:
        mutant = found[args.show - 1]
        sys.stdout.writelines(difflib.unified_diff(
            source.decode().splitlines(keepends=True),
            mutant.apply(source).decode().splitlines(keepends=True),
            f"a/{module}", f"b/{module}"))
        return 0
    if args.list:
        for mutant in found:
            print(f"{mutant.number:4d}  {module}:{mutant.line}  {mutant.description}")
        return 0
    selected = [m for m in found if not args.only or m.number in args.only]

    with tempfile.TemporaryDirectory(prefix="mutants-") as scratch:
        copy = Path(scratch)
        for name in COPIED:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, copy / name,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif (ROOT / name).exists():
                shutil.copy2(ROOT / name, copy / name)
        baseline = run_tests(copy, args.tests, args.timeout)
        if baseline != "SURVIVED":
            print(f"the tests do not pass on the unchanged tree ({baseline})", file=sys.stderr)
            return 2
        target = copy / module
        survived = 0
        for mutant in selected:
            started = time.monotonic()
            target.write_bytes(mutant.apply(source))
            try:
                outcome = run_tests(copy, args.tests, args.timeout)
            finally:
                target.write_bytes(source)
            survived += outcome == "SURVIVED"
            print(f"{mutant.number:4d}  {module}:{mutant.line}  {mutant.description:<40} "
                  f"{outcome} ({time.monotonic() - started:.1f} s)", flush=True)
    print(f"{module}: {len(selected)} mutants, {survived} survived")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
