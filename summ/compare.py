"""`python -m summ.compare FOLDER ...`: the comparison table CLI (summ-compare), kept at its first
name. The table itself: summ/reports/compare.py."""
import sys

from summ.reports.compare import main

if __name__ == "__main__":
    sys.exit(main())
