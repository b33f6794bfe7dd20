"""The five algorithm files share one skeleton: the same sections in the same order, byte-identical plumbing, short
headers, imports limited to envs/ and the allowed libraries, and docs whose equation -> code map names real code."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALGOS = ("sac", "qflex", "crossq", "dacer", "sdac")
MARKER = re.compile(r"^\s*# (TRY NOT TO MODIFY|ALGO LOGIC): (.+?)\s*$")
ALLOWED_IMPORTS = {"envs", "torch", "numpy", "gymnasium", "tyro", "tqdm", "json", "math", "os", "random", "sys", "time",
                   "copy", "dataclasses", "typing", "functools", "wandb", "zlib", "warnings"}  # fmt: skip
# Sections every file has, in this order (a file may add sections of its own between them).
REQUIRED_SECTIONS = [
    ("TRY NOT TO MODIFY", "common arguments"),
    ("ALGO LOGIC", "algorithm specific arguments"),
    ("ALGO LOGIC", "networks"),
    ("ALGO LOGIC", "maths"),
    ("ALGO LOGIC", "update steps"),
    ("TRY NOT TO MODIFY", "run plumbing"),
    ("TRY NOT TO MODIFY", "arguments, resume, seeding and env setup; nothing is written before all of them succeed"),
    ("ALGO LOGIC", "initialize agent here"),
    ("TRY NOT TO MODIFY", "run directory, checkpoints and resume"),
    ("TRY NOT TO MODIFY", "start the game"),
    ("TRY NOT TO MODIFY", "record rewards for plotting purposes"),
    ("TRY NOT TO MODIFY", "save data to replay buffer; handle `final_obs`"),
    ("TRY NOT TO MODIFY", "CRUCIAL step easy to overlook"),
    ("ALGO LOGIC", "put action logic here"),
    ("TRY NOT TO MODIFY", "execute the game and log data."),
    ("ALGO LOGIC", "training."),
    ("TRY NOT TO MODIFY", "log the update"),
    ("TRY NOT TO MODIFY", "with --overlap, receive the vector step the envs took during the update"),
    ("TRY NOT TO MODIFY", "evaluation and checkpoints, when global_step crosses a multiple of their period"),
    ("TRY NOT TO MODIFY", "final checkpoint and evaluation"),
]


def sections(algo: str) -> list[tuple[str, str, str]]:
    """(kind, name, text) of every marked section of algos/<algo>.py; a section runs up to the next marker."""
    lines = (REPO / "algos" / f"{algo}.py").read_text().splitlines(keepends=True)
    starts = [(i, MARKER.match(line)) for i, line in enumerate(lines) if MARKER.match(line)]
    ends = [i for i, _ in starts[1:]] + [len(lines)]
    return [(m.group(1), m.group(2), "".join(lines[i:end])) for (i, m), end in zip(starts, ends, strict=True)]


def test_required_sections_in_order():
    for algo in ALGOS:
        names = [(kind, name) for kind, name, _ in sections(algo)]
        assert [n for n in names if n in REQUIRED_SECTIONS] == REQUIRED_SECTIONS, algo


def test_shared_blocks_are_byte_identical():
    """Every TRY NOT TO MODIFY section has the same text in every file that has it."""
    texts: dict[str, dict[str, str]] = {}
    for algo in ALGOS:
        for kind, name, text in sections(algo):
            if kind == "TRY NOT TO MODIFY":
                assert algo not in texts.setdefault(name, {}), f"{algo}: section '{name}' appears twice"
                texts[name][algo] = text
    for name, by_algo in texts.items():
        reference_algo, reference = next(iter(by_algo.items()))
        for algo, text in by_algo.items():
            assert text == reference, f"section '{name}' of {algo}.py differs from {reference_algo}.py's"


def test_short_header_then_args_presets_method_plumbing_main():
    for algo in ALGOS:
        source = (REPO / "algos" / f"{algo}.py").read_text()
        tree = ast.parse(source)
        docstring_end = tree.body[0].end_lineno
        assert docstring_end <= 15, f"{algo}.py: header is {docstring_end} lines"
        names = [getattr(node, "name", None) or getattr(getattr(node, "targets", [None])[0], "id", None) for node in tree.body]
        order = [names.index("Args"), names.index("PRESETS"), names.index("ALGO_ARG_CHECKS"), names.index("validate_args")]
        assert order == sorted(order), algo
        assert isinstance(tree.body[-1], ast.If), f"{algo}.py must end with its __main__ block"


def test_algorithms_import_only_envs_and_libraries():
    for algo in ALGOS:
        tree = ast.parse((REPO / "algos" / f"{algo}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
                for module in modules:
                    assert module.split(".")[0] in ALLOWED_IMPORTS, f"{algo}.py imports {module}"


def test_repository_points_nowhere_outside_itself():
    """Relative paths and markdown links resolve inside the repository, and a section citation (a markdown file
    followed by a section sign) names a document the repository has: a clone holds everything it refers to."""
    docs = {path.name for path in REPO.rglob("*.md") if ".git" not in path.parts}
    paths = [REPO / "README.md", *REPO.glob("algos/*.py"), *REPO.glob("envs/*.py"), *REPO.glob("benchmark/*"),
             *REPO.glob("docs/**/*.md"), *REPO.glob("tests/*.py")]  # fmt: skip
    for path in filter(Path.is_file, paths):
        text, where = path.read_text(errors="ignore"), path.relative_to(REPO)
        targets = re.findall(r"(?<![\w.])\.\./[\w./-]+", text)
        if path.suffix == ".md":
            targets += [t for t in re.findall(r"\]\(([^)#\s]+)", text) if "://" not in t]
        for target in targets:
            resolved = (path.parent / target).resolve()
            assert resolved.is_relative_to(REPO) and resolved.exists(), f"{where} points to {target}, outside the repository"
        for cited in re.findall(r"([\w.-]+\.md) §", text):
            assert cited in docs, f"{where} cites {cited}, which the repository does not have"


DOC_REF = re.compile(r"`algos/(\w+)\.py::([\w.]+)`")


def defined_names(algo: str) -> set[str]:
    """Top-level functions and classes, and Class.method, of algos/<algo>.py."""
    names = set()
    for node in ast.parse((REPO / "algos" / f"{algo}.py").read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {f"{node.name}.{f.name}" for f in node.body if isinstance(f, ast.FunctionDef)}
    return names


def method_functions(algo: str) -> set[str]:
    """Functions defined in the `maths` and `update steps` sections: each must appear in the algorithm's doc."""
    names = set()
    for kind, name, text in sections(algo):
        if kind == "ALGO LOGIC" and name in ("maths", "update steps"):
            names |= set(re.findall(r"^def (\w+)", text, flags=re.M))
    return names


@pytest.mark.parametrize("algo", ALGOS)
def test_equation_map_names_real_code(algo):
    doc = (REPO / "docs" / "algorithms" / f"{algo}.md").read_text()
    refs = DOC_REF.findall(doc)
    assert refs, f"docs/algorithms/{algo}.md has no `algos/{algo}.py::name` references"
    defined = defined_names(algo)
    for file_algo, name in refs:
        assert file_algo == algo, f"docs/algorithms/{algo}.md points into algos/{file_algo}.py"
        assert name in defined, f"docs/algorithms/{algo}.md names {name}, which algos/{algo}.py does not define"
    missing = method_functions(algo) - {name for _, name in refs}
    assert not missing, f"docs/algorithms/{algo}.md does not map {sorted(missing)}"
