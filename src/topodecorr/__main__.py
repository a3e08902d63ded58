"""``python -m topodecorr ...`` runs the ``topodecorr`` command line (needs the ``experiments`` extra).

Kept here, not in ``__init__``, so that importing the core never imports the experiments.
"""

import sys

if __name__ == "__main__":
    from topodecorr.experiments.cli import main

    sys.exit(main())
