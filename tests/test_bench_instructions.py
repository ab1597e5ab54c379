"""bench/instructions.py: instructions per message counted under callgrind,
the figure builds are compared by when CPU time is too noisy."""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import instructions  # noqa: E402

DUMP = """\
# callgrind format
version: 1
events: Ir
summary: 1000

ob=(1) /usr/lib/libpython3.11.so.1.0
fl=(1) ceval.c
fn=(1) _PyEval_EvalFrameDefault
10 600
cob=(2) /usr/lib/x86_64-linux-gnu/libc.so.6
cfl=(2) memcpy.S
cfn=(2) memcpy
calls=3 0
11 300
+1 50

ob=(2)
fl=(2)
fn=(2)
0 300
"""


@pytest.mark.unit
def test_costs_are_split_by_object_and_a_call_is_not_counted_twice(tmp_path):
    dump = tmp_path / "callgrind.out.1"
    dump.write_text(DUMP)
    costs = instructions.by_object(str(dump))
    # the interpreter's own 600 + 50; the 300 under `calls=` is memcpy's, counted in libc
    assert costs == {"/usr/lib/libpython3.11.so.1.0": 650,
                     "/usr/lib/x86_64-linux-gnu/libc.so.6": 300}



@pytest.mark.unit
def test_the_interpreter_counts_whether_in_libpython_or_linked_into_python():
    costs = {"/usr/lib/libpython3.11.so.1.0": 300, "/usr/bin/python3.11": 200,
             "/usr/lib/x86_64-linux-gnu/libc.so.6": 100, "/v/uvloop/loop.cpython-311.so": 50,
             "/usr/lib/x86_64-linux-gnu/libssl.so.3": 10}
    assert instructions.split(costs, 10) == {"total": 66.0, "python": 50.0, "libc": 10.0,
                                             "uvloop": 5.0}


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.system
@pytest.mark.slow
def test_proxsmtpd_is_counted_beside_the_contract_floor():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "instructions.py"),
                           "main=" + ROOT, "--floor", "--messages", "40"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    rows = {}
    for line in done.stdout.splitlines():
        match = re.match(r"\s+(main|floor)\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)$", line)
        if match:
            rows[match.group(1)] = [float(value) for value in match.groups()[1:]]
    assert set(rows) == {"main", "floor"}, done.stdout
    main, floor = rows["main"], rows["floor"]
    # thousands of instructions per message: a Python relay of a 10 KB message
    # takes more than 100k; proxsmtpd does all the floor does and more
    assert floor[0] > 100 and main[0] > floor[0]
    for total, python, libc, uvloop, _ in (main, floor):
        assert python + libc + uvloop <= total + 3      # (each rounded)
        assert python > total / 2                        # the interpreter's, mostly
    assert floor[4] == 1.0 and main[4] == pytest.approx(main[0] / floor[0], abs=0.02)
