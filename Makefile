# proxsmtpd — see README.md.  `make test` and `make run` work on a fresh Debian machine.
# The venv (tests, benchmark, `make run`) is built on the interpreter `make
# install` runs the daemon on, Debian's /usr/bin/python3, where there is one:
# a distribution's python is built with PGO and LTO, a pyenv or source build
# often is not, and costs about 14 % more CPU per message (bench/README.md).
PYTHON ?= $(firstword $(wildcard /usr/bin/python3) python3)
VENV ?= .venv
PREFIX ?= /usr/local
DESTDIR ?=
PY = $(VENV)/bin/python

# What the tests drive: Postfix's smtp-sink/smtp-source and a throwaway
# smtpd (libsasl2-modules so that it can offer AUTH), swaks, openssl s_client, haproxy,
# iptables and ip in network namespaces, and libcap-dev for python-prctl.
# groff-base/man-db render the manual pages; systemd's systemd-analyze checks
# the unit; util-linux's setpriv runs the daemon in the unit's capability
# bounding set; python3-trustme makes the TLS tests' throwaway certificates;
# valgrind counts bench/instructions.py's instructions per message;
# the other python3-* packages are what an installed proxsmtpd runs on (see
# `install` below).
TEST_DEBS = libcap-dev postfix libsasl2-modules swaks haproxy iproute2 iptables procps kmod openssl valgrind \
	python3-trustme groff-base man-db systemd util-linux \
	rspamd opendkim opendkim-tools clamav-daemon clamav-milter python3-milter python3-dkim $(RUNTIME_DEBS)

.PHONY: all venv deps test run clean install install-deps uninstall

all: venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	@missing=""; for p in libcap-dev $(if $(filter /usr/bin/python3,$(PYTHON)),python3-venv python3-dev); do \
	  dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	  else echo "warning: missing Debian packages:$$missing (python-prctl may not build)" >&2; fi; \
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

# pytest-xdist's workers: most of a test's time is spent waiting on its peers
# (a proxsmtpd, Postfix or a milter starting, a timeout running out), so
# more workers than cores.  Each test runs once, in one of them.
TEST_JOBS ?= 4

test: venv deps
	$(PY) -m pytest -q -n $(TEST_JOBS) tests

# The quick loop: every test but the slow ones (pytest.ini; README.md, "Tests").
.PHONY: test-quick
test-quick: venv
	$(PY) -m pytest -q -m "not slow" tests

# The conservation test at ten times its size (tests/test_soak.py; SOAK_SCALE=N for more).
.PHONY: soak
soak: venv deps
	SOAK_SCALE=$${SOAK_SCALE:-10} $(PY) -m pytest -q -s tests/test_soak.py

# The benchmark (bench/README.md); not part of `make test`.  BENCH_ARGS=--quick, --check, ...
.PHONY: bench
bench: venv deps
	$(PY) bench/run.py $(BENCH_ARGS)

run: venv
	@sh demo/run.sh $(PY)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# --- make install / make uninstall ----------------------------------------------
# A self-contained layout: the package in $(LIBDIR), run by a small wrapper
# $(SBINDIR)/proxsmtpd with $(INSTALL_PYTHON).  That interpreter needs the
# dependencies: Debian's python3-* packages (`make install-deps`), or point
# INSTALL_PYTHON at a virtualenv's python that has them (see README.md).
# Paths written as /usr/local/... in the installed text files (man pages,
# sample config, scripts, init script, unit) are rewritten to match PREFIX.
SBINDIR ?= $(PREFIX)/sbin
LIBDIR ?= $(PREFIX)/lib/proxsmtpd
DATADIR ?= $(PREFIX)/share/proxsmtpd
MANDIR ?= $(PREFIX)/share/man
SYSCONFDIR ?= $(if $(filter /usr /usr/,$(PREFIX)),/etc,$(PREFIX)/etc)
INITDIR ?= /etc/init.d
SYSTEMDUNITDIR ?= $(PREFIX)/lib/systemd/system
INSTALL_PYTHON ?= /usr/bin/python3
INSTALL ?= install
RUNTIME_DEBS = python3-configobj python3-daemon python3-setproctitle python3-prctl python3-uvloop \
	python3-prometheus-client
EXAMPLES = add_header.sh reject_pattern.sh spamassassin.sh
# The package, room by room (docs/ARCHITECTURE.md): its top and each subpackage.
ROOMS = process net smtp session message filters

SUBST = sed -e 's|/usr/local/etc|$(SYSCONFDIR)|g' \
	-e 's|/usr/local/sbin|$(SBINDIR)|g' \
	-e 's|/usr/local/share/proxsmtpd|$(DATADIR)|g' \
	-e 's|/usr/local/share/man|$(MANDIR)|g' \
	-e 's|/usr/local/lib/systemd/system|$(SYSTEMDUNITDIR)|g' \
	-e 's|/usr/local/lib/proxsmtpd|$(LIBDIR)|g'

