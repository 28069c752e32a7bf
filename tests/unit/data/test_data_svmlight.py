"""svmlight/LIBSVM files: index bases, comments, label mapping, errors with line numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from downpour.data import load
from downpour.errors import DataError


def _write(tmp_path: Path, text: str, name: str = "train.svm") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _dense(x: torch.Tensor) -> np.ndarray:
    return x.to_dense().numpy()


def test_one_based_with_comments_and_blank_lines(tmp_path):
    train = _write(tmp_path, "# header comment\n\n+1 1:0.5 3:2\n-1 2:1.5  # trailing\n\n+1 3:1\n")
    test = _write(tmp_path, "-1 1:1\n", "test.svm")
    data = load("svmlight", path=train, test_path=test)
    assert data.sparse and data.x_train.layout == torch.sparse_csr
    assert data.x_train.dtype == torch.float32 and data.input_shape == (3,)
    np.testing.assert_array_equal(_dense(data.x_train), [[0.5, 0, 2], [0, 1.5, 0], [0, 0, 1]])
    assert data.y_train.tolist() == [1, 0, 1]  # -1 -> 0, +1 -> 1
    assert data.y_test.tolist() == [0]
    np.testing.assert_array_equal(_dense(data.x_test), [[1, 0, 0]])


def test_zero_based_auto_and_explicit(tmp_path):
    train = _write(tmp_path, "0 0:1 2:3\n1 1:2\n")
    test = _write(tmp_path, "1 2:1\n", "test.svm")
    auto = load("svmlight", path=train, test_path=test)
    np.testing.assert_array_equal(_dense(auto.x_train), [[1, 0, 3], [0, 2, 0]])
    explicit = load("svmlight", path=train, test_path=test, zero_based=True)
    assert torch.equal(explicit.x_train.to_dense(), auto.x_train.to_dense())
    one = _write(tmp_path, "0 1:1 3:3\n1 2:2\n", "one.svm")
    as_zero = load("svmlight", path=one, test_path=test, zero_based=True)
    assert as_zero.input_shape == (4,)  # column 0 unused
    as_one = load("svmlight", path=one, test_path=test, zero_based=False, n_features=5)
    assert as_one.input_shape == (5,)
    np.testing.assert_array_equal(_dense(as_one.x_train)[:, :3], [[1, 0, 3], [0, 2, 0]])


def test_multiclass_labels_are_sorted_and_mapped(tmp_path):
    train = _write(
        tmp_path, "".join(f"{label} 1:{i}\n" for i, label in enumerate([7, 3, 5, 3, 7] * 4))
    )
    data = load("svmlight", path=train, test_fraction=0.25, seed=0)
    assert data.num_classes == 3
    assert data.num_train == 15 and len(data.y_test) == 5
    # Stratified: each class keeps its share in the test split.
    assert sorted(torch.bincount(data.y_test, minlength=3).tolist()) == [1, 2, 2]
    same = load("svmlight", path=train, test_fraction=0.25, seed=0)
    assert torch.equal(same.y_test, data.y_test)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("1 1:0.5 2:x", "2:x"),
        ("1 a:0.5", "a:0.5"),
        ("foo 1:0.5", "label 'foo'"),
        ("1 3:1 2:1", "not strictly increasing"),
        ("1 2", "not index:value"),
        ("1 1:", "1:"),
    ],
)
def test_malformed_line_reports_file_and_line_number(tmp_path, line, why):
    text = "# comment\n+1 1:1\n\n-1 2:1\n" + line + "\n+1 1:1\n"
    path = _write(tmp_path, text)
    with pytest.raises(DataError) as caught:
        load("svmlight", path=path)
    message = str(caught.value)
    assert f"{path}:5:" in message and why in message


def test_index_beyond_n_features_reports_line(tmp_path):
    path = _write(tmp_path, "1 1:1\n-1 4:1\n1 2:1\n")
    with pytest.raises(DataError, match=r"train\.svm:2: feature index 4 exceeds n_features=3"):
        load("svmlight", path=path, n_features=3)


def test_zero_index_in_one_based_file_reports_line(tmp_path):
    path = _write(tmp_path, "1 1:1\n-1 2:1\n1 0:1\n")
    with pytest.raises(DataError, match=r"train\.svm:3: invalid feature index 0"):
        load("svmlight", path=path, zero_based=False)


def test_error_in_test_file_names_the_test_file(tmp_path):
    train = _write(tmp_path, "1 1:1\n-1 2:1\n")
    test = _write(tmp_path, "1 1:1\n1 1:1 1:2\n", "test.svm")
    with pytest.raises(DataError, match=r"test\.svm:2:"):
        load("svmlight", path=train, test_path=test)


def test_missing_file_and_bad_options(tmp_path):
    with pytest.raises(DataError, match="missing file .*nope.svm"):
        load("svmlight", path=tmp_path / "nope.svm")
    with pytest.raises(ValueError, match="needs path="):
        load("svmlight")
    path = _write(tmp_path, "1 1:1\n-1 1:2\n")
    with pytest.raises(ValueError, match="zero_based"):
        load("svmlight", path=path, zero_based="yes")
    with pytest.raises(ValueError, match="n_features"):
        load("svmlight", path=path, n_features=0)
    single = _write(tmp_path, "1 1:1\n1 1:2\n", "single.svm")
    with pytest.raises(DataError, match="single label"):
        load("svmlight", path=single)
