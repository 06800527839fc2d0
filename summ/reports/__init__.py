"""Reports: a sweep's cells, the knee analysis and report, plots, the inference report, compare,
and the summary a run prints."""
