"""The evaluation of finished runs, for eval_fid.py --runs and reproduce.py: a run's test split generated with its
best adapter (`heldout`), runs grouped into tables with mean and spread over seeds (`tables`), and the study's
report.md (`report`)."""
