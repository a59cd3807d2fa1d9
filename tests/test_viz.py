import numpy as np
from PIL import Image

from cityseg import viz
from cityseg.data.tasks import TASKS

GREEN = (10, 200, 10)  # the test photos' colour: nothing else in a panel is drawn in it
BINARY, MULTICLASS = TASKS["binary"], TASKS["multiclass"]


def photos(n, height, width):
    return np.broadcast_to(np.array(GREEN, np.uint8)[None, :, None, None],
                           (n, 3, height, width)).copy()


def first_cell(panel):
    """(top, left, height, width) of the top-left cell (a panel's Input photo, a card's
    Prediction over it), found by its colour."""
    green = np.all(panel == GREEN, axis=-1)
    ys, xs = np.nonzero(green)
    top, left = ys.min(), xs.min()
    width = np.argmin(green[top, left:]) or green.shape[1] - left
    height = np.argmin(green[top:, left]) or green.shape[0] - top
    return top, left, height, width


def cell(panel, row, column):
    """Cell (row, column) of a panel whose cells are spaced by the margin left of the first."""
    top, left, height, width = first_cell(panel)
    y, x = top + row * (height + left), left + column * (width + left)
    return panel[y:y + height, x:x + width]


def ink_rows(region):
    """The rows of a white band that hold dark (text) pixels."""
    return np.nonzero((region.min(axis=-1) < 128).any(axis=1))[0]


def legend_band(panel, rows):
    """What lies below the last row of cells: the legend."""
    top, left, height, _ = first_cell(panel)
    return panel[top + rows * (height + left):]


