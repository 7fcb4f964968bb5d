"""reproduce.py's package: tables.py (the tables, their cells and stages), scripts.py (what each
script's stage leaves behind and how it resumes), scheduler.py (the stage graph, run side by side),
launchers.py (--launcher slurm / submitit-local: each stage a submitit job, --status), jobs.py (what
such a job runs), results.py (logs read, mean and std over seeds, md / csv / png), command.py (the
command line)."""
