# proxsmtpd — see README.md.  `make test` and `make run` work on a fresh Debian machine.
PYTHON ?= python3
VENV ?= .venv
PREFIX ?= /usr/local
DESTDIR ?=
PY = $(VENV)/bin/python

# What the tests drive: Postfix's smtp-sink/smtp-source, swaks, haproxy,
# iptables and ip in network namespaces, and libcap-dev for python-prctl.
TEST_DEBS = libcap-dev postfix swaks haproxy iproute2 iptables procps kmod

.PHONY: all venv deps test run clean

all: venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@if ! dpkg -s libcap-dev >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libcap-dev; \
	  else echo "warning: libcap-dev is missing (apt-get install libcap-dev), python-prctl may not build" >&2; fi; \
	fi
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

deps:
	@missing=""; for p in $(TEST_DEBS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: missing Debian packages:$$missing (tests that need them are skipped)" >&2; fi; \
	fi

test: venv deps
	$(PY) -m pytest -q tests

run: venv
	@sh demo/run.sh $(PY)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
