"""The programs: each study trains, measures and writes the results file a notebook reads."""
