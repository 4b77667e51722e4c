"""The search's trial bookkeeping, in Optuna (ask-and-tell).

One Optuna trial per (candidate, rung): rung 0 is stage 1, rung 1 stage 2, rung 2 the shipped
file (export + parity gate + its accuracy by its runtime). The coordinator enqueues a rung's
trials (`Study.enqueue_trial`: WAITING); workers claim them with `Study.ask()`, which moves one
WAITING trial to RUNNING atomically in the storage (two workers never get the same one), and
finish them with `Study.tell()`. Halving is synchronous (a rung starts when the last one ended),
so Optuna's asynchronous pruners are not used; its storage gives resume and several processes
or machines: a journal file in the search directory by default (several local processes may
share it), or any database URL (`--storage`).

A killed worker leaves its trial RUNNING. Each worker beats a heartbeat (user attribute) every
HEARTBEAT_S; on resume, or while waiting, a RUNNING trial whose process is gone from this host,
or whose heartbeat is older than STALE_S, is told FAIL (with no reason: stale) and enqueued again: the
candidate's run directory is resumable, so nothing finished is redone.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

HEARTBEAT_S = 20.0
STALE_S = 180.0
RUNGS = ("stage1", "stage2", "shipped")


def _optuna():
    import logging

    import optuna

    optuna.logging.set_verbosity(logging.WARNING)
    return optuna


def open_storage(spec: str):
    """A journal file path, or a database URL (sqlite:///..., postgresql://...)."""
    optuna = _optuna()
    if "://" in spec:
        return optuna.storages.RDBStorage(spec)
    from optuna.storages.journal import JournalFileBackend

    Path(spec).parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(spec)))


class Trials:
    def __init__(self, storage: str, study_name: str, candidate_ids: list[str]):
        optuna = _optuna()
        self.optuna = optuna
        self.State = optuna.trial.TrialState
        self.ids = sorted(candidate_ids)
        self.study = optuna.create_study(storage=open_storage(storage), study_name=study_name,
                                         direction="maximize", load_if_exists=True,
                                         sampler=optuna.samplers.RandomSampler(seed=0))

    # ------------------------------------------------------------------ reading
    def _ours(self, states=None):
        out = []
        for t in self.study.get_trials(deepcopy=False, states=states):
            fixed = t.system_attrs.get("fixed_params", {})
            cand, rung = t.params.get("candidate", fixed.get("candidate")), t.params.get("rung", fixed.get("rung"))
            if cand is not None and rung is not None and not t.user_attrs.get("stray"):
                out.append((cand, int(rung), t))
        return out

    def results(self, rung: int) -> dict[str, object]:
        """{candidate: its COMPLETE FrozenTrial} for `rung`."""
        return {c: t for c, r, t in self._ours((self.State.COMPLETE,)) if r == rung}

    def failures(self, rung: int) -> dict[str, object]:
        """{candidate: FAIL trial} for trials that failed for a reason (`fail`); a stale trial, told
        FAIL without one, is run again."""
        return {c: t for c, r, t in self._ours((self.State.FAIL,)) if r == rung and "reason" in t.user_attrs}

    def pending(self, rung: int) -> list[tuple[str, object]]:
        return [(c, t) for c, r, t in self._ours((self.State.WAITING, self.State.RUNNING)) if r == rung]

    # ------------------------------------------------------------------ writing
    def enqueue(self, rung: int, candidates: list[str]) -> int:
        """WAITING trials for the candidates of `rung` that are neither done, failed nor queued."""
        done = set(self.results(rung)) | set(self.failures(rung)) | {c for c, _ in self.pending(rung)}
        n = 0
        for c in candidates:
            if c not in done:
                self.study.enqueue_trial({"candidate": c, "rung": rung})
                n += 1
        return n

    def recover_stale(self) -> list[str]:
        """RUNNING trials whose worker is gone: told FAIL (marked stale) and enqueued again."""
        host, now, again = socket.gethostname(), time.time(), []
        for c, r, t in self._ours((self.State.RUNNING,)):
            a = t.user_attrs
            beat = a.get("heartbeat", t.datetime_start.timestamp() if t.datetime_start else now)
            gone = a.get("host") == host and a.get("pid") is not None and not _alive(int(a["pid"]))
            if gone or now - beat > STALE_S:
                self.study.tell(t.number, state=self.State.FAIL, skip_if_finished=True)
                self.study.enqueue_trial({"candidate": c, "rung": r})
                again.append(f"{c} ({RUNGS[r]})")
        return again

    def claim(self):
        """(candidate, rung, trial) of one WAITING trial, now RUNNING and ours; None when none waits."""
        while True:
            waiting = {t.number for t in self.study.get_trials(deepcopy=False, states=(self.State.WAITING,))}
            if not waiting:
                return None
            trial = self.study.ask()
            if trial.number not in waiting:   # another worker took the last one first: ask made a new trial
                trial.set_user_attr("stray", True)
                self.study.tell(trial, state=self.State.FAIL)
                continue
            cand = trial.suggest_categorical("candidate", self.ids)
            rung = trial.suggest_int("rung", 0, len(RUNGS) - 1)
            trial.set_user_attr("host", socket.gethostname())
            trial.set_user_attr("pid", os.getpid())
            trial.set_user_attr("heartbeat", time.time())
            return cand, rung, trial

    def heartbeat(self, trial) -> "Heartbeat":
        return Heartbeat(trial)

    def complete(self, trial, value: float, attrs: dict) -> None:
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        self.study.tell(trial, value)

    def fail(self, trial, reason: str, attrs: dict | None = None) -> None:
        for k, v in {**(attrs or {}), "reason": reason}.items():
            trial.set_user_attr(k, v)
        self.study.tell(trial, state=self.State.FAIL)


class Heartbeat:
    """A daemon thread beating the trial's heartbeat while its work runs."""

    def __init__(self, trial):
        self.trial, self._stop = trial, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(HEARTBEAT_S):
            try:
                self.trial.set_user_attr("heartbeat", time.time())
            except Exception:   # the storage busy or gone for a moment: the next beat tries again
                pass

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False   # this process is starting the search anew: nothing of ours is running yet
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