# The directories install writes to; those it had to create are listed in
# $(CREATED) (without DESTDIR) for uninstall to remove once empty.
INSTALL_DIRS = $(SBINDIR) $(LIBDIR)/proxsmtp $(addprefix $(LIBDIR)/proxsmtp/,$(ROOMS)) $(DATADIR) $(MANDIR)/man8 $(MANDIR)/man5 \
	$(SYSCONFDIR) $(INITDIR) $(SYSTEMDUNITDIR)
CREATED = $(LIBDIR)/installed-directories
# Where systemd looks for units of the system manager (systemd.unit(5)).
SYSTEMD_PATHS = /etc/systemd/system /usr/local/lib/systemd/system /usr/lib/systemd/system \
	/lib/systemd/system

install:
	@for d in $(INSTALL_DIRS); do \
	  p=$(DESTDIR)$$d; while [ ! -e "$$p" ]; do p=$$(dirname "$$p"); done; \
	  [ -w "$$p" ] && continue; \
	  echo "make install: $$p is not writable by $$(id -un), so $(DESTDIR)$$d can't be made; nothing was installed." >&2; \
	  if [ "$$(id -u)" != 0 ] && [ "$$d" = "$(INITDIR)" ]; then \
	    echo "  Run it as root, or, as $$(id -un), give INITDIR (where the init script goes) a directory you can write:" >&2; \
	    echo "  make install PREFIX=$$HOME/proxsmtpd INITDIR=$$HOME/proxsmtpd/etc/init.d" >&2; \
	  else echo "  Run it as root, or choose a PREFIX you can write." >&2; fi; \
	  exit 1; \
	done
	@if [ -n "$(DESTDIR)" ] && [ ! -d "$(DESTDIR)" ]; then \
	  $(INSTALL) -d "$(DESTDIR)" || { echo "make install: can't create DESTDIR $(DESTDIR); nothing was installed." >&2; exit 1; }; \
	fi
	@new=; for d in $(INSTALL_DIRS); do \
	  while [ "$$d" != / ] && [ ! -d "$(DESTDIR)$$d" ]; do new="$$new $$d"; d=$$(dirname "$$d"); done; \
	done; \
	$(INSTALL) -d $(addprefix $(DESTDIR),$(INSTALL_DIRS)) && \
	{ cat $(DESTDIR)$(CREATED) 2>/dev/null; printf '%s\n' $$new; } | sed '/^$$/d' | sort -u > $(DESTDIR)$(CREATED).new && \
	mv $(DESTDIR)$(CREATED).new $(DESTDIR)$(CREATED) && chmod 644 $(DESTDIR)$(CREATED)
	$(INSTALL) -m 644 $(wildcard proxsmtp/*.py) $(DESTDIR)$(LIBDIR)/proxsmtp/
	for room in $(ROOMS); do \
	  $(INSTALL) -m 644 proxsmtp/$$room/*.py $(DESTDIR)$(LIBDIR)/proxsmtp/$$room/ || exit 1; \
	done
	sed -i 's|^SYSCONFDIR = .*|SYSCONFDIR = "$(SYSCONFDIR)"|' $(DESTDIR)$(LIBDIR)/proxsmtp/process/defaults.py
	rel=$$($(PYTHON) -c 'import os, sys; print(os.path.relpath(sys.argv[1], sys.argv[2]))' \
	  $(LIBDIR) $(SBINDIR)) && \
	sed -e 's|@PYTHON@|$(INSTALL_PYTHON)|' -e 's|@LIBDIR@|$(LIBDIR)|' -e "s|@LIBDIR_REL@|$$rel|" \
	  init/proxsmtpd.sbin.in > $(DESTDIR)$(SBINDIR)/proxsmtpd
	chmod 755 $(DESTDIR)$(SBINDIR)/proxsmtpd
	$(SUBST) man/proxsmtpd.8 > $(DESTDIR)$(MANDIR)/man8/proxsmtpd.8
	$(SUBST) man/proxsmtpd.conf.5 > $(DESTDIR)$(MANDIR)/man5/proxsmtpd.conf.5
	chmod 644 $(DESTDIR)$(MANDIR)/man8/proxsmtpd.8 $(DESTDIR)$(MANDIR)/man5/proxsmtpd.conf.5
	for f in $(EXAMPLES); do \
	  $(SUBST) scripts/$$f > $(DESTDIR)$(DATADIR)/$$f && chmod 755 $(DESTDIR)$(DATADIR)/$$f || exit 1; \
	done
	$(SUBST) etc/proxsmtpd.conf > $(DESTDIR)$(DATADIR)/proxsmtpd.conf
	$(SUBST) init/proxsmtpd.default > $(DESTDIR)$(DATADIR)/proxsmtpd.default
	$(INSTALL) -m 644 share/grafana-dashboard.json $(DESTDIR)$(DATADIR)/grafana-dashboard.json
	chmod 644 $(DESTDIR)$(DATADIR)/proxsmtpd.conf $(DESTDIR)$(DATADIR)/proxsmtpd.default
	@if [ -e $(DESTDIR)$(SYSCONFDIR)/proxsmtpd.conf ]; then \
	  echo "kept the existing $(DESTDIR)$(SYSCONFDIR)/proxsmtpd.conf (new sample: $(DATADIR)/proxsmtpd.conf)"; \
	else \
	  echo "installing the sample configuration as $(DESTDIR)$(SYSCONFDIR)/proxsmtpd.conf"; \
	  $(SUBST) etc/proxsmtpd.conf > $(DESTDIR)$(SYSCONFDIR)/proxsmtpd.conf && \
	  chmod 644 $(DESTDIR)$(SYSCONFDIR)/proxsmtpd.conf; \
	fi
	$(SUBST) init/proxsmtpd.init > $(DESTDIR)$(INITDIR)/proxsmtpd
	chmod 755 $(DESTDIR)$(INITDIR)/proxsmtpd
	$(SUBST) init/proxsmtpd.service > $(DESTDIR)$(SYSTEMDUNITDIR)/proxsmtpd.service
	chmod 644 $(DESTDIR)$(SYSTEMDUNITDIR)/proxsmtpd.service
	@$(INSTALL_PYTHON) -c 'import configobj, daemon, setproctitle, prctl' 2>/dev/null || \
	  echo "warning: $(INSTALL_PYTHON) lacks proxsmtpd's dependencies: run 'make install-deps'" \
	    "or install with INSTALL_PYTHON=<a python that has them> (see README.md)" >&2
	@if [ -z "$(DESTDIR)" ]; then \
	  echo; \
	  echo "installed.  $(SYSCONFDIR)/proxsmtpd.conf listens on 127.0.0.1:10025 and relays to"; \
	  echo "127.0.0.1:10026; edit it to suit (see proxsmtpd.conf(5)).  Next:"; \
	  echo "  1. an account for User: (recommended), then uncomment 'User: proxsmtpd' there:"; \
	  echo "       adduser --system --no-create-home --group proxsmtpd"; \
	  echo "  2. check the configuration:  $(SBINDIR)/proxsmtpd -t -f $(SYSCONFDIR)/proxsmtpd.conf"; \
	  echo "  3. start it with systemd:"; \
	  case " $(SYSTEMD_PATHS) " in *" $(SYSTEMDUNITDIR) "*) ;; *) \
	    echo "       systemctl link $(SYSTEMDUNITDIR)/proxsmtpd.service   # systemd does not look in $(SYSTEMDUNITDIR)";; \
	  esac; \
	  echo "       systemctl daemon-reload && systemctl enable --now proxsmtpd"; \
	  if [ "$(INITDIR)" = /etc/init.d ]; then \
	    echo "     or with SysV init:  update-rc.d proxsmtpd defaults && service proxsmtpd start"; \
	  else \
	    echo "     or with the init script:  $(INITDIR)/proxsmtpd start"; \
	  fi; \
	fi

# Debian's packages of the dependencies, for INSTALL_PYTHON=/usr/bin/python3.
install-deps:
	apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(RUNTIME_DEBS)

# Everything install added except the configuration file, and the directories
# it created once they are empty (deepest first).
uninstall:
	rm -f $(DESTDIR)$(SBINDIR)/proxsmtpd
	rm -f $(addprefix $(DESTDIR)$(LIBDIR)/,$(wildcard proxsmtp/*.py proxsmtp/*/*.py))
	rm -rf $(DESTDIR)$(LIBDIR)/proxsmtp/__pycache__ $(addsuffix /__pycache__,$(addprefix $(DESTDIR)$(LIBDIR)/proxsmtp/,$(ROOMS)))
	rm -f $(DESTDIR)$(MANDIR)/man8/proxsmtpd.8 $(DESTDIR)$(MANDIR)/man5/proxsmtpd.conf.5
	rm -f $(addprefix $(DESTDIR)$(DATADIR)/,$(EXAMPLES) proxsmtpd.conf proxsmtpd.default \
	  grafana-dashboard.json)
	rm -f $(DESTDIR)$(INITDIR)/proxsmtpd $(DESTDIR)$(SYSTEMDUNITDIR)/proxsmtpd.service
	@dirs=$$(sort -r $(DESTDIR)$(CREATED) 2>/dev/null); rm -f $(DESTDIR)$(CREATED); \
	for d in $$dirs $(addprefix $(LIBDIR)/proxsmtp/,$(ROOMS)) $(LIBDIR)/proxsmtp $(LIBDIR) $(DATADIR); do \
	  rmdir "$(DESTDIR)$$d" 2>/dev/null && echo "removed directory $(DESTDIR)$$d"; \
	done; true
	@echo "kept $(DESTDIR)$(SYSCONFDIR)/proxsmtpd.conf"
