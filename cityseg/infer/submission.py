"""Files for the Cityscapes benchmark server: `predict --format cityscapes [--zip FILE]`.

The server runs cityscapesScripts' evaluator on the upload. It wants, per test frame, one
single-channel PNG of official label ids (not train ids) at the frame's full size, whose name
starts with the frame's `<city>_<seq>_<frame>`. It searches the upload recursively and
refuses a frame with no prediction or with several ("Found multiple predictions";
cityscapesScripts #65: "exactly 1 file per test set image"). So one `<frame name>.png` is
written per input, the folder holds nothing else, and the zip holds exactly those files, flat
(the evaluator's recursive search does not need the city folders).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from cityseg.data.cityscapes import TRAIN_CLASSES, train_id_to_id_lut
from cityseg.data.layouts import read_photo
from cityseg.errors import CitysegError, DataError, StorageError
from cityseg.infer import files, loading, video
from cityseg.runtime.files import written_whole

if TYPE_CHECKING:
    from rich.progress import Progress


def check_model(trained: loading.Trained) -> None:
    """The benchmark scores the 19 Cityscapes classes: a model of other labels is refused."""
    task = trained.task
    if task.class_names != TRAIN_CLASSES:
        raise CitysegError(f"--format cityscapes needs a model of the {len(TRAIN_CLASSES)} "
                           f"Cityscapes classes (data.task: multiclass); this one is "
                           f"{task.name} ({task.description})")


def _names(files: list[Path]) -> dict[Path, str]:
    """Each input's prediction file name: its own name with a .png suffix. A video, or two
    inputs of one name (the server matches predictions to frames by name), are refused."""
    names: dict[str, Path] = {}
    for path in files:
        if path.suffix.lower() in video.VIDEO_EXTS:
            raise CitysegError(f"{path}: a video; --format cityscapes writes benchmark files "
                               f"for frames (images)")
        name = path.with_suffix(".png").name
        if name in names:
            raise CitysegError(f"{names[name]} and {path} would both be predicted as {name}: "
                               f"the benchmark matches predictions to frames by name, so give "
                               f"each frame once")
        names[name] = path
    return {path: name for name, path in names.items()}


def _check_folder(out: Path, names: set[str]) -> None:
    """The folder may already hold these predictions (a rerun), but nothing else: the
    evaluator would take any other <frame>*.png for a second prediction."""
    if not out.is_dir():
        return
    others = sorted(p.name for p in out.iterdir() if p.name not in names)
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        raise CitysegError(f"--out {out} holds {len(others)} other file(s) ({shown}); the "
                           f"benchmark folder must hold the predictions only: give an empty "
                           f"or new folder")


def _check_zip(zip_to: Path, out: Path) -> None:
    if zip_to.is_dir():
        raise CitysegError(f"--zip {zip_to}: is a folder; give a file name (e.g. results.zip)")
    if out.resolve() in zip_to.resolve().parents:
        raise CitysegError(f"--zip {zip_to}: inside --out {out}, which must hold the "
                           f"predictions only; put the zip elsewhere")


def write_zip(files: list[Path], zip_to: Path) -> None:
    """The predictions, flat, in one zip (written beside it, then renamed: never half a zip)."""
    try:
        zip_to.parent.mkdir(parents=True, exist_ok=True)
        # stored, not deflated: PNG is compressed already
        with (written_whole(zip_to) as partial,
              zipfile.ZipFile(partial, "w", compression=zipfile.ZIP_STORED) as archive):
            for path in files:
                archive.write(path, arcname=path.name)
    except OSError as err:
        raise StorageError(f"--zip {zip_to}: cannot write ({err.strerror or err})") from None


def benchmark_files(trained: loading.Trained, inputs: list[Path], out: Path, *,
                    zip_to: Path | None = None, progress: Progress | None = None
                    ) -> tuple[list[Path], list[str]]:
    """Write <frame name>.png of label ids per input image into `out`, and with zip_to the zip
    of them (only when no input was skipped: the server needs every frame). Everything the
    user can get wrong is refused before the first file is written.
    Returns (written, skipped: one "<path>: <reason>" each)."""
    files.check_out(out)
    check_model(trained)
    names = _names(files.input_files(inputs))
    _check_folder(out, set(names.values()))
    if zip_to is not None:
        _check_zip(zip_to, out)
    files.make_out(out)
    label_ids = train_id_to_id_lut()  # the task's labels are train ids (check_model)
    written, skipped = [], []
    for path in files.tracked(progress, list(names), "frames"):
        try:
            photo = read_photo(path)
        except DataError as err:
            skipped.append(str(err))
            continue
        labels, _ = trained.predictor.predict_photo(photo)
        files.save_png(label_ids[labels], out / names[path], written=len(written))
        written.append(out / names[path])
    if zip_to is not None and not skipped:
        write_zip(written, zip_to)
    return written, skipped
