"""`python -m summ.ensemble RUN_DIR ...`: ensembles of finished runs (summ-ensemble), kept at its
first name. The ensembles themselves: summ/inference/ensemble.py."""
import sys

from summ.inference.ensemble import main

if __name__ == "__main__":
    sys.exit(main())
