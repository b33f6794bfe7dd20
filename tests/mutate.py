"""Mutation testing of the method code of algos/*.py: does the suite notice a plausible one-line bug?

For each algorithm file, every mutant is one small edit of its networks, maths, update steps or BatchRenorm code (the
sections that hold the method): an arithmetic or comparison operator flipped, a constant changed, min <-> max,
mean <-> sum, a tanh / clamp / exp / detach dropped, a target network replaced by its online twin, s <-> s', an
optimizer call or an update statement deleted, two adjacent statements swapped, a `no_grad` removed. Logging-only
code (the dicts the step functions return, the diagnostics section) and docstrings are left alone. Each mutant runs
tests/test_<algo>.py in a child forked from one process that has already imported torch, with the script-level tests
(those that launch `algos/<algo>.py`) skipped, and counts as killed when a test fails, errors or times out.

Each child reads tests/test_<algo>.py afresh, so editing it during a run changes the tests mid-run. The `__main__`
block is not mutated (its wiring is covered by script-level and loop tests, which the score does not count).

Mutants that cannot change behaviour are listed with the reason in `EQUIVALENT_MUTANTS` of tests/test_<algo>.py, keyed
by the id this tool prints; the rate is killed / (generated - equivalent), target >= 90 % per file.

    python tests/mutate.py                       # all five files, 2 mutants at a time; report on stdout
    python tests/mutate.py sac qflex --jobs 1    # some files
    python tests/mutate.py sac --list            # the mutants only, run nothing
    python tests/mutate.py sac --only 'soft_q_target'   # mutants whose id contains the text
"""

import argparse
import ast
import os
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ALGOS = ("sac", "qflex", "crossq", "dacer", "sdac")
SECTIONS = {("ALGO LOGIC", "networks"), ("ALGO LOGIC", "maths"), ("ALGO LOGIC", "update steps"),
            ("TRY NOT TO MODIFY", "BatchRenorm")}  # fmt: skip
MARKER = re.compile(r"^\s*# (TRY NOT TO MODIFY|ALGO LOGIC): (.+?)\s*$")
BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.Pow: ast.Mult}
CMP_SWAPS = {ast.Lt: ast.Gt, ast.Gt: ast.Lt, ast.LtE: ast.GtE, ast.GtE: ast.LtE, ast.Eq: ast.NotEq, ast.NotEq: ast.Eq,
             ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}  # fmt: skip
# Attribute swaps (torch.minimum, x.mean, batch.obs); of plain names only builtins and *_target networks are swapped.
ATTRIBUTE_SWAPS = {"minimum": "maximum", "maximum": "minimum", "min": "max", "max": "min", "amin": "amax", "amax": "amin",
                   "mean": "sum", "sum": "mean", "obs": "next_obs", "next_obs": "obs", "zeros_like": "ones_like",
                   "ones_like": "zeros_like", "argmax": "argmin", "argmin": "argmax", "logsumexp": "amax"}  # fmt: skip
NAME_SWAPS = {"min": "max", "max": "min"}
# Calls that a plausible bug drops, keeping their first argument (or, for methods without arguments, their receiver).
DROPPABLE_CALLS = {"tanh", "clamp", "clip", "clamp_", "exp", "log", "sqrt", "softplus", "sigmoid", "relu", "detach",
                   "nan_to_num", "abs", "square", "stop_gradient", "mse_loss", "atanh", "neg", "expand_as"}  # fmt: skip
MODULES = {"torch", "F", "nn", "np", "math"}  # torch.tanh(x) drops to its argument, x.tanh() to its receiver
SMALL_FLOAT = 1e-3  # numerical guards (eps, 1e-6 in a log): changing them is not a plausible bug and rarely observable


def target_ranges(source: str) -> list[tuple[int, int]]:
    """1-based inclusive line ranges of the sections that hold the method."""
    lines = source.splitlines()
    starts = [(i + 1, MARKER.match(line)) for i, line in enumerate(lines) if MARKER.match(line)]
    ends = [i - 1 for i, _ in starts[1:]] + [len(lines)]
    return [(i, end) for (i, m), end in zip(starts, ends, strict=True) if (m.group(1), m.group(2)) in SECTIONS]


