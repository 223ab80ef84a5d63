"""Which validation runs a periodic callback acts on: the one counter the callbacks share."""
from __future__ import annotations

__all__ = ["EveryNValidations"]


class EveryNValidations:
    """Counts real validation runs and says whether the current one is an every-``n``-th one.

    Sanity-check runs (Lightning's ``num_sanity_val_steps``) are never counted, so a callback
    acts on validation runs n, 2n, ... of training whatever the sanity-check setting; ``n = 0``
    turns the callback off. Call `due` exactly once per validation run.
    """

    def __init__(self, n: int):
        if n < 0:
            raise ValueError(f"every_n_val_epochs must be >= 0 (0 disables), got {n}")
        self.n = n
        self.runs = 0

    def due(self, trainer) -> bool:
        """Count this validation run (unless it is a sanity check); True when it is an n-th one."""
        if trainer.sanity_checking or not self.n:
            return False
        self.runs += 1
        return self.runs % self.n == 0
