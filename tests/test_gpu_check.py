"""benchmarks/gpu_check.py keeps working where no GPU is: its CPU quick mode end to end, and the
pieces a GPU run depends on (out-of-memory detection, batch search, the report)."""
import json
import subprocess
import sys

import pytest
import torch

from benchmarks import chip, gpu_check
from tests.helpers import ROOT


@pytest.mark.slow
def test_quick_mode_writes_every_row(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--quick", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["preset"] == "tiny" and result["device"]["type"] == "cpu" and not result["skipped"]
    assert result["failed"] == []
    steps = {(r["variant"], r["precision"], r["batch"]): r for r in result["rows"] if r["section"] == "train step"}
    paths = {(v, "bf16-mixed", b) for v in ("MLE, two passes", "MLE, one pass") for b in ("4", "8", "16")}
    assert set(steps) == {(v, p, "4") for v in ("MLE", "DPO") for p in ("fp32", "bf16-mixed")} | paths | {
        ("DPO, one pass", "bf16-mixed", "4")}
    assert all(r["ms"] > 0 and r["rate"] == pytest.approx(int(r["batch"]) / (r["ms"] / 1e3)) for r in steps.values())
    sampling = [(r["variant"], r["batch"]) for r in result["rows"] if r["section"] == "sampling"]
    assert sampling == [("cascade", "2 img x 100"), ("copied cache", "2 img x 100"),
                        ("cascade", "4 img x 100"), ("copied cache", "4 img x 100")]
    largest = [r for r in result["rows"] if r["section"] == "largest batch"]
    assert [(r["variant"], r["precision"]) for r in largest] == [("MLE", "bf16-mixed"), ("DPO", "bf16-mixed")]
    assert all(r["batch"] == "16" and "--max-batch 16" in r["note"] for r in largest)
    peak = [r for r in result["rows"] if r["section"] == "matmul peak"]
    assert len(peak) == 1 and peak[0]["rate"] > 0 and peak[0]["unit"] == "TFLOP/s"
    assert all("MFU" in r["note"] for key, r in steps.items() if key[0].startswith("MLE"))
    assert not any("MFU" in r["note"] for key, r in steps.items() if key[0].startswith("DPO"))
    sync = {r["variant"]: r["note"] for r in result["rows"] if r["section"] == "sync check"}
    assert set(sync) == {f"{o}, {p}" for o in ("MLE", "DPO") for p in ("two passes", "one pass")}
    assert all(note.startswith("PASS") for note in sync.values()), sync
    fit = [r for r in result["rows"] if r["section"] == "fit loop"]
    assert len(fit) == 1 and fit[0]["batch"] == "4" and fit[0]["precision"] == "fp32" and fit[0]["rate"] > 0
    assert json.loads((tmp_path / "fit_trace.json").read_text())["traceEvents"]
    assert "Self CPU" in (tmp_path / "fit_profile.txt").read_text()
    smoke = [r for r in result["rows"] if r["section"] == "smoke-gpu"]
    assert len(smoke) == 1 and smoke[0]["note"].startswith("PASS") and "smoke-gpu: all parts passed" in smoke[0]["note"]
    assert result["flops_per_sample"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    assert table in proc.stdout and "| train step | DPO | bf16-mixed | 4 |" in table
    assert "Sampling, cascade / copied cache: 2 img x 100:" in table
    assert "train.py fit loop / synthetic MLE step (fp32, batch 4):" in table
    assert "MLE step, two passes / (one pass, compiled one pass, compiled whole step): batch 4: " in table
    assert "DPO / MLE step (bf16-mixed): two passes " in table and "one pass " in table


def test_a_failed_part_fails_the_check(tmp_path, monkeypatch):
    """A sync (or a failed smoke part) is a FAIL row, listed under the table, and exit code 1."""
    rows = [gpu_check.row("sync check", "MLE, one pass", "bf16-mixed", "64",
                          note="FAIL at genloc/likelihood.py:80: synchronizing")]
    result = {"device": {"type": "cpu", "name": "x", "torch": "t"}, "preset": "tiny", "seconds": 1.0,
              "flops_per_sample": 1.0, "skipped": [], "failed": ["sync check (MLE, one pass)"], "rows": rows,
              "settings": {"time_budget_s": 1.0}}
    monkeypatch.setattr(gpu_check, "run", lambda args, device: result)
    assert gpu_check.main(["--quick", "--out", str(tmp_path)]) == 1
    assert "FAILED: sync check (MLE, one pass)" in (tmp_path / "gpu_check.md").read_text()


def test_the_cpu_sync_check_names_the_line_that_reads_back():
    class Reads:
        def step(self, batch, precision):
            pass

        def backward(self, batch, precision):
            torch.ones(2).sum().item()

        def update(self):
            pass

    passed, note = chip.sync_check(Reads(), {}, "fp32", torch.device("cpu"))
    assert not passed and note.startswith("FAIL at tests/test_gpu_check.py:") and "Tensor.item" in note


def test_out_of_memory_is_recognised_and_other_errors_are_not():
    assert gpu_check.out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert gpu_check.out_of_memory(RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling cublasCreate"))
    assert gpu_check.out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: "
                                                "can't allocate memory: you tried to allocate 1099511627776 bytes"))
    assert not gpu_check.out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


class _FakeTrainee:
    """Runs out of memory from a given batch size on, like a GPU would."""

    objective = "mle"

    def __init__(self, limit):
        self.limit, self.sizes, self.resets = limit, [], 0

    def step(self, batch, precision):
        self.sizes.append(len(batch["key"]))
        if len(batch["key"]) > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    def prepare(self, batch, device):
        return batch

    def reset(self, device):
        self.resets += 1


def test_batch_search_doubles_until_out_of_memory_and_recovers():
    trainee = _FakeTrainee(limit=5)
    r = gpu_check.largest_batch(trainee, "fp32", 8, max_batch=64, device=torch.device("cpu"))
    assert trainee.sizes == [1, 2, 4, 8] and trainee.resets == 1
    assert r["batch"] == "4" and r["note"] == "batch 8 ran out of memory"
    capped = gpu_check.largest_batch(_FakeTrainee(limit=100), "fp32", 8, max_batch=8, device=torch.device("cpu"))
    assert capped["batch"] == "8" and capped["note"] == "stopped at --max-batch 8"
    with pytest.raises(RuntimeError, match="shapes"):
        class Broken(_FakeTrainee):
            def step(self, batch, precision):
                raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        gpu_check.largest_batch(Broken(0), "fp32", 8, max_batch=8, device=torch.device("cpu"))


def test_report_ratios_and_bad_arguments(capsys):
    rows = [gpu_check.row("sampling", "cascade", "fp32", "8 img x 100", 10.0, 80000.0, "boxes/s", 3 * 2**30, 2**30),
            gpu_check.row("sampling", "copied cache", "fp32", "8 img x 100", 20.0, 40000.0, "boxes/s",
                          11 * 2**30, 2**30),
            gpu_check.row("sampling", "cascade", "fp32", "64 img x 100", 50.0, 128000.0, "boxes/s", 8 * 2**30, 2**30),
            gpu_check.row("sampling", "copied cache", "fp32", "64 img x 100", note="out of memory")]
    assert gpu_check.sampling_ratios(rows, memory=True) == [
        "8 img x 100: 2.00x boxes/s, 5.0x less peak memory above resident", "64 img x 100: copied cache ran out of memory"]
    assert gpu_check.sampling_ratios(rows, memory=False)[0] == "8 img x 100: 2.00x boxes/s"
    assert gpu_check.precision_ratios(rows) == ""  # no bf16 row
    rows += [gpu_check.row("sampling", "cascade", "bf16", "8 img x 100", 8.0, 100000.0, "boxes/s"),
             gpu_check.row("sampling", "cascade graphed", "bf16", "8 img x 100", 4.0, 200000.0, "boxes/s")]
    assert gpu_check.precision_ratios(rows) == ("\nSampling, cascade bf16 / fp32: 8 img x 100: 1.25x boxes/s"
                                                "\nSampling, graphed bf16 / eager bf16: 8 img x 100: 2.00x boxes/s"
                                                "\nSampling, graphed bf16 / eager fp32: 8 img x 100: 2.50x boxes/s")
    for argv in (["--quick", "--steps", "0"], ["--quick", "--sample-images", "2", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(argv)
        assert exit_info.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args([])
        assert "no CUDA device is visible" in capsys.readouterr().err


def test_the_compiled_step_fit_loop_row_runs_train_py_with_compile_step(tmp_path, monkeypatch):
    """The row's plumbing on the CPU with the compiler left out (compiling takes minutes here): train.py
    runs ``module.compile_step=true`` on OPA-flavour scenes, and the note counts torch._dynamo's graphs."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: compiled.append(fn.__name__) or fn)
    counts = iter(range(0, 100, 2))  # the counter as torch._dynamo would move it: 2 graphs between reads
    monkeypatch.setattr(gpu_check, "graphs_compiled", lambda: next(counts))
    args = gpu_check.parse_args(["--quick", "--out", str(tmp_path)])
    config = gpu_check.LocationModelConfig.preset("tiny", pretrained=False).to_dict()
    r = gpu_check.fit_loop_row("tiny", config, args, torch.device("cpu"), tmp_path, compile_step=True)
    assert compiled == ["grid_losses"]
    assert r["variant"] == "MLE, compiled step, train.py on toy shards" and r["rate"] > 0
    assert r["note"].endswith("OPA-flavour scenes; 6 graphs compiled over the fit loop, 2 while timed")
    assert not (tmp_path / "fit_trace.json").exists()  # the trace is the eager fit loop's
