"""The one orchestrator of `edgeft finetune`: train (stage 1 + 2) -> optional QAT -> reports.

No stage calls the next one: training returns what it made (`train.stages.Trained`: the run
directory, its splits and data folder, the distribution scope, the metrics so far), and this
module hands it to QAT when the config asks for QAT epochs, then lets training finish (the demo's
transfer check, metrics.json, report.md), holding the run directory's lock from the start of
training to the end. `edgeft.finetune` is `finetune` here.
"""
from __future__ import annotations

import shlex

from pathlib import Path

from edgeft.core import rundir
from edgeft.core.config import EdgeftConfig
from edgeft.data.cache import set_rerun_hint
from edgeft.pipeline.preflight import finished_run, say_finished
from edgeft.pipeline.summary import qat_summary
from edgeft.quantize.qat import run_qat
from edgeft.train.stages import FinetuneResult, finish, train


def finetune(config: EdgeftConfig | dict | None = None, *, out: str | Path | None = None,
             overwrite: bool = False, resume: bool = False, **overrides) -> FinetuneResult:
    """Fine-tunes a backbone on an image folder, then runs QAT when `qat_epochs` > 0; the Python
    API of `edgeft finetune`.

    `config` is an EdgeftConfig or a dict of flat/nested keys; keyword overrides win.
    """
    done = finished_run(out) if resume else None
    if done is not None:   # nothing to continue: every file stays as it is
        say_finished(done)
        return FinetuneResult(done.path, done.read_json(rundir.METRICS, {}), done.model)
    trained = train(config, out=out, overwrite=overwrite, resume=resume, **overrides)
    try:
        # as during training: a corrupt cache row from here on leaves a half-made run, which only
        # --resume continues (it skips the finished stages and runs QAT again)
        set_rerun_hint(f"continue the run with: edgeft finetune --resume --out {shlex.quote(str(trained.run))}")
        if trained.cfg.qat.qat_epochs > 0:
            # every worker runs QAT under the same scope (its collectives must match training's)
            trained.metrics["qat"] = run_qat(trained.handle(), scope=trained.scope)
            if trained.scope.is_chief:   # RUN/qat_summary.json, and the QAT model's row on the console
                qat_summary(trained.run, trained.metrics["qat"])
        return finish(trained)
    finally:
        set_rerun_hint(None)
        trained.release()   # the run directory's lock, held from training to here
