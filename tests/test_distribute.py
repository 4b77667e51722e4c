"""tf.distribute on CPU: MirroredStrategy over two logical devices, two workers on 127.0.0.1."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO, TINY, run_cli
from edgeft.core import rundir

pytestmark = pytest.mark.slow


def _tiny_flags(**over):
    settings = {**TINY, **over}
    return [f"--{k.replace('_', '-')}={v}" for k, v in settings.items()]


@pytest.mark.timeout(600)
def test_mirrored_on_two_cpus_matches_default(tmp_path, image_folder, demo_weights):
    """Same global batch (2 replicas x 8 = 16) and seed: same result within a tolerance.

    Not bit-identical: gradients are summed across replicas in another order and each replica
    draws its own dropout masks, so small differences are expected.
    """
    script = textwrap.dedent(f"""
        import json, os
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import edgeft, logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")   # the library's lines
        base = {{"folder": {str(image_folder)!r}, "weights": {demo_weights!r}, **{TINY!r},
                "head_epochs": 6, "finetune_epochs": 1, "test_split": 0.0}}
        out = {{}}
        for strategy, batch in (("default", 16), ("mirrored", 8)):
            r = edgeft.finetune({{**base, "strategy": strategy, "batch_size": batch}},
                                out={str(tmp_path)!r} + "/" + strategy)
            out[strategy] = {{"head_acc": r.metrics["head"]["val_accuracy"], "head_loss": r.metrics["head"]["val_loss"],
                             "ft_loss": r.metrics["finetune"]["val_loss"],
                             "kernel": r.model.get_layer("predictions").kernel.numpy().tolist()}}
        print("RESULT" + json.dumps(out))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=580,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, r.stderr[-3000:]
    res = json.loads(line[len("RESULT"):])
    d, m = res["default"], res["mirrored"]
    assert "2 replicas" in r.stdout or "replicas: 2" in r.stdout
    assert abs(d["head_acc"] - m["head_acc"]) <= 0.1
    assert abs(d["head_loss"] - m["head_loss"]) <= 0.1 * max(1.0, d["head_loss"])
    assert abs(d["ft_loss"] - m["ft_loss"]) <= 0.1 * max(1.0, d["ft_loss"])
    kd, km = np.asarray(d["kernel"]), np.asarray(m["kernel"])
    assert np.linalg.norm(kd - km) <= 0.2 * np.linalg.norm(kd)


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# the default recipe's stage 1 (policy, smoothing and head lr left at auto: the choice runs)
AUTO_STAGE1 = {k: v for k, v in TINY.items() if k not in ("recipe", "head", "dense", "dropout", "lr_head")}


@pytest.mark.timeout(600)
def test_two_workers_learn_like_one_process_and_leave_exactly_one_run_dir(tmp_path, image_folder, demo_weights):
    """Two workers on 127.0.0.1 with the default recipe: stage 1 is one process's cached-feature
    stage 1 (the choice included) on the chief, so its head learns as one process with the same
    global batch learns (issue 26: it used to train end to end on fixed settings and learn little)."""
    import edgeft

    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    out = tmp_path / "runs" / "mw"
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "TMPDIR": str(scratch), "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "edgeft", "finetune", str(image_folder), "--weights", demo_weights,
               "--out", str(out), "--strategy", "multiworker",
               *[f"--{k.replace('_', '-')}={v}" for k, v in {**AUTO_STAGE1, "head_epochs": 8, "finetune_epochs": 2,
                                                              "batch_size": 8}.items()]]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    # meanwhile, one process with the same global batch (2 workers x 8), stage 1 only
    one = edgeft.finetune({"folder": str(image_folder), "weights": demo_weights, **AUTO_STAGE1, "head_epochs": 8,
                           "finetune_epochs": 0, "batch_size": 16}, out=tmp_path / "one")
    results = [p.communicate(timeout=560) for p in procs]
    for p, (so, se) in zip(procs, results):
        assert p.returncode == 0, se[-3000:]
    head = rundir.read_json(out / "metrics.json")["head"]
    chance = 1 / 3
    assert head["val_accuracy"] >= 2 * chance, (head["val_accuracy"], one.metrics["head"]["val_accuracy"])
    assert abs(head["val_accuracy"] - one.metrics["head"]["val_accuracy"]) <= 0.10
    # the same stage 1 as one process, not merely as good: the same validation loss
    assert head["val_loss"] == pytest.approx(one.metrics["head"]["val_loss"], abs=0.02)
    assert len(head["choice"]["scores"]) == 12 and head["views"] > 1   # measured on cached views
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["mw"]
    rows = rundir.read_csv(out / "history.csv")
    assert [(r["stage"], int(r["epoch"])) for r in rows] == [("head", e) for e in range(1, 9)] + [
        ("finetune", 1), ("finetune", 2)]
    assert (out / "model.keras").is_file() and "finetune" in rundir.read_json(out / "metrics.json")
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("edgeft-worker-")], list(scratch.iterdir())
    assert "2 replicas" in results[0][0]


