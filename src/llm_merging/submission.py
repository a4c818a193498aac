"""Load a starter-kit submission's merge method on top of this package, under a model policy.

A starter-kit submission is a checkout of the starter kit: ``llm_merging/merging/<Method>.py``
defines a class extending ``Merges`` and ``llm_merging/main.py`` maps method names to classes in
``all_merge_handlers()``. The submission's package directories are appended to this package's
search path, so ``llm_merging.merging.Merges`` is ours (even when the submission ships its own
copy) while ``llm_merging.merging.<Method>`` and any helper module are loaded from its files.
``main.py`` is read, not run: it imports the starter kit's evaluation code (pandas, evaluate...).

The runner sets ``resolution.policy`` (the job's allowlist and size limit) while a submission
runs (``installed``).
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import llm_merging
import llm_merging.merging
from llm_merging import resolution
from llm_merging.merging.Merges import Merges
from llm_merging.resolution import ModelResolver
from mergearena.errors import SubmissionError

# The methods the starter kit ships as examples: a submission that only added its own method to
# all_merge_handlers() runs that one without naming it.
STARTER_KIT_EXAMPLES = frozenset({"llama_avg", "tiny_llama_avg", "flant5_avg", "flan_t5_avg"})


@dataclass(frozen=True)
class MethodEntry:
    name: str  # the key in all_merge_handlers(), what --merging_method names
    class_name: str


def find_package(directory: Path) -> Path:
    """The submission's ``llm_merging`` directory: at its top, or one level down (the checkout)."""
    candidates = [directory / "llm_merging", *sorted(directory.glob("*/llm_merging"))]
    for candidate in candidates:
        if (candidate / "merging").is_dir():
            return candidate
    raise SubmissionError(
        f"{directory}: not a starter-kit submission: expected llm_merging/merging/<Method>.py "
        "(at the top or inside the starter kit's folder, e.g. LLM-Merging/llm_merging/merging/)"
    )


def _parse(file: Path) -> ast.Module:
    try:
        return ast.parse(file.read_text(encoding="utf-8"), filename=str(file))
    except (OSError, UnicodeDecodeError, SyntaxError) as error:
        raise SubmissionError(f"{file}: cannot read it as Python ({error})") from None


def _handlers_and_default(main: Path) -> tuple[list[MethodEntry], str | None]:
    """What ``main.py`` registers in ``all_merge_handlers()`` and its default method, if any.

    The default is ``add_argument("--merging_method", default=...)`` or ``DEFAULT_METHOD_NAME``.
    """
    entries: list[MethodEntry] = []
    default: object = None  # any literal main.py wrote; only a string can name a method
    for node in ast.walk(_parse(main)):
        if isinstance(node, ast.FunctionDef) and node.name == "all_merge_handlers":
            for item in ast.walk(node):
                if isinstance(item, ast.Dict):
                    for key, value in zip(item.keys, item.values, strict=True):
                        # {"my_merge": MyMerge} or {"my_merge": module.MyMerge}
                        class_name = getattr(value, "id", getattr(value, "attr", None))
                        if isinstance(key, ast.Constant) and class_name:
                            entries.append(MethodEntry(str(key.value), class_name))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags = [a.value for a in node.args if isinstance(a, ast.Constant)]
            if any(str(flag).lstrip("-").replace("-", "_") == "merging_method" for flag in flags):
                for keyword in node.keywords:
                    if keyword.arg == "default" and isinstance(keyword.value, ast.Constant):
                        default = keyword.value.value
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            if any(getattr(t, "id", None) == "DEFAULT_METHOD_NAME" for t in node.targets):
                default = default or node.value.value
    return entries, default if isinstance(default, str) else None


def _classes_in(merging: Path) -> dict[str, str]:
    """Class name → module name (file stem) of every class defined in ``merging/*.py``."""
    found: dict[str, str] = {}
    for file in sorted(merging.glob("*.py")):
        if file.stem in ("__init__", "Merges"):
            continue
        for node in _parse(file).body:
            if isinstance(node, ast.ClassDef):
                found.setdefault(node.name, file.stem)
    return found


