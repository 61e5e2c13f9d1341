"""Reports of run folders: runs read back from their results files (:mod:`reports.runs`), runs grouped into experiments
(:mod:`reports.experiments`), the tables
(:mod:`reports.tables`) and the figures (:mod:`reports.plots`). ``scripts/report.py`` is the command."""
