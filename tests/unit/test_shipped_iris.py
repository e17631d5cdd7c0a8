"""The iris table that ships inside the package (mnist/iris.csv): found with nothing else installed, and Fisher's."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from libe_cnn.errors import UserError
from mnist import data


@pytest.fixture
def no_scikit_learn(monkeypatch):
    """Importing or even looking up scikit-learn fails, as where it is not installed."""
    monkeypatch.setitem(sys.modules, "sklearn", None)


def test_the_default_search_finds_the_shipped_copy(tmp_path, monkeypatch, no_scikit_learn):
    monkeypatch.chdir(tmp_path)  # no ./data/iris/iris.csv
    files = data.locate("iris", None, download=False)
    assert files.paths == {"csv": str(data.SHIPPED_IRIS)}
    assert data.SHIPPED_IRIS == data.SHIPPED_IRIS.absolute() and data.SHIPPED_IRIS.parent.name == "mnist"
    train_x, train_y = data.load_split(files, train=True)
    assert len(train_y) == 120 and np.bincount(train_y.numpy()).tolist() == [40, 40, 40]


def test_a_copy_in_data_dir_comes_first(tmp_path, monkeypatch, no_scikit_learn):
    mine = tmp_path / "data" / "iris" / "iris.csv"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(data.SHIPPED_IRIS.read_bytes())
    monkeypatch.chdir(tmp_path)
    assert data.locate("iris", None).paths["csv"] == str(mine)  # ./data, as for every dataset
    assert data.locate("iris", tmp_path / "data").paths["csv"] == str(mine)
    with pytest.raises(UserError, match="leave out --data-dir to use that shipped copy"):
        data.locate("iris", tmp_path / "elsewhere")  # a given --data-dir is the only place looked


def test_the_shipped_copy_is_fishers_table():
    x, y = data.read_iris(data.SHIPPED_IRIS)
    assert x.shape == (150, 4) and x.dtype == np.float32
    assert np.bincount(y).tolist() == [50, 50, 50] and (np.diff(y) >= 0).all()  # 50 of each, in order
    np.testing.assert_array_equal(x[0], np.float32([5.1, 3.5, 1.4, 0.2]))
    np.testing.assert_array_equal(x[-1], np.float32([5.9, 3.0, 5.1, 1.8]))
    # Flowers 35 and 38 as Fisher printed them, not as UCI's iris.data has them.
    np.testing.assert_array_equal(x[34], np.float32([4.9, 3.1, 1.5, 0.2]))
    np.testing.assert_array_equal(x[37], np.float32([4.9, 3.6, 1.4, 0.1]))
    # The normalization of the iris network was measured on this table.
    mean, _ = data.NORMALIZATION["iris"]
    np.testing.assert_allclose(x.mean(axis=0), mean, atol=1e-4)


def test_the_shipped_copy_names_its_source_and_licence():
    text = data.SHIPPED_IRIS.read_text()
    comments = [line for line in text.splitlines() if line.startswith("#")]
    header = next(line for line in text.splitlines() if not line.startswith("#"))
    assert header == "150,4,setosa,versicolor,virginica"
    provenance = " ".join(comments)
    for words in ("Fisher", "1936", "UCI Machine Learning Repository", "CC BY 4.0", "doi.org/10.24432/C56C76"):
        assert words in provenance


def test_comments_and_blank_lines_in_any_iris_csv_are_skipped(tmp_path):
    path = tmp_path / "iris.csv"
    path.write_text("# a note, with spaces\n\n3,4,a,b,c\n5.1,3.5,1.4,0.2,0\n# between rows\n6,3,4,1,1\r\n6,3,5,2,2\n")
    x, y = data.read_iris(path)
    assert x.shape == (3, 4) and y.tolist() == [0, 1, 2]
