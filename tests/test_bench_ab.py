"""bench/ab.py's command line: NAME=TREE, optionally @PYTHON."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import ab  # noqa: E402

pytestmark = pytest.mark.unit


def test_a_tree_runs_on_this_python_unless_one_is_named():
    assert ab.split_tree("before=/work/wt/base") == ("before", "/work/wt/base", sys.executable)
    assert ab.split_tree("pyenv=.@/opt/venv/bin/python") == ("pyenv", ".", "/opt/venv/bin/python")


def test_a_tree_without_proxsmtp_or_a_python_that_is_no_program_is_refused(capsys):
    for item in ("x=/nonexistent", "x=%s@/nonexistent/python" % ROOT):
        try:
            ab.parse_args([item])
        except SystemExit as exc:
            assert exc.code == 2
        else:
            raise AssertionError("%s was accepted" % item)
    assert ab.parse_args(["x=%s" % ROOT]).trees == ["x=%s" % ROOT]


def test_a_tree_setting_names_its_tree_and_is_checked():
    args = ab.parse_args(["smtp=%s" % ROOT, "--tree-setting", "smtp/FilterType: smtp",
                          "--clients", "20"])
    assert args.tree_setting == ["smtp/FilterType: smtp"] and args.clients == 20
    try:
        ab.parse_args(["x=%s" % ROOT, "--tree-setting", "FilterType: smtp"])
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("a tree setting without its tree was accepted")