def _subclasses_of_merges(merging: Path) -> list[MethodEntry]:
    entries = []
    for file in sorted(merging.glob("*.py")):
        if file.stem in ("__init__", "Merges"):
            continue
        for node in _parse(file).body:
            if isinstance(node, ast.ClassDef) and any(
                getattr(base, "id", getattr(base, "attr", None)) == "Merges" for base in node.bases
            ):
                entries.append(MethodEntry(node.name, node.name))
    return entries


def choose_method(package: Path, requested: str | None) -> tuple[str, str, str]:
    """(method name, class name, module name) of the method to run.

    ``requested`` may be a key of ``all_merge_handlers()`` or a class name. Without it: main.py's
    default, else the only method, else the only one that is not a starter-kit example.
    """
    main = package / "main.py"
    entries, default = _handlers_and_default(main) if main.is_file() else ([], None)
    if not entries:  # no main.py dict: every class extending Merges, named by its class
        entries = _subclasses_of_merges(package / "merging")
    if not entries:
        raise SubmissionError(
            f"{package}: found no merge method: define a class extending Merges in "
            "llm_merging/merging/<Method>.py and add it to all_merge_handlers() in main.py"
        )
    names = ", ".join(entry.name for entry in entries)
    if requested is not None:
        chosen = [e for e in entries if requested in (e.name, e.class_name)]
        if not chosen:
            raise SubmissionError(f"{package}: no merge method {requested!r}; it has: {names}")
    elif default is not None and any(e.name == default for e in entries):
        chosen = [e for e in entries if e.name == default]
    else:
        own = [e for e in entries if e.name not in STARTER_KIT_EXAMPLES]
        chosen = entries if len(entries) == 1 else own
        if len(chosen) != 1:
            raise SubmissionError(
                f"{package}: several merge methods ({names}); say which one to run (the job's "
                "'method', or a default for --merging_method in main.py)"
            )
    entry = chosen[0]
    modules = _classes_in(package / "merging")
    if entry.class_name not in modules:
        raise SubmissionError(
            f"{package}: merge method {entry.name!r} is class {entry.class_name}, which no file "
            "in llm_merging/merging/ defines"
        )
    return entry.name, entry.class_name, modules[entry.class_name]


@contextlib.contextmanager
def installed(package: Path, job_policy: ModelResolver) -> Iterator[None]:
    """Within the block, the submission's modules import as ``llm_merging.*`` behind ours and
    the compatibility layer applies ``job_policy``; afterwards its modules are forgotten."""
    saved = (list(llm_merging.__path__), list(llm_merging.merging.__path__), resolution.policy)
    llm_merging.__path__.append(str(package))
    llm_merging.merging.__path__.append(str(package / "merging"))
    resolution.policy = job_policy
    importlib.invalidate_caches()
    try:
        yield
    finally:
        llm_merging.__path__[:] = saved[0]
        llm_merging.merging.__path__[:] = saved[1]
        resolution.policy = saved[2]
        root = package.resolve()
        for name, module in list(sys.modules.items()):
            file = getattr(module, "__file__", None)
            if not (name.startswith("llm_merging.") and file):
                continue
            if Path(file).resolve().is_relative_to(root):
                del sys.modules[name]
                parent, _, child = name.rpartition(".")
                if parent in sys.modules and getattr(sys.modules[parent], child, None) is module:
                    delattr(sys.modules[parent], child)


def load_method(package: Path, requested: str | None = None) -> tuple[str, type]:
    """(method name, class) of the submission's merge method; call inside ``installed``."""
    name, class_name, module_name = choose_method(package, requested)
    module = importlib.import_module(f"llm_merging.merging.{module_name}")
    method_class = getattr(module, class_name)
    if not (isinstance(method_class, type) and issubclass(method_class, Merges)):
        raise SubmissionError(
            f"{package}: {class_name} in merging/{module_name}.py does not extend "
            "llm_merging.merging.Merges.Merges"
        )
    return name, method_class
