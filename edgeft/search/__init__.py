"""`edgeft search`: the most accurate model that fits the device, measured, not estimated.

Above pipeline/ (it trains, exports and gates candidates through it), below cli/. space.py and
choose.py are TF-free; measure.py builds and times files; trials.py is the Optuna bookkeeping.
"""
