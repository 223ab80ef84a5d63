"""train.py checks its run folder before any work (issue 30): a log_root or run folder that cannot be
created or written is one line naming it and exit code 2, before the data is prepared or a model built."""
import pytest

import train as train_script
from tests.helpers.runs import tiny_run_overrides


@pytest.mark.parametrize("blocked", ["log_root", "run_dir"])
def test_unwritable_run_folder_is_one_line_before_any_work(tmp_path, capsys, blocked):
    data = tmp_path / "toy" / "toy-pipe"  # missing: the toy kind would write it first
    log_root = tmp_path / "runs"
    if blocked == "log_root":
        log_root.write_text("a file, not a folder")
    else:
        (log_root / "toy_pretrain").mkdir(parents=True)
        (log_root / "toy_pretrain" / "default").write_text("a file, not a folder")
    code = train_script.main(["experiment=toy_pretrain", "data.kind=toy"] + tiny_run_overrides(data, log_root))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: run folder (log_root/experiment/run_name) ") and "not a folder" in err, err
    assert str(log_root) in err and not data.parent.exists()
