"""What a person sees while training: a Rich progress bar per epoch and an epoch table.

On a terminal: a live bar with loss and images/s, then one table row per epoch (* marks a
new best checkpoint). Not on a
terminal (CI, pipes): no bar, the same rows as plain text, so logs stay readable.
"""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

# metric -> (header, format); sized so a row fits an 80-column log
SUMMARY = {"train/loss": ("train\nloss", ".4f"), "val/loss": ("val\nloss", ".4f"),
           "val/dice": ("dice", ".4f"), "val/iou": ("iou", ".4f"), "val/miou": ("miou", ".4f"),
           "val/precision": ("prec.", ".4f"), "val/recall": ("recall", ".4f"),
           "lr": ("lr", ".1e"), "throughput/img_s": ("img/s", ".1f")}


class NullDisplay:
    """Shows nothing: for tests and library use."""

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None: ...
    def step(self, images: int, loss: float | None, img_per_s: float) -> None: ...
    def epoch_end(self, epoch: int, metrics: dict[str, float], best: bool) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class RichDisplay:
    """Progress bar per epoch (terminal only) and an aligned epoch summary table."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console()
        self.live = self.console.is_terminal
        self.progress: Progress | None = None
        self.task = None
        self._epochs = 0
        self._header_shown = False  # a resumed run starts its table at a later epoch

    def epoch_start(self, epoch: int, epochs: int, steps: int, done: int = 0) -> None:
        self._epochs = epochs
        if not self.live:
            return
        self.progress = Progress(
            TextColumn(f"epoch {epoch}/{epochs}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} img/s"),
            TimeRemainingColumn(), console=self.console, transient=True)
        self.task = self.progress.add_task("train", total=steps, completed=done,
                                           loss="...", speed="...")
        self.progress.start()

    def step(self, images: int, loss: float | None, img_per_s: float) -> None:
        if self.progress is None:
            return
        fields = {"speed": f"{img_per_s:.1f}"}
        if loss is not None:
            fields["loss"] = f"{loss:.4f}"
        self.progress.update(self.task, advance=1, **fields)

    def epoch_end(self, epoch: int, metrics: dict[str, float], best: bool) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
        table = Table(show_header=not self._header_shown, box=None, pad_edge=False,
                      collapse_padding=True, header_style="bold")
        self._header_shown = True
        table.add_column("epoch", width=max(6, 2 * len(str(self._epochs)) + 2), justify="right",
                         no_wrap=True)
        shown = [key for key in SUMMARY if key in metrics]  # the task's (multiclass: miou)
        for key in shown:
            table.add_column(SUMMARY[key][0], width=7, justify="right", no_wrap=True)
        cells = [format(metrics[key], SUMMARY[key][1]) for key in shown]
        table.add_row(f"{epoch}/{self._epochs}{'*' if best else ' '}", *cells)
        self.console.print(table)

    def message(self, text: str) -> None:
        self.console.print(text)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
