"""The reproduction harness (``pip install topodecorr[experiments]``): datasets, networks,
the paper's training protocol, sweeps in a SQLite database, statistics, report and the
``topodecorr`` command line. The core package never imports this subpackage."""
