"""Stage 1 (head on cached features of augmented views, its knobs chosen by cross-validation) and stage 2 (top blocks unfrozen), the recipe's size rules, callbacks, distribution, report.md.
May import edgeft.run, nn, data, core; never a later stage (the pipeline runs QAT after training).
"""
