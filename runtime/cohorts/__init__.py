"""Cohorts of slides: the units of work and their resume keys (`units.py`), one unit classified and one slide's
outputs made and written (`work.py`), the local and Ray pools that run the units (`pools.py`), and the cohort's
table and versions (`table.py`). The CLI is `runtime/apps/cohort.py`; slides themselves are `runtime/slides/`."""
