import numpy as np

from cityseg import viz
from cityseg.data.tasks import TASKS


def test_sample_panel_error_colours_and_layout():
    image = np.zeros((1, 3, 4, 4), dtype=np.uint8)
    target = np.array([[[1, 1, 0, 0], [255, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    pred = np.array([[[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    panel = viz.sample_panel(image, target, pred, task=TASKS["binary"])
    scale = -(-viz.MIN_HEIGHT // 4)
    cell = 8 * scale  # 4 pixels + 2 + 2 padding, upscaled
    assert panel.shape == (18 + cell, 4 * cell, 3)

    def error_pixel(row, col):  # pixel (row, col) of the Error column
        return tuple(panel[18 + (2 + row) * scale, 3 * cell + (2 + col) * scale])

    assert error_pixel(0, 0) == viz.TP and error_pixel(0, 1) == viz.FN
    assert error_pixel(0, 2) == viz.FP and error_pixel(1, 0) == viz.IGNORED
    assert error_pixel(3, 3) == (0, 0, 0)


def test_comparison_panel_has_a_column_per_child():
    images = np.zeros((2, 3, 8, 16), dtype=np.uint8)
    targets = np.zeros((2, 8, 16), dtype=np.int64)
    columns = {"a": targets, "b": targets, "c": targets}
    panel = viz.comparison_panel(images, targets, columns, task=TASKS["multiclass"])
    assert panel.shape[1] == 5 * (16 + 4) * -(-viz.MIN_HEIGHT // 8)


def test_confusion_image_and_plots_render():
    counts = np.array([[5, 1, 0], [0, 3, 3], [0, 0, 0]])
    assert viz.confusion_image(counts, ("a", "b", "c")).ndim == 3
    history = [{"train/loss": 1.0 / e, "val/loss": 1.2 / e, "val/dice": 0.2 * e}
               for e in range(1, 4)]
    assert viz.learning_curves(history, "val/dice").shape[2] == 3
    rows = [{"status": "FINISHED", "loss.pos_weight": w, "seed": s, "val/dice": w / 10 + s / 100}
            for w in (1, 2, 4) for s in (1, 2)]
    assert viz.metrics_against(rows, key="loss.pos_weight", metrics=["val/dice"]).shape[2] == 3
