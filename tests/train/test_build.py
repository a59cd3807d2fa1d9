"""Config -> the parts a run trains with: what building says while it works."""

from cityseg.config import load_experiment
from cityseg.train.build import build_data
from tests.conftest import QUICKSTART, tiny_overrides


class Said:
    """A display that keeps its messages."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def message(self, text: str) -> None:
        self.lines.append(text)


def test_the_decode_cache_is_announced_only_when_images_are_decoded(tmp_path):
    exp = load_experiment(QUICKSTART, tiny_overrides(tmp_path))
    first, again = Said(), Said()
    build_data(exp, first)  # writes the synthetic data, then decodes it into the cache
    build_data(exp, again)  # reads the arrays
    assert first.lines == [f"data: decoding every image once into the cache in "
                           f"{exp.data.cache_dir} (later runs read the arrays)"]
    assert again.lines == []
    uncached = load_experiment(QUICKSTART, [*tiny_overrides(tmp_path), "data.cache=false"])
    nothing = Said()
    build_data(uncached, nothing)
    assert nothing.lines == []
