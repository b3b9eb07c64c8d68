"""The project's own docs name code that exists: README.md and every docs/*.md.

Checked in inline code spans (single backticks, outside fenced blocks):

- a repository path (``catalog/...``, ``engine_plugin/...``, ``bench/...``, ``scripts/...``,
  ``tests/...``, ``proto/...``, ``docs/...``) exists; a span may go on after the path with
  arguments (``bench/x.py --quick``) or a pytest node (``tests/x.py::test_y``); spans holding a
  placeholder or a glob (``<name>``, ``*``) and generated outputs under ``bench/results/`` are
  not paths to check;
- a dotted Python name starting ``catalog.`` or ``engine_plugin.`` (module, or module then
  attributes, with an optional call ``(...)`` after it) imports and resolves;
- a bare file name (``lmdb_reads.py``, ``compiled/stack_distance.py``) is a file somewhere in the
  code (its directory is left to the prose: several names, ``environment.py`` for one, exist in
  more than one package);
- a ``Class.attribute`` span (``Catalog._append``, ``Limits.max_pack_bytes``) names a class
  defined in ``catalog`` or ``engine_plugin`` (or one of the few outside classes listed in
  ``OUTSIDE_CLASSES``) that has that attribute: on the class, as an annotated field, or assigned
  as ``self.attribute`` in the class's source. Only the first attribute is checked. Modules that
  cannot be imported here (the vLLM resolver needs the vLLM venv) contribute no classes;
- a bare CamelCase name (``HeapRankedPolicy``, ``References``) is a class of ours, or a word of
  the code or the proto (an RPC, a message, a class of a library the code uses), so a renamed or
  removed class is caught.

README's layout block is checked against the tree: every directory it lists exists, every
package under ``catalog/`` and ``engine_plugin/`` is listed, every seam it names on the
``core`` line is a module in ``catalog/``, and every mixin of ``Catalog`` is named there.

One principled exception: docs/PERFORMANCE.md's dated ``pass`` sections (headings such as
"Colocated read path, second pass (issue 14, 2026-12-04 evening)") record what was measured at
the time, with the code as it was then; a name there may have moved since, and rewriting it
would misstate what was run. Those sections (up to the next heading of the same or a higher
level) are skipped. Everything else, PERFORMANCE.md's current sections included, is checked.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

PATH_ROOTS = ("catalog/", "engine_plugin/", "bench/", "scripts/", "tests/", "proto/", "docs/")
DOTTED_NAME = re.compile(r"^((?:catalog|engine_plugin)(?:\.[A-Za-z_][A-Za-z0-9_]*)+)(?:\(.*\))?$")
FENCE = re.compile(r"^\s*```")
HEADING = re.compile(r"^(#+)\s+(.*)$")
# A dated pass heading: "... <ordinal> pass (issue N, 2026-12-04 ...)".
HISTORICAL_HEADING = re.compile(r"\bpass \(issue \d+, \d{4}-\d{2}-\d{2}\b")
BARE_FILE = re.compile(r"^[\w/]+\.(?:py|sh)$")
CLASS_ATTRIBUTE = re.compile(r"^([A-Z]\w*)\.([A-Za-z_]\w*)(?:\.[\w.]+)?(?:\(.*\))?$")
CAMEL_CASE = re.compile(r"^([A-Z][a-z0-9]+(?:[A-Z][a-z0-9]*)+)(?:\(.*\))?$")
FILE_NAME = re.compile(r"^[\w/]+\.(?:md|py|sh|json|toml|txt|proto)$")  # README.md is no class
CODE_ROOTS = ("catalog", "engine_plugin", "bench", "scripts", "tests", "proto")
# Classes the docs name that are not ours, by the name the docs use.
OUTSIDE_CLASSES = {"Transaction": "lmdb.Transaction"}
INLINE_CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


@dataclass(frozen=True)
class Span:
    doc: str
    line: int
    text: str


def _is_historical(doc: Path, heading: str) -> bool:
    return doc.name == "PERFORMANCE.md" and bool(HISTORICAL_HEADING.search(heading))


def _shown(doc: Path) -> str:
    return str(doc.relative_to(ROOT)) if doc.is_relative_to(ROOT) else doc.name


def code_spans(doc: Path) -> list[Span]:
    """Inline code spans of ``doc`` outside fenced blocks and skipped historical sections."""
    spans: list[Span] = []
    in_fence = False
    skip_below: int | None = None  # heading level of the historical section being skipped
    for number, line in enumerate(doc.read_text().splitlines(), start=1):
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        heading = HEADING.match(line)
        if heading:
            level = len(heading.group(1))
            if skip_below is not None and level <= skip_below:
                skip_below = None
            if skip_below is None and _is_historical(doc, heading.group(2)):
                skip_below = level
        if skip_below is not None:
            continue
        for match in INLINE_CODE.finditer(line):
            spans.append(Span(_shown(doc), number, match.group(1).strip()))
    return spans


def repository_path(text: str) -> str | None:
    """The repository path a span names, or None when it names none worth checking."""
    first = text.split()[0] if text.split() else ""
    first = first.split("::")[0]
    if not first.startswith(PATH_ROOTS):
        return None
    if any(ch in first for ch in "<>*{}$") or first.startswith("bench/results/"):
        return None
    return first.rstrip(",.;:")


def resolves(dotted: str) -> bool:
    """Whether ``dotted`` is an importable module, or one followed by attributes it has."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            target: object = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name is not None and module_name.startswith(error.name):
                continue  # this prefix is not a module: try a shorter one
            raise  # the module exists but one of its own imports is missing
        for attribute in parts[cut:]:
            if not hasattr(target, attribute):
                return False
            target = getattr(target, attribute)
        return True
    return False


