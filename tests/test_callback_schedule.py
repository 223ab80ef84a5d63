"""The every-N-validations counter shared by the TPR-FPR, sample-image and inpainting callbacks."""
from types import SimpleNamespace

import pytest

from callbacks.inpainting import InpaintingCallback
from callbacks.sample_images import SampleImagesCallback
from callbacks.schedule import EveryNValidations
from callbacks.tpr_fpr import TprFprCallback

SANITY, REAL = SimpleNamespace(sanity_checking=True), SimpleNamespace(sanity_checking=False)


def test_every_third_real_run_and_sanity_checks_never_count():
    schedule = EveryNValidations(3)
    runs = [SANITY, REAL, REAL, SANITY, REAL, REAL, REAL, REAL]
    assert [schedule.due(t) for t in runs] == [False, False, False, False, True, False, False, True]
    assert schedule.runs == 6


def test_zero_disables_and_negative_is_refused():
    off = EveryNValidations(0)
    assert not any(off.due(REAL) for _ in range(5))
    with pytest.raises(ValueError, match="every_n_val_epochs must be >= 0"):
        EveryNValidations(-1)


@pytest.mark.parametrize("make", [lambda n: TprFprCallback(every_n_val_epochs=n),
                                  lambda n: SampleImagesCallback(every_n_val_epochs=n),
                                  lambda n: InpaintingCallback(every_n_val_epochs=n)])
def test_the_callbacks_share_it(make):
    callback = make(2)
    assert isinstance(callback.schedule, EveryNValidations) and callback.schedule.n == 2