def test_error_map_colours_each_outcome_and_ignore():
    target = np.array([[[1, 1, 0, 0], [255, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    pred = np.array([[[1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]])
    panel = viz.sample_panel(photos(1, 4, 4), target, pred, task=BINARY)
    error = cell(panel, 0, 3)
    scale = error.shape[0] // 4
    assert error.shape == (4 * scale, 4 * scale, 3) and scale * 4 >= viz.MIN_HEIGHT

    def pixel(row, col):
        return tuple(error[row * scale + scale // 2, col * scale + scale // 2])

    assert pixel(0, 0) == viz.TP and pixel(0, 1) == viz.FN
    assert pixel(0, 2) == viz.FP and pixel(1, 0) == viz.IGNORED
    assert pixel(3, 3) == (0, 0, 0)
    wrong = viz.sample_panel(photos(1, 4, 4), target, pred, task=MULTICLASS)
    assert tuple(cell(wrong, 0, 3)[scale // 2, scale + scale // 2]) == viz.WRONG


def test_titles_are_legible_at_the_panels_size_and_as_a_thumbnail():
    target = np.zeros((2, 96, 192), dtype=np.int64)  # the quickstart's frame size
    panel = viz.sample_panel(photos(2, 96, 192), target, target, task=BINARY)
    top, left, height, width = first_cell(panel)
    title = ink_rows(panel[:top, left:left + width])  # "Input", above the first column
    tall = title.max() - title.min() + 1  # the old bitmap font's: 10 px, at any size
    assert tall >= 14 and tall >= panel.shape[1] / 60  # ~20 px with the panel 1200 wide
    card = viz.sample_card(photos(1, 96, 192)[0], target[0], target[0], task=BINARY)
    top, left, height, width = first_cell(card)
    shown = 256 / max(card.shape[:2])  # MLflow's thumbnail: the longer side at 256 px
    title = ink_rows(card[:top, left:left + width])
    assert (title.max() - title.min() + 1) * shown >= 9
    thumbnail = Image.fromarray(card).resize((round(card.shape[1] * shown),
                                              round(card.shape[0] * shown)))
    assert max(thumbnail.size) == 256 and thumbnail.width > thumbnail.height  # 2x2, not a strip


def test_the_legend_shows_the_error_colours():
    target = np.zeros((1, 8, 8), dtype=np.int64)
    panel = viz.sample_panel(photos(1, 8, 8), target, target, task=BINARY)
    band = legend_band(panel, rows=1)
    for colour in (viz.FP, viz.FN, viz.IGNORED):
        assert np.all(band == colour, axis=-1).sum() > 25, colour  # a swatch of it
    (heading, entries), = viz.legend(target, target, BINARY)
    assert heading == "Error:" and [name for name, _ in entries] == [
        "false positive", "false negative", "true positive", "ignored"]
    assert ink_rows(band).size  # their names


def test_the_prediction_is_drawn_over_the_photo_where_it_is_foreground():
    photo = np.full((4, 6, 3), 100, np.uint8)
    pred = np.zeros((4, 6), dtype=np.int64)
    pred[1:3, 2:5] = 1
    over = viz.overlay(photo, pred, BINARY)
    assert np.array_equal(np.any(over != photo, axis=-1), pred == 1)
    assert tuple(over[1, 2]) == (177, 50, 50)  # half red (255, 0, 0), half grey 100
    panel = viz.sample_panel(photos(1, 4, 6), np.zeros_like(pred)[None], pred[None], task=BINARY)
    drawn = cell(panel, 0, 2)
    scale = drawn.shape[0] // 4
    changed = np.any(drawn != cell(panel, 0, 0), axis=-1)
    assert np.array_equal(changed, np.kron(pred == 1, np.ones((scale, scale), bool)))


def test_a_multiclass_legend_lists_exactly_the_classes_present():
    target = np.zeros((1, 8, 8), dtype=np.int64)  # road
    target[0, :2] = 255  # ignored: not a class
    target[0, 4:, 4:] = 13  # car
    pred = np.zeros_like(target)
    pred[0, 4:, :4] = 11  # person
    sections = dict(viz.legend(target, pred, MULTICLASS))
    assert [name for name, _ in sections["Classes:"]] == ["road", "person", "car"]
    assert [name for name, _ in sections["Error:"]] == ["wrong class", "ignored"]
    band = legend_band(viz.sample_panel(photos(1, 8, 8), target, pred, task=MULTICLASS), rows=1)
    for label in range(MULTICLASS.num_classes):
        swatch = np.all(band == MULTICLASS.colors[label], axis=-1).sum()
        assert (swatch > 25) == (label in (0, 11, 13)), MULTICLASS.class_names[label]


def test_a_card_is_one_sample_in_two_rows_of_two():
    target = np.zeros((16, 32), dtype=np.int64)
    card = viz.sample_card(photos(1, 16, 32)[0], target, target, task=BINARY)
    top, left, height, width = first_cell(card)
    assert card.shape[1] == 2 * (width + left) + left  # two columns
    # above: the prediction (nothing drawn over the photo) and beside it the error (none at
    # all); below, the input photo under its own title
    rows = np.nonzero(np.all(card[:, left:left + width] == GREEN, axis=(1, 2)))[0]
    second = rows[rows > top + height]
    assert rows.size == 2 * height and np.array_equal(second, np.arange(second[0], rows[-1] + 1))
    assert ink_rows(card[top + height:second[0], left:left + width]).size  # "Input"
    assert np.all(card[top:top + height, 2 * left + width:2 * (left + width)] == 0)
    # every pixel predicted foreground: the untouched photo (the Input) is in the lower row
    wrong = viz.sample_card(photos(1, 16, 32)[0], target, np.ones_like(target), task=BINARY)
    assert first_cell(wrong)[0] > wrong.shape[0] // 3


def test_comparison_panel_has_a_column_per_child():
    images = photos(2, 8, 16)
    targets = np.zeros((2, 8, 16), dtype=np.int64)
    columns = {"a": targets, "b": targets, "pos_weight=4, lr=0.003, seed=2": targets}
    panel = viz.comparison_panel(images, targets, columns, task=MULTICLASS)
    top, left, height, width = first_cell(panel)
    assert panel.shape[1] == 5 * (width + left) + left


def test_confusion_image_and_plots_render():
    counts = np.array([[5, 1, 0], [0, 3, 3], [0, 0, 0]])
    assert viz.confusion_image(counts, ("a", "b", "c")).ndim == 3
    history = [{"train/loss": 1.0 / e, "val/loss": 1.2 / e, "val/dice": 0.2 * e}
               for e in range(1, 4)]
    assert viz.learning_curves(history, "val/dice").shape[2] == 3
    rows = [{"status": "FINISHED", "loss.pos_weight": w, "seed": s, "val/dice": w / 10 + s / 100}
            for w in (1, 2, 4) for s in (1, 2)]
    assert viz.metrics_against(rows, key="loss.pos_weight", metrics=["val/dice"]).shape[2] == 3


def _drawn(monkeypatch) -> list[list[dict]]:
    """What each figure viz renders holds, axis by axis, read before it is closed."""
    seen = []
    real = viz.figure_image

    def keep(fig):
        fig.canvas.draw()
        seen.append([{"title": axis.get_title(), "xticks": list(axis.get_xticks()),
                      "xlim": axis.get_xlim(), "legend": axis.get_legend(),
                      "offsets": [c.get_offsets().tolist() for c in axis.collections],
                      "right": axis.get_window_extent().x1} for axis in fig.axes])
        for axis in seen[-1]:
            legend = axis.pop("legend")
            axis["labels"] = [t.get_text() for t in legend.texts] if legend else []
            axis["legend_left"] = legend.get_window_extent().x0 if legend else None
        return real(fig)

    monkeypatch.setattr(viz, "figure_image", keep)
    return seen


def test_learning_curves_tick_whole_epochs_only(monkeypatch):
    drawn = _drawn(monkeypatch)
    history = [{"train/loss": 1.0 / e, "val/loss": 1.2 / e, "val/dice": 0.2 * e}
               for e in range(1, 4)]
    viz.learning_curves(history, "val/dice")
    (axes,) = drawn
    assert len(axes) == 2
    for axis in axes:
        low, high = axis["xlim"]
        ticks = [t for t in axis["xticks"] if low <= t <= high]
        assert ticks and all(float(t).is_integer() for t in ticks)


def test_a_sweep_plot_gives_the_ranking_metric_its_panel_with_the_best_starred(monkeypatch):
    drawn = _drawn(monkeypatch)
    rows = [{"status": "FINISHED", "loss.pos_weight": w, "seed": s,
             "val/dice": {1: 0.5, 2: 0.7, 4: 0.6}[w] + s / 100, "val/iou": w / 10}
            for w in (1, 2, 4) for s in (1, 2)]
    viz.metrics_against(rows, key="loss.pos_weight", metrics=["val/dice", "val/iou"],
                        ranked_by="val/dice")
    ((ranked, others),) = drawn
    assert ranked["title"] == "val/dice against loss.pos_weight"
    assert others["title"] == "other scores against loss.pos_weight"
    assert ranked["offsets"][-1] == [[2.0, 0.715]]  # the star: the best mean over the seeds
    assert "best: loss.pos_weight = 2" in ranked["labels"]
    assert others["labels"] == ["val/iou"]
    for axis in (ranked, others):  # the legend beside the plot, not over its lines
        assert axis["legend_left"] >= axis["right"]


def test_an_error_colour_never_means_what_the_prediction_colour_means():
    from cityseg.data.tasks import TASKS

    predicted = {tuple(int(c) for c in TASKS["binary"].overlay_colors[1])}
    assert not predicted & {viz.FP, viz.FN, viz.WRONG}