class Site:
    """One mutant: replace source lines/columns [start, end) by `text`."""

    def __init__(self, function: str, start: tuple[int, int], end: tuple[int, int], old: str, new: str):
        self.function, self.start, self.end, self.old, self.new = function, start, end, old, new
        self.id = f"{function}: {squash(old)} -> {squash(new)}"

    def apply(self, source: str) -> str:
        return source[: offset(source, self.start)] + self.new + source[offset(source, self.end) :]


def offset(source: str, lineno_col: tuple[int, int]) -> int:
    """Character offset of an AST (line, byte column) position."""
    lineno, col = lineno_col
    lines = source.splitlines(keepends=True)
    if lineno > len(lines):
        return len(source)
    return sum(len(line) for line in lines[: lineno - 1]) + len(lines[lineno - 1].encode()[:col].decode())


def text_between(source: str, start: tuple[int, int], end: tuple[int, int]) -> str:
    return source[offset(source, start) : offset(source, end)]


def squash(text: str, limit: int = 90) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


def statement_text(stmts: list[ast.stmt], indent: str) -> str:
    code = "\n".join(ast.unparse(s) for s in stmts) or "pass"
    return code.replace("\n", "\n" + indent)


def mutants(source: str) -> list[Site]:
    tree = ast.parse(source)
    ranges = target_ranges(source)
    lines = source.splitlines()
    found: list[Site] = []

    def inside(node) -> bool:
        if not hasattr(node, "lineno"):
            return False
        return any(a <= node.lineno and node.end_lineno <= b for a, b in ranges)

    def segment(node) -> str:
        return ast.get_source_segment(source, node)

    def add(function, node, replacement, old=None):
        new = replacement if isinstance(replacement, str) else ast.unparse(replacement)
        old = segment(node) if old is None else old
        if new != old:
            found.append(Site(function, (node.lineno, node.col_offset), (node.end_lineno, node.end_col_offset), old, new))

    def copy_with(node, **changes):
        clone = ast.parse(ast.unparse(node), mode="eval").body if isinstance(node, ast.expr) else None
        for key, value in changes.items():
            setattr(clone, key, value)
        return clone

    def skipped(node, parents) -> bool:
        """Docstrings, logging dicts returned by step functions, and annotations stay as they are."""
        return any(isinstance(p, ast.Dict) for p in parents) or any(isinstance(p, ast.arg) for p in parents)

    def visit(node, function, parents):
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            function = f"{function}.{node.name}" if function else node.name
            for decorator in node.decorator_list:
                if inside(decorator) and "no_grad" in segment(decorator):
                    line = decorator.lineno
                    found.append(Site(function, (line, 0), (line + 1, 0), lines[line - 1] + "\n", ""))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            return  # docstring
        if inside(node) and not skipped(node, parents):
            mutate_node(node, function)
        for field, value in ast.iter_fields(node):
            children = value if isinstance(value, list) else [value]
            if field in ("decorator_list", "returns", "annotation"):
                continue
            for child in children:
                if isinstance(child, ast.AST):
                    visit(child, function, parents + [node])
        for field in ("body", "orelse"):
            body = getattr(node, field, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                mutate_block(body, function)

    def mutate_node(node, function):
        if isinstance(node, ast.BinOp) and type(node.op) in BINOP_SWAPS:
            add(function, node, copy_with(node, op=BINOP_SWAPS[type(node.op)]()))
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.Not):
            add(function, node, segment(node.operand))
        elif isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in CMP_SWAPS:
            add(function, node, copy_with(node, ops=[CMP_SWAPS[type(node.ops[0])]()]))
        elif isinstance(node, ast.BoolOp):
            add(function, node, copy_with(node, op=ast.Or() if isinstance(node.op, ast.And) else ast.And()))
        elif isinstance(node, ast.Constant) and type(node.value) in (int, float, bool):
            value = node.value
            if isinstance(value, bool):
                add(function, node, repr(not value))
            elif isinstance(value, int):
                add(function, node, repr(value + 1))
            elif abs(value) >= SMALL_FLOAT or value == 0:
                add(function, node, repr(value * 2 if value else 1.0))
        elif isinstance(node, ast.Attribute | ast.Name):
            name = node.attr if isinstance(node, ast.Attribute) else node.id
            if isinstance(node.ctx, ast.Load):
                swaps = ATTRIBUTE_SWAPS if isinstance(node, ast.Attribute) else NAME_SWAPS
                swapped = swaps.get(name) or (name.removesuffix("_target") if name.endswith("_target") else None)
                if swapped:
                    new = copy_with(node, **({"attr": swapped} if isinstance(node, ast.Attribute) else {"id": swapped}))
                    add(function, node, new)
        if isinstance(node, ast.Call):
            callee = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if callee in DROPPABLE_CALLS:
                receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
                if receiver is not None and not (isinstance(receiver, ast.Name) and receiver.id in MODULES):
                    add(function, node, segment(receiver))  # x.clamp(-1, 1) -> x, x.detach() -> x
                elif node.args and not isinstance(node.args[0], ast.Starred):
                    add(function, node, segment(node.args[0]))  # torch.tanh(x) -> x

    def mutate_block(body, function):
        for i, stmt in enumerate(body):
            if not inside(stmt):
                continue
            indent = " " * stmt.col_offset
            is_call = isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            if is_call or isinstance(stmt, ast.AugAssign):
                add(function, stmt, "pass")
            if isinstance(stmt, ast.With) and any("no_grad" in segment(item.context_expr) for item in stmt.items):
                add(function, stmt, statement_text(stmt.body, indent))
            if i + 1 < len(body) and inside(body[i + 1]):
                following = body[i + 1]
                if is_call or (isinstance(following, ast.Expr) and isinstance(following.value, ast.Call)):
                    if isinstance(stmt, ast.Expr | ast.Assign | ast.AugAssign) and isinstance(
                        following, ast.Expr | ast.Assign | ast.AugAssign
                    ):
                        old = text_between(source, (stmt.lineno, stmt.col_offset),
                                           (following.end_lineno, following.end_col_offset))  # fmt: skip
                        new = statement_text([following], indent) + "\n" + indent + statement_text([stmt], indent)
                        found.append(Site(function, (stmt.lineno, stmt.col_offset),
                                          (following.end_lineno, following.end_col_offset), old, new))  # fmt: skip

    for top in tree.body:
        visit(top, "", [])
    for site in found:
        site.id = site.id if site.function else "<module>" + site.id
    unique, seen = [], {}
    for site in found:
        seen[site.id] = seen.get(site.id, 0) + 1
        if seen[site.id] > 1:
            site.id += f" #{seen[site.id]}"
        unique.append(site)
    return unique


