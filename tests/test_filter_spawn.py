"""Which filter commands run without /bin/sh (filters.process:direct_argv,
shell_pwd): only those dash would merely look up in PATH and run, with an
environment it would pass on unchanged.  End to end, both ways are compared
in tests/test_filters.py and tests/test_faults.py."""

from __future__ import annotations

import os

import pytest

from proxsmtp.filters import process

pytestmark = pytest.mark.unit

ENV = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8", "SENDER": "a@x.test"}


@pytest.fixture(autouse=True)
def dash(monkeypatch):
    monkeypatch.setattr(process, "SHELL_IS_DASH", True)


@pytest.mark.parametrize("command, argv", [
    ("cat", ["cat"]),
    ("  /usr/local/bin/spamc -f -x  ", ["/usr/local/bin/spamc", "-f", "-x"]),
    ("filter --size=10 a,b:c+d@e%f", ["filter", "--size=10", "a,b:c+d@e%f"]),
])
def test_plain_commands_run_without_the_shell(command, argv):
    assert process.direct_argv(command, ENV) == argv


@pytest.mark.parametrize("command", [
    "", "   ", "cat >/dev/null", "cat </dev/stdin", "cat | sed s/a/b/", "cat; true", "cat &",
    "sed 's/a/b/'", 'sed "s/a/b/"', "echo $HOME", "cat `ls`", "cat $(ls)", "cat *", "cat a?",
    "cat [ab]", "cat ~/x", "cat ~", "cat # comment", "cat\\ x", "cat\nls", "(cat)", "{ cat; }",
    "! cat", "A=b cat", "exec cat", "echo hi", "printf x", "test -f x", "[ -f x ]", "kill 1",
    "true", "false", "pwd", "cd /", "exit 3", ". ./x", ": x", "if", "while", "type cat",
    "ulimit -n", "umask 0", "wait", "read x", "command cat", "eval cat", "set -e",
])
def test_commands_with_shell_syntax_or_builtins_need_the_shell(command):
    assert process.direct_argv(command, ENV) is None


@pytest.mark.parametrize("extra", [{"IFS": " "}, {"OPTIND": "3"}, {"PPID": "1"},
                                   {"A-B": "1"}, {"1A": "1"}, {"a.b": "1"}, {"É": "1"}])
def test_environment_dash_would_change_needs_the_shell(extra):
    assert process.direct_argv("cat", dict(ENV, **extra)) is None
    assert process.direct_argv("cat", dict(ENV, _a9="1")) == ["cat"]


def test_no_path_needs_the_shell():
    env = dict(ENV)
    del env["PATH"]
    assert process.direct_argv("cat", env) is None


def test_another_shell_than_dash_runs_every_command(monkeypatch):
    monkeypatch.setattr(process, "SHELL_IS_DASH", False)
    assert process.direct_argv("cat", ENV) is None


def test_pwd_as_dash_exports_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    here = os.getcwd()
    assert process.shell_pwd({}) == here
    assert process.shell_pwd({"PWD": "/nonexistent"}) == here
    assert process.shell_pwd({"PWD": "relative"}) == here
    assert process.shell_pwd({"PWD": "/"}) == here                   # another directory
    (tmp_path / "link").symlink_to(tmp_path)
    assert process.shell_pwd({"PWD": str(tmp_path / "link")}) == str(tmp_path / "link")
    assert process.shell_pwd({"PWD": here + "/."}) == here + "/."     # kept as given
