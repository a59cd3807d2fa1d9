"""Is training healthy? What a rank's epoch counted on the device (summed loss, images, the
first batch whose loss was not finite), and the TrainingDiverged error that names where the
loss or the weights left the finite numbers, with the last good checkpoint."""

from __future__ import annotations

from pathlib import Path

import torch

from cityseg.errors import TrainingDiverged
from cityseg.runtime.distributed import World


class EpochTally:
    """What this rank's epoch has counted, on the device: summed loss, images, first bad batch."""

    def __init__(self, carried_loss: float, device: torch.device) -> None:
        self.loss = torch.full((), carried_loss, dtype=torch.float64, device=device)
        self.first_bad = torch.zeros((), dtype=torch.int64, device=device)  # 1-based; 0: none
        self.seen = 0
        self.known_bad = 0  # first_bad as last read on the host (with the progress bar)

    def add(self, loss: torch.Tensor, batch: int, images: int) -> None:
        self.first_bad = torch.where((self.first_bad == 0) & ~torch.isfinite(loss), batch,
                                     self.first_bad)
        self.loss += loss.double() * images
        self.seen += images

    def sums(self) -> torch.Tensor:
        """(2,) float64 on the device: summed loss and images, ready to all-reduce."""
        return torch.stack([self.loss, torch.tensor(float(self.seen), dtype=torch.float64,
                                                    device=self.loss.device)])

    def bad_slots(self, world: World) -> torch.Tensor:
        """(world,) float64 on the device: this rank's first bad batch in its own slot, ready
        to all-reduce."""
        slots = torch.zeros(world.size, dtype=torch.float64, device=self.first_bad.device)
        slots[world.rank] = self.first_bad.double()
        return slots


def diverged(epoch: int, steps: list[float], *, last: Path, world: World) -> TrainingDiverged:
    """steps: per rank, the first batch (from 1) with a non-finite loss, or 0; all 0: the loss
    stayed finite but the weights did not (an overflowing update). `last`: the run's last.pt."""
    kept = (f"the last good checkpoint is {last}" if last.exists()
            else "no checkpoint was written yet")
    bad = [(int(step), rank) for rank, step in enumerate(steps) if step > 0]
    if bad:
        step, rank = min(bad)
        where = f" on rank {rank}" if world.distributed else ""
        what = (f"training loss became NaN or infinite{where} at epoch {epoch}, step {step} "
                f"(batch {step} of that epoch, counting from 1)")
    else:
        what = f"model weights became NaN or infinite in epoch {epoch}"
    return TrainingDiverged(f"{what}; {kept}. Lower optimizer.lr, set trainer.grad_clip_norm, "
                            f"or check the data")
