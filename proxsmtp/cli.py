"""Command line: `proxsmtpd [-d level] [-f configfile] [-p pidfile]`, `-t`, `-v`, `-h`."""

from __future__ import annotations

import getopt
import logging
import os
import sys
from typing import NoReturn

from . import __version__
from .process import config as configuration
from .process import defaults, hostcheck
from .process.log import DEBUG_LEVELS, log, setup_stderr

USAGE = ("usage: proxsmtpd [-d debuglevel] [-f configfile] [-p pidfile]\n"
         "       proxsmtpd -t [-f configfile]\n"
         "       proxsmtpd -v | --version\n"
         "       proxsmtpd -h | --help\n")

HELP = USAGE + """
  -d level       stay in the foreground and log to stderr: 0 errors, 1 warnings,
                 2 notices, 3 connections and messages, 4 the protocol trace
  -f configfile  the configuration file (default: %s)
  -p pidfile     write the process id there (a PidFile: setting wins)
  -t             check the configuration as a start would, then exit:
                 0 if it is fine, 2 (with the reason) if not
  -v, --version  print the version and the default configuration file
  -h, --help     print this help

See proxsmtpd(8) and proxsmtpd.conf(5).
"""


class Options:
    """What the command line asked for."""

    def __init__(self) -> None:
        self.debug: int | None = None         # None: daemonize and use syslog
        self.config_file = defaults.CONFIG_FILE
        self.config_given = False             # -f: the file must exist
        self.pid_file: str | None = None
        self.test = False                     # -t: check the configuration only


def die(message: str, code: int = 2) -> NoReturn:
    sys.stderr.write("proxsmtpd: %s\n" % message)
    sys.exit(code)


def parse_args(argv: list[str]) -> Options:
    """Parse argv (without the program name); exits 0 for -v and -h, 2 on misuse."""
    options = Options()
    try:
        opts, rest = getopt.getopt(argv, "d:f:p:tvh", ["help", "version"])
    except getopt.GetoptError as exc:
        sys.stderr.write("proxsmtpd: %s\n%s" % (exc.msg, USAGE))
        sys.exit(2)
    if rest:
        sys.stderr.write("proxsmtpd: unexpected argument: %s\n%s" % (rest[0], USAGE))
        sys.exit(2)
    for flag, value in opts:
        if flag == "-d":
            if not value.isdigit() or int(value) not in DEBUG_LEVELS:
                die("invalid debug log level (must be between 0 and 4)")
            options.debug = int(value)
        elif flag == "-f":
            options.config_file = value
            options.config_given = True
        elif flag == "-p":
            options.pid_file = value
        elif flag == "-t":
            options.test = True
        elif flag in ("-v", "--version"):
            print("proxsmtpd (version %s)" % __version__)
            print("          (config: %s)" % defaults.CONFIG_FILE)
            sys.exit(0)
        elif flag in ("-h", "--help"):
            sys.stdout.write(HELP % defaults.CONFIG_FILE)
            sys.exit(0)
    return options


def load_config(options: Options) -> configuration.Config:
    """The validated config, its warnings logged; exits 2 on a config error.
    A start and `-t` both come through here: what one refuses, so does the other."""
    required = options.config_given or options.test
    if not required and not os.path.exists(options.config_file):
        log.warning("configuration file not found: %s", options.config_file)
    try:
        config = configuration.load(options.config_file, required=required)
        setting = "-p"
        if "PidFile" in config.named:
            if options.pid_file is not None:
                log.warning("ignoring pid file specified on the command line.")
            options.pid_file = config.PidFile
            setting = "PidFile"
        if options.pid_file:
            hostcheck.check_pid_file(options.pid_file, config, setting)
    except configuration.ConfigError as exc:
        if options.test:
            log.error("%s", exc)
            die("configuration file %s test failed" % options.config_file)
        die(str(exc))
    for warning in config.warnings:
        log.warning("%s", warning)
    return config


def main(argv: list[str] | None = None) -> int:
    options = parse_args(sys.argv[1:] if argv is None else argv)
    setup_stderr(DEBUG_LEVELS[options.debug] if options.debug is not None else DEBUG_LEVELS[1],
                 timestamps=options.debug is not None and not options.test)
    config = load_config(options)
    if options.test:
        print("proxsmtpd: configuration file %s test is successful" % options.config_file)
        return 0
    from .process import master
    try:
        return master.run(config, options)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:    # a bug: say so in one line, not a traceback
        log.critical("unexpected error: %s", exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1


if __name__ == "__main__":
    sys.exit(main())
