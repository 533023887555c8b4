"""Early stopping on a validation metric, and the run's best value (for the best checkpoint).

Patience counts evaluations (one per epoch unless ``config.eval_every_steps`` is set). Stopping
ends the *current phase*; the run moves on to the next phase (the seed's staged recipe: train the
head until it plateaus, then unfreeze). The phase's best is reset at every phase start; the run's
best (over all phases) decides which checkpoint the final test evaluation uses.
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass
class EarlyStopping:
    metric: str = "val_accuracy"  # "val_accuracy" (max) or "val_loss" (min).
    patience: int = 3
    min_delta: float = 0.0
    phase_best: float | None = None
    phase_best_step: int = -1  # Step of the phase's best (what restore_best restores).
    bad_evals: int = 0
    run_best: float | None = None
    run_best_step: int = -1

    def _better(self, value: float, ref: float | None, delta: float) -> bool:
        if ref is None:
            return True
        if self.metric.endswith("loss"):
            return value < ref - delta
        return value > ref + delta

    def update(self, value: float, step: int) -> tuple[bool, bool]:
        """Record one evaluation; return (new run best, phase should stop)."""
        if self._better(value, self.phase_best, self.min_delta):
            self.phase_best, self.bad_evals, self.phase_best_step = value, 0, step
        else:
            self.bad_evals += 1
        run_improved = self._better(value, self.run_best, 0.0)
        if run_improved:
            self.run_best, self.run_best_step = value, step
        return run_improved, self.bad_evals >= self.patience

    @property
    def exhausted(self) -> bool:
        """True when the phase has used up its patience (the phase should have stopped)."""
        return self.bad_evals >= self.patience

    def start_phase(self) -> None:
        """Forget the phase's best and patience (the run's best is kept)."""
        self.phase_best, self.bad_evals, self.phase_best_step = None, 0, -1

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EarlyStopping":
        return cls(**d)