def test_mixed_precision_on_cpu_is_refused(image_folder):
    r = run_cli("finetune", image_folder, "--weights", "none", "--mixed-precision", env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--mixed-precision needs a GPU" in r.stderr


@pytest.mark.parametrize("tf_config", [None, "{not json", json.dumps({"cluster": {}})])
def test_multiworker_needs_a_valid_tf_config(image_folder, tf_config):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    if tf_config is not None:
        env["TF_CONFIG"] = tf_config
    r = subprocess.run([sys.executable, "-m", "edgeft", "finetune", str(image_folder), "--weights", "none",
                        "--strategy", "multiworker"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "TF_CONFIG" in r.stderr and "Traceback" not in r.stderr


MW_EPOCHS = 4   # killed once 2 are done: it must die mid-run, with epochs left for the resume


def _start_workers(out, image_folder, demo_weights, scratch, extra):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for index in range(2):
        env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}}),
               "TMPDIR": str(scratch), "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "edgeft", "finetune", "--out", str(out), *extra]
        if "--resume" not in extra:
            cmd += [str(image_folder), "--weights", demo_weights, "--strategy", "multiworker",
                    *_tiny_flags(head_epochs=2, finetune_epochs=MW_EPOCHS, batch_size=8)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env))
    return procs


@pytest.mark.timeout(600)
def test_multiworker_resume_after_sigkill(tmp_path, image_folder, demo_weights):
    import signal
    import time

    out, scratch = tmp_path / "runs" / "mw", tmp_path / "tmp"
    scratch.mkdir()
    procs = _start_workers(out, image_folder, demo_weights, scratch, [])
    done, deadline = 0, time.time() + 400
    while time.time() < deadline and all(p.poll() is None for p in procs):
        done = (rundir.read_json(out / "state.json", {}) or {}).get("finetune_epochs_done", 0)
        if done >= 2:
            break
        time.sleep(0.05)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(60)
    assert 2 <= done < MW_EPOCHS and all(p.returncode == -signal.SIGKILL for p in procs), \
        [(p.returncode, p.stderr.read()[-1500:]) for p in procs]
    procs = _start_workers(out, image_folder, demo_weights, scratch, ["--resume"])
    results = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    rows = rundir.read_csv(out / "history.csv")
    assert [int(r["epoch"]) for r in rows if r["stage"] == "finetune"] == list(range(1, MW_EPOCHS + 1))
    assert rundir.read_json(out / "state.json")["finetune_epochs_done"] == MW_EPOCHS


@pytest.mark.timeout(600)
def test_mixed_precision_run_exports_and_passes_parity(tmp_path, image_folder, demo_weights):
    """The --mixed-precision path end to end, on CPU: TensorFlow is told it sees a GPU (edgeft
    refuses float16 on a CPU-only machine), so training runs the mixed_float16 policy for real.
    model.keras must come out float32, QAT must run, and the TFLite file must pass the parity gate
    (before the fix, TFLite could not convert the saved float16 layers at all)."""
    run = tmp_path / "mp"
    script = textwrap.dedent(f"""
        import json, os
        os.environ["TF_USE_LEGACY_KERAS"] = "1"
        import tensorflow as tf
        real = tf.config.list_physical_devices
        tf.config.list_physical_devices = lambda kind=None: ["fake GPU"] if kind == "GPU" else real(kind)
        import edgeft, logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")   # the library's lines
        from edgeft._keras import keras
        from edgeft.pipeline.exporter import export
        r = edgeft.finetune({{"folder": {str(image_folder)!r}, "weights": {demo_weights!r}, **{TINY!r},
                             "finetune_epochs": 1, "mixed_precision": True, "qat_epochs": 1, "qat_compare": False, "parity_inputs": 100,
                             "client_inputs": 0}}, out={str(run)!r})
        trained = {{layer.dtype_policy.name for layer in r.model.layers}}
        policy_after = keras.mixed_precision.global_policy().name
        report = export({str(run)!r}, tflite=["float"])
        print("RESULT" + json.dumps({{"trained": sorted(trained), "policy_after": policy_after,
                                     "acc": r.metrics["finetune"]["val_accuracy"], "passed": report["passed"],
                                     "made_from": [row["made_from"] for row in report["rows"]]}}))
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=500,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULT")), None)
    assert line, r.stdout[-1500:] + r.stderr[-3000:]
    res = json.loads(line[len("RESULT"):])
    assert "mixed_float16" in res["trained"]          # it really trained in float16
    assert res["policy_after"] == "float32"            # and left the process as it found it
    assert res["acc"] >= 0.6
    assert "qat: runs in float32" in r.stdout
    assert res["passed"] and res["made_from"] == ["-"]
    assert rundir.read_json(run / "metrics.json")["qat"]["epochs"] == 1
    from edgeft.nn.model import load_model

    assert {layer.dtype_policy.name for layer in load_model(run / "model.keras").layers} == {"float32"}


@pytest.mark.timeout(300)
def test_xla_compiles_the_train_steps_and_still_learns(tmp_path, image_folder, demo_weights):
    """--xla on CPU (XLA's CPU backend): both stages compile their steps and the model learns."""
    import edgeft

    r = edgeft.finetune({"folder": str(image_folder), "weights": demo_weights, **TINY, "xla": True},
                        out=tmp_path / "xla")
    assert r.model.jit_compile is True
    assert r.metrics["head"]["val_accuracy"] >= 0.8 and r.metrics["finetune"]["val_accuracy"] >= 0.8