def equivalent_mutants(algo: str) -> dict[str, str]:
    """`EQUIVALENT_MUTANTS = {id: reason}` of tests/test_<algo>.py, read without importing it."""
    tree = ast.parse((REPO / "tests" / f"test_{algo}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "EQUIVALENT_MUTANTS":
            return ast.literal_eval(node.value)
    return {}


def start_mutant(algo: str, mutated_path: str | None) -> int:
    """Fork a child that runs tests/test_<algo>.py with algos/<algo>.py replaced by `mutated_path`; its pid."""
    pid = os.fork()
    if pid == 0:  # child: quiet pytest run, exit code only
        try:
            if mutated_path:
                os.environ["QFLEX_BENCH_MUTANT"] = f"algos/{algo}.py={mutated_path}"
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1), os.dup2(devnull, 2)
            import pytest

            os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # no xdist workers, no hypothesis import per mutant
            code = pytest.main(["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "-W", "ignore",
                                str(REPO / "tests" / f"test_{algo}.py")])  # fmt: skip
        except BaseException:
            code = 99
        os._exit(int(code))
    return pid


def outcome(pid: int, deadline: float) -> str | None:
    """'survived', 'killed', 'timeout' (the child is killed), or None while it still runs."""
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        return "survived" if os.waitstatus_to_exitcode(status) == 0 else "killed"
    if time.monotonic() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return "timeout"
    return None


def run_mutant(algo: str, mutated_path: str | None, timeout: float) -> str:
    pid, deadline = start_mutant(algo, mutated_path), time.monotonic() + timeout
    while (result := outcome(pid, deadline)) is None:
        time.sleep(0.05)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("algos", nargs="*", metavar="ALGO", help=f"files to mutate: some of {', '.join(ALGOS)} (default all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants at a time (default 2)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per mutant (default: 5x the clean run, >= 30)")
    parser.add_argument("--only", default="", help="run only mutants whose id contains this text")
    parser.add_argument("--list", action="store_true", help="print the mutants and exit")
    args = parser.parse_args()
    if unknown := set(args.algos) - set(ALGOS):
        parser.error(f"unknown algorithm(s) {sorted(unknown)}; choose from {', '.join(ALGOS)}")
    args.algos = args.algos or list(ALGOS)
    os.environ.update({"QFLEX_BENCH_MUTATION": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    sys.path.insert(0, str(REPO))
    import torch  # noqa: F401  imported once here, inherited by every forked child

    torch.set_num_threads(1)
    import importlib.util

    import pytest  # noqa: F401

    weight = torch.zeros(1, requires_grad=True)  # Adam's first step lazily imports torch._dynamo: do it once here
    weight.sum().backward()
    torch.optim.Adam([weight]).step()
    for algo in args.algos:  # import every library the files and their tests use, once, before forking
        spec = importlib.util.spec_from_file_location(f"{algo}_preloaded", REPO / "algos" / f"{algo}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)

    totals = []
    for algo in args.algos:
        source = (REPO / "algos" / f"{algo}.py").read_text()
        every_site = mutants(source)
        sites = [s for s in every_site if args.only in s.id]
        equivalent = equivalent_mutants(algo)
        if args.list:
            for site in sites:
                print(f"{algo}  {site.id}" + ("   [equivalent]" if site.id in equivalent else ""))
            continue
        began = time.monotonic()
        if run_mutant(algo, None, 600) != "survived":
            print(f"{algo}: tests/test_{algo}.py fails on the unmutated file; fix that first")
            return 1
        timeout = args.timeout or max(30.0, 5 * (time.monotonic() - began))
        scratch = Path(tempfile.mkdtemp(prefix=f"mutants_{algo}_"))
        results: dict[str, str] = {}
        pending, running = list(enumerate(sites)), {}
        while pending or running:
            while pending and len(running) < args.jobs:
                index, site = pending.pop(0)
                path = scratch / f"{algo}_{index}.py"
                path.write_text(site.apply(source))
                running[start_mutant(algo, str(path))] = (site, time.monotonic() + timeout)
            for pid, (site, deadline) in list(running.items()):
                if (result := outcome(pid, deadline)) is not None:
                    results[site.id] = result
                    del running[pid]
            time.sleep(0.05)
        survived = [s for s in sites if results[s.id] == "survived" and s.id not in equivalent]
        equivalents = [s for s in sites if s.id in equivalent]
        killed = [s for s in sites if results[s.id] in ("killed", "timeout") and s.id not in equivalent]
        stale = sorted(set(equivalent) - {s.id for s in every_site})
        rate = len(killed) / max(1, len(sites) - len(equivalents))
        totals.append((algo, len(sites), len(killed), len(equivalents), len(survived), rate))
        print(f"\n{algo}: {len(sites)} mutants, {len(killed)} killed, {len(equivalents)} equivalent, "
              f"{len(survived)} surviving: {100 * rate:.1f} % killed ({time.monotonic() - began:.0f} s)")  # fmt: skip
        for site in survived:
            print(f"  SURVIVED  {site.id}   (line {site.start[0]})")
        for site in equivalents:
            if results[site.id] != "survived":
                print(f"  KILLED BUT LISTED AS EQUIVALENT  {site.id}")
        for key in stale:
            print(f"  STALE EQUIVALENT ENTRY (no such mutant)  {key}")
        sys.stdout.flush()
    if totals:
        print("\n| file | mutants | killed | equivalent | surviving | killed / non-equivalent |\n|---|---|---|---|---|---|")
        for algo, n, k, e, s, rate in totals:
            print(f"| algos/{algo}.py | {n} | {k} | {e} | {s} | {100 * rate:.1f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
