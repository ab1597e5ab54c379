"""The code keeps the shape docs/ARCHITECTURE.md draws: each room imports
only from the rooms below it, and no class, function or module outgrows
what a reader takes in at once."""

from __future__ import annotations

import ast
import os

import pytest

pytestmark = pytest.mark.unit

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "proxsmtp")

# What a module of each room may import from the package (docs/ARCHITECTURE.md,
# "What each room may touch").  Keys and values are rooms or room.module.
BASE = {"process.config", "process.log", "process.stats"}
ALLOWED = {
    "cli": None,                # anything
    "__init__": None,           # the version
    "process.master": None,
    "process.pool": None,       # the master's workers: forks them, cleans up after them
    "process.worker": None,
    "session": {"session", "message", "filters", "smtp", "net"} | BASE,
    "message": {"message", "filters", "smtp", "net"} | BASE,
    "filters": {"filters", "message", "smtp", "net"} | BASE,
    "smtp": {"smtp", "net", "process.log"},
    "net": {"net"} | BASE,
    "process": {"process", "net", "message.header"},
}

CLASS_LINES = 300
FUNCTION_LINES = 60
MODULE_LINES = 600
# The settings table: one entry per setting, each with its check.
MODULE_EXCEPTIONS = {"process/config.py": 700}


def modules() -> list[str]:
    found = []
    for root, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                found.append(os.path.relpath(os.path.join(root, name), PACKAGE))
    return sorted(found)


def dotted(path: str) -> str:
    """process/config.py -> process.config; filters/__init__.py -> filters."""
    name = path[:-3].replace(os.sep, ".")
    return name[:-len(".__init__")] if name.endswith(".__init__") else name


def imported(path: str) -> set[str]:
    """The package modules `path` imports, as dotted names below proxsmtp."""
    here = dotted(path).split(".")
    package = here if path.endswith("__init__.py") else here[:-1]
    tree = ast.parse(open(os.path.join(PACKAGE, path)).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
            prefix = base + (node.module.split(".") if node.module else [])
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("proxsmtp."):
            prefix = node.module.split(".")[1:]
        else:
            continue
        for alias in node.names:    # `from ..process import stats` imports process.stats
            module = prefix + [alias.name]
            is_module = (os.path.exists(os.path.join(PACKAGE, *module) + ".py")
                         or os.path.isdir(os.path.join(PACKAGE, *module)))
            names.add(".".join(module if is_module else prefix))
    return {name for name in names if name and name != "__version__"}


def allowed_for(module: str) -> set[str] | None:
    for key in (module, module.split(".")[0]):
        if key in ALLOWED:
            return ALLOWED[key]
    raise AssertionError("%s is in no room of docs/ARCHITECTURE.md" % module)


def permitted(target: str, allowed: set[str]) -> bool:
    parts = target.split(".")
    return any(".".join(parts[:n]) in allowed for n in range(1, len(parts) + 1))


def test_every_room_imports_only_from_the_rooms_below_it():
    wrong = []
    for path in modules():
        module = dotted(path)
        allowed = allowed_for(module)
        if allowed is None:
            continue
        for target in sorted(imported(path)):
            if not permitted(target, allowed):
                wrong.append("%s imports %s" % (module, target))
    assert not wrong, "\n".join(wrong)


def test_the_rule_catches_an_upward_import():
    """The check itself: a message module importing the session room is caught."""
    assert not permitted("session.replyqueue", ALLOWED["message"])
    assert permitted("smtp.ends", ALLOWED["message"])
    assert permitted("process.log", ALLOWED["smtp"])
    assert not permitted("process.config", ALLOWED["smtp"])


def test_no_class_function_or_module_is_too_long_to_read():
    long = []
    for path in modules():
        source = open(os.path.join(PACKAGE, path)).read()
        lines = source.count("\n")
        limit = MODULE_EXCEPTIONS.get(path.replace(os.sep, "/"), MODULE_LINES)
        if lines > limit:
            long.append("%s: %d lines (at most %d)" % (path, lines, limit))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                limit, kind = CLASS_LINES, "class"
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                limit, kind = FUNCTION_LINES, "function"
            else:
                continue
            size = node.end_lineno - node.lineno + 1
            if size > limit:
                long.append("%s: %s %s is %d lines (at most %d)"
                            % (path, kind, node.name, size, limit))
    assert not long, "\n".join(long)


def test_every_module_is_in_the_architecture_map():
    """docs/ARCHITECTURE.md names every module of the package."""
    text = open(os.path.join(os.path.dirname(PACKAGE), "docs", "ARCHITECTURE.md")).read()
    missing = [path for path in modules()
               if not path.endswith("__init__.py") and "`%s`" % os.path.basename(path) not in text]
    assert not missing, missing
