"""Bad input: a one-line error and exit code 2, never a traceback."""
import pytest

from conftest import run_cli


def _assert_clean_error(r, text):
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("edgeft")]
    assert len(lines) == 1 and text in lines[0], r.stderr[-2000:]


@pytest.mark.parametrize("args, text", [
    (["finetune", "/no/such/folder", "--weights", "none"], "not found"),
    (["finetune", "--backbone", "resnet9"], "unknown backbone"),
    (["finetune", "--head", "max"], "invalid choice"),
    (["finetune", "--lr-head", "fast"], "invalid float"),
    (["finetune", "--config", "/no/such.yaml"], "config file not found"),
    (["finetune", "--resume"], "--resume needs --out"),
])
def test_cli_errors_exit_2(args, text):
    _assert_clean_error(run_cli(*args), text)


def test_folder_errors_exit_2(tmp_path):
    (tmp_path / "only_one").mkdir()
    _assert_clean_error(run_cli("finetune", tmp_path, "--weights", "none"), "at least 2 class")


def test_existing_run_dir_is_not_overwritten(tmp_path, image_folder):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    _assert_clean_error(run_cli("finetune", image_folder, "--weights", "none", "--out", out), "already exists")
    _assert_clean_error(run_cli("finetune", image_folder, "--weights", "none", "--out", out, "--overwrite"),
                        "not an edgeft run directory")
    assert (out / "precious.txt").read_text() == "keep me"


def test_bad_config_yaml_exit_2(tmp_path):
    bad = tmp_path / "run.yaml"
    bad.write_text("backbone: [unclosed\n")
    _assert_clean_error(run_cli("finetune", "--config", bad), "not valid YAML")
    bad.write_text("lr_hed: 0.1\n")
    _assert_clean_error(run_cli("finetune", "--config", bad), "unknown config key")


def test_corrupt_model_file_is_a_user_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  backbone: mobilenet_v2\n")
    (run / "model.keras").write_bytes(b"PK\x03\x04 this is not a keras file")
    _assert_clean_error(run_cli("evaluate", run / "model.keras", tmp_path), "cannot load")
    _assert_clean_error(run_cli("export", run), "cannot load")


def test_bad_input_found_before_training_leaves_no_run_dir(tmp_path, image_folder, trained_run):
    """A typo in --unfreeze fails before stage 1 (not after it) and leaves nothing behind; with
    --overwrite, the old run is only replaced once the new one is known to start."""
    tiny = ["--weights", "none", "--alpha", "0.35", "--image-size", "32", "--head-epochs", "1"]
    out = tmp_path / "new"
    r = run_cli("finetune", image_folder, *tiny, "--unfreeze", "block_99", "--out", out)
    _assert_clean_error(r, "--unfreeze 'block_99'")
    assert "stage 1" not in r.stdout
    assert not out.exists()
    old = tmp_path / "old"
    import shutil
    shutil.copytree(trained_run.run_dir, old)
    before = sorted(p.name for p in old.iterdir())
    _assert_clean_error(run_cli("finetune", image_folder, *tiny, "--unfreeze", "1.5", "--out", old, "--overwrite"),
                        "--unfreeze fraction")
    assert sorted(p.name for p in old.iterdir()) == before


def test_version_names_the_stack():
    r = run_cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("edgeft 0.")
    assert "tensorflow 2." in r.stdout and "onnxruntime" in r.stdout and len(r.stdout.strip().splitlines()) == 1