def project_classes() -> dict[str, list[type]]:
    """Classes defined in ``catalog`` and ``engine_plugin``, by name (importable modules only)."""
    import catalog
    import engine_plugin

    classes: dict[str, list[type]] = {}
    for package in (catalog, engine_plugin):
        for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if "._proto" in info.name:
                continue
            try:
                module = importlib.import_module(info.name)
            except ModuleNotFoundError as error:
                if error.name == "vllm":  # the vLLM resolver, importable only in .venv-vllm
                    continue
                raise
            for name, value in vars(module).items():
                if inspect.isclass(value) and value.__module__ == module.__name__:
                    classes.setdefault(name, []).append(value)
    for name, dotted in OUTSIDE_CLASSES.items():
        module_name, _, class_name = dotted.rpartition(".")
        classes.setdefault(name, []).append(
            getattr(importlib.import_module(module_name), class_name)
        )
    return classes


def has_attribute(cls: type, attribute: str) -> bool:
    """Whether instances of ``cls`` have ``attribute``: on the class, annotated, or set in code."""
    if hasattr(cls, attribute):
        return True
    for klass in inspect.getmro(cls):
        if attribute in getattr(klass, "__annotations__", {}):
            return True
        try:
            source = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"\bself\.{re.escape(attribute)}\s*(?::[^=]*)?=", source):
            return True
    return False


def all_spans() -> list[Span]:
    return [span for doc in DOCS for span in code_spans(doc)]


def test_the_docs_are_found() -> None:
    names = {doc.name for doc in DOCS}
    assert {"README.md", "ARCHITECTURE.md", "PERFORMANCE.md"} <= names
    assert len(all_spans()) > 500  # the extraction did not silently find nothing


def _where(span: Span) -> str:
    return f"{span.doc}:{span.line}: `{span.text}`"


def missing_paths(spans: list[Span]) -> list[str]:
    """Spans naming a repository path that does not exist."""
    return [
        _where(span)
        for span in spans
        if (path := repository_path(span.text)) is not None and not (ROOT / path).exists()
    ]


def unresolved_python_names(spans: list[Span]) -> list[str]:
    """Spans naming a ``catalog.``/``engine_plugin.`` module or attribute that does not resolve."""
    return [
        _where(span)
        for span in spans
        if (match := DOTTED_NAME.match(span.text)) is not None and not resolves(match.group(1))
    ]


def missing_file_names(spans: list[Span]) -> list[str]:
    """Spans naming a bare ``name.py``/``name.sh`` that exists nowhere in the code."""
    code_files = [path for top in CODE_ROOTS for path in (ROOT / top).rglob("*") if path.is_file()]
    return [
        _where(span)
        for span in spans
        if BARE_FILE.match(span.text)
        and repository_path(span.text) is None
        and not any(path.as_posix().endswith("/" + span.text) for path in code_files)
    ]


