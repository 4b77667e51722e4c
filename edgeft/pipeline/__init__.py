"""The orchestrators: finetune (train -> optional QAT -> reports) and the gated export (build -> gate -> publish).
May import every stage package below; no stage imports this one, so no stage calls the next.
"""
