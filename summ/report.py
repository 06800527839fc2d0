"""`python -m summ.report SWEEP_DIR`: the knee report CLI (summ-report), kept at its first name.
The report itself: summ/reports/knee_report.py."""
import sys

from summ.reports.knee_report import main

if __name__ == "__main__":
    sys.exit(main())
