"""The training infrastructure callbacks on their own (end-to-end behaviour: test_train.py,
test_preemption.py, test_resume_exact.py)."""
import os
import random
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from callbacks.checkpointing import AtomicCheckpointIO, FinalCheckpoint
from callbacks.preemption import Preemption
from callbacks.reproducible import ReproducibleSteps


class _Model:
    cfg = SimpleNamespace(freeze_text_encoder=True)

    def __init__(self):
        self.encoded = []

    def encode_texts(self, categories):
        self.encoded.append(list(categories))

    @property
    def cached_categories(self):  # as the real model: a category once encoded is cached
        return {c for batch in self.encoded for c in batch}


def _draws_after_batch_start(callback, epoch, batch_idx, rank, consume_before: int):
    torch.rand(consume_before)
    np.random.rand(consume_before)
    random.random()
    trainer = SimpleNamespace(current_epoch=epoch, global_rank=rank)
    module = SimpleNamespace(model=_Model())
    callback.on_train_batch_start(trainer, module, {"category": ["car", "bird", "car"]}, batch_idx)
    return torch.rand(3), np.random.rand(3), random.random(), module.model.encoded


def test_step_randomness_depends_only_on_seed_epoch_batch_rank():
    steps = ReproducibleSteps(seed=5)
    a = _draws_after_batch_start(steps, 1, 7, 0, consume_before=3)
    b = _draws_after_batch_start(steps, 1, 7, 0, consume_before=1000)  # other RNG use in between
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    for other in [(2, 7, 0), (1, 8, 0), (1, 7, 1)]:
        assert not torch.equal(a[0], _draws_after_batch_start(steps, *other, consume_before=3)[0])
    assert not torch.equal(a[0], _draws_after_batch_start(ReproducibleSteps(6), 1, 7, 0, consume_before=3)[0])
    assert a[3] == [["car"], ["bird"]]  # frozen text features cached one category at a time


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_stop_signals_are_routed_to_the_flag_only_while_training(tmp_path, signum):
    seen = []
    previous = signal.signal(signum, lambda *a: seen.append("outer"))
    try:
        preemption = Preemption(tmp_path / "last.ckpt")
        with preemption.handling_signals():
            os.kill(os.getpid(), signum)
            assert preemption.requested and preemption.signum == signum and seen == []
            if signum == signal.SIGINT:  # a second Ctrl-C interrupts at once
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signum)
        os.kill(os.getpid(), signum)
        assert seen == ["outer"]  # the caller's handler is back
    finally:
        signal.signal(signum, previous)


class _Trainer:
    def __init__(self, step, max_steps=-1):
        self.global_step, self.max_steps, self.world_size, self.is_global_zero = step, max_steps, 1, True
        self.should_stop = False
        self.saved = []

    def save_checkpoint(self, path):
        self.saved.append(str(path))


def test_a_stop_signal_saves_at_the_step_boundary_unless_the_run_ends_there_anyway(tmp_path):
    preemption = Preemption(tmp_path / "last.ckpt")
    preemption.request(signal.SIGTERM, None)
    last = _Trainer(step=10, max_steps=10)
    preemption.on_train_batch_end(last, SimpleNamespace(device=torch.device("cpu")), None, None, 9)
    assert last.saved == [] and preemption.stopped_by is None and not last.should_stop  # finished, not stopped
    trainer = _Trainer(step=4, max_steps=10)
    preemption.on_train_batch_end(trainer, SimpleNamespace(device=torch.device("cpu")), None, None, 3)
    assert trainer.saved == [str(tmp_path / "last.ckpt")] and trainer.should_stop
    assert preemption.saved_at == 4 and preemption.stopped_by == "SIGTERM"


def test_final_checkpoint_saves_last_only_when_the_final_step_is_missing(tmp_path):
    callback = FinalCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = _Trainer(step=10)
    callback.on_save_checkpoint(trainer, None, {})
    callback.on_train_end(trainer, None)
    assert trainer.saved == []  # step 10 already saved

    trainer.global_step = 13
    callback.on_train_end(trainer, None)
    assert trainer.saved == [str(tmp_path / "last.ckpt")]

    off = FinalCheckpoint(dirpath=tmp_path, save_last=False)
    off.on_train_end(trainer, None)
    assert trainer.saved == [str(tmp_path / "last.ckpt")]


def test_atomic_checkpoint_io_leaves_no_partial_file(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "sub" / "last.ckpt"
    io.save_checkpoint({"global_step": 4, "weights": torch.arange(3)}, target)
    assert torch.load(target, weights_only=False)["global_step"] == 4
    assert sorted(p.name for p in target.parent.iterdir()) == ["last.ckpt"]