def missing_class_attributes(spans: list[Span], classes: dict[str, list[type]]) -> list[str]:
    """Spans naming ``Class.attribute`` where no class of that name has the attribute."""
    stale = []
    for span in spans:
        match = CLASS_ATTRIBUTE.match(span.text)
        if match is None or FILE_NAME.match(span.text):
            continue
        class_name, attribute = match.groups()
        if not any(has_attribute(cls, attribute) for cls in classes.get(class_name, [])):
            stale.append(_where(span))
    return stale


def unknown_camel_case_names(spans: list[Span], classes: dict[str, list[type]]) -> list[str]:
    """Spans naming a CamelCase word that is no class of ours and appears nowhere in the code."""
    code = "\n".join(
        path.read_text(errors="replace")
        for top in CODE_ROOTS
        for path in (ROOT / top).rglob("*")
        # this file's planted stale names must not vouch for themselves
        if path.is_file()
        and path.suffix in (".py", ".proto", ".sh")
        and path != Path(__file__).resolve()
    )
    words = set(re.findall(r"\b[A-Z]\w*", code))
    return [
        _where(span)
        for span in spans
        if (match := CAMEL_CASE.match(span.text)) is not None
        and match.group(1) not in classes
        and match.group(1) not in words
    ]


@pytest.fixture(scope="module")
def classes() -> dict[str, list[type]]:
    return project_classes()


def test_every_backticked_path_exists() -> None:
    missing = missing_paths(all_spans())
    assert not missing, "docs name paths that do not exist:\n" + "\n".join(missing)


def test_every_backticked_python_name_resolves() -> None:
    stale = unresolved_python_names(all_spans())
    assert not stale, "docs name Python objects that do not resolve:\n" + "\n".join(stale)


def test_every_backticked_file_name_exists() -> None:
    missing = missing_file_names(all_spans())
    assert not missing, "docs name files that exist nowhere in the code:\n" + "\n".join(missing)


def test_every_backticked_class_attribute_exists(classes: dict[str, list[type]]) -> None:
    stale = missing_class_attributes(all_spans(), classes)
    assert not stale, "docs name class attributes that do not exist:\n" + "\n".join(stale)


def test_every_backticked_camel_case_name_exists(classes: dict[str, list[type]]) -> None:
    unknown = unknown_camel_case_names(all_spans(), classes)
    assert not unknown, "docs name classes that exist nowhere in the code:\n" + "\n".join(unknown)


STALE_DOC = """# A doc with stale names

Lives in `catalog/cache/no_such_module.py`, run by `bench/bench_nothing.py --quick`; see
`catalog.cache.pack_cache.NoSuchThing` and `catalog.no_such_module`, the file `no_such_file.py`
and `Catalog.no_such_method(1)`, `NoSuchPolicyClass`. Current names pass: `catalog/core.py`,
`catalog.pack`, `lmdb_reads.py`, `Catalog._append`, `HeapRankedPolicy`, `FetchPack`.

```text
catalog/inside_a_fence_is_not_checked.py
```

### Colocated read path, ninth pass (issue 14, 2026-12-04 evening)

`catalog/historical_name.py` as it was measured then.

### A current section again

`catalog/after_the_historical_section.py`
"""


def test_stale_names_are_caught(tmp_path: Path, classes: dict[str, list[type]]) -> None:
    for name in ("STALE.md", "PERFORMANCE.md"):
        (tmp_path / name).write_text(STALE_DOC)
    spans = code_spans(tmp_path / "STALE.md")
    assert missing_paths(spans) == [
        "STALE.md:3: `catalog/cache/no_such_module.py`",
        "STALE.md:3: `bench/bench_nothing.py --quick`",
        "STALE.md:14: `catalog/historical_name.py`",  # not PERFORMANCE.md: checked
        "STALE.md:18: `catalog/after_the_historical_section.py`",
    ]
    assert unresolved_python_names(spans) == [
        "STALE.md:4: `catalog.cache.pack_cache.NoSuchThing`",
        "STALE.md:4: `catalog.no_such_module`",
    ]
    assert missing_file_names(spans) == ["STALE.md:4: `no_such_file.py`"]
    assert missing_class_attributes(spans, classes) == ["STALE.md:5: `Catalog.no_such_method(1)`"]
    assert unknown_camel_case_names(spans, classes) == ["STALE.md:5: `NoSuchPolicyClass`"]
    # In PERFORMANCE.md the dated pass section is skipped, and only it.
    assert missing_paths(code_spans(tmp_path / "PERFORMANCE.md")) == [
        "PERFORMANCE.md:3: `catalog/cache/no_such_module.py`",
        "PERFORMANCE.md:3: `bench/bench_nothing.py --quick`",
        "PERFORMANCE.md:18: `catalog/after_the_historical_section.py`",
    ]


