"""The processes: command line, configuration, master and workers, logging, metrics."""
