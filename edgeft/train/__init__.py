"""Stage 1 (head on frozen features) and stage 2 (top layers unfrozen), their callbacks, distribution, report.md.
May import edgeft.run, nn, data, core; never a later stage (the pipeline runs QAT after training).
"""