def readme_layout(readme: str) -> list[str]:
    """The lines of the fenced block under README's "## Layout" heading."""
    lines = readme.splitlines()
    start = lines.index("## Layout")
    opening = next(i for i in range(start, len(lines)) if FENCE.match(lines[i]))
    closing = next(i for i in range(opening + 1, len(lines)) if FENCE.match(lines[i]))
    return lines[opening + 1 : closing]


def layout_directories(layout: list[str]) -> set[str]:
    """Directories the layout lists, as repository paths (indented entries under their parent)."""
    directories: set[str] = set()
    parent = ""
    for line in layout:
        entry = re.match(r"^( *)(\S+/)\s", line + " ")
        if not entry:
            continue
        if entry.group(1):
            directories.add(parent + entry.group(2))
        else:
            parent = entry.group(2)
            directories.add(parent)
    return directories


def layout_problems(layout: list[str]) -> list[str]:
    """What the layout gets wrong about the tree: directories that do not exist, packages under
    ``catalog/`` and ``engine_plugin/`` it leaves out, core seams that are not modules, and
    mixins of ``Catalog`` it does not name as seams."""
    from catalog.core import Catalog

    listed = layout_directories(layout)
    problems = [f"lists a missing directory {d}" for d in sorted(listed) if not (ROOT / d).is_dir()]
    problems += [
        f"leaves out the package {package.relative_to(ROOT)}/"
        for top in ("catalog", "engine_plugin")
        for package in sorted((ROOT / top).iterdir())
        if (package / "__init__.py").is_file()
        and not package.name.startswith("_")
        # test doubles and helpers for tests, not part of the product's layout
        and package.name != "testing"
        and f"{package.relative_to(ROOT)}/" not in listed
    ]
    seams_text = re.search(r"core \(with its seams: ([^)]*)\)", " ".join(x.strip() for x in layout))
    if seams_text is None:
        return [*problems, "no longer names core's seams"]
    seams = [name.strip() for name in seams_text.group(1).split(",")]
    problems += [
        f"names a seam that is no module: {name}"
        for name in seams
        if not (ROOT / "catalog" / f"{name}.py").is_file()
    ]
    problems += [
        f"leaves out core's seam {cls.__module__} ({cls.__name__})"
        for cls in Catalog.__mro__[1:]
        if cls.__module__.startswith("catalog.")
        and cls.__module__ != "catalog.catalog_parts"  # the mixins' shared base, not a seam
        and cls.__module__.removeprefix("catalog.") not in seams
    ]
    return problems


def test_readme_layout_matches_the_tree() -> None:
    layout = readme_layout((ROOT / "README.md").read_text())
    assert {"catalog/", "catalog/cache/", "engine_plugin/vllm/"} <= layout_directories(layout)
    problems = layout_problems(layout)
    assert not problems, "README's layout:\n" + "\n".join(problems)


def test_a_stale_layout_is_caught() -> None:
    readme = (ROOT / "README.md").read_text()
    stale = readme.replace("maintenance, pack_reads", "pack_reads").replace(
        "  index/  ", "  indexes/"
    )
    assert stale != readme
    problems = layout_problems(readme_layout(stale))
    assert "lists a missing directory catalog/indexes/" in problems
    assert "leaves out the package catalog/index/" in problems
    assert "leaves out core's seam catalog.maintenance (Maintenance)" in problems


@pytest.mark.parametrize(
    ("text", "path"),
    [
        ("bench/bench_pack.py --quick", "bench/bench_pack.py"),
        ("tests/x/test_y.py::test_z", "tests/x/test_y.py"),
        ("bench/results/<name>.json", None),
        ("Catalog.delete", None),
    ],
)
def test_repository_path_reads_a_span(text: str, path: str | None) -> None:
    assert repository_path(text) == path
