"""Exact comparison of parameter trees, shared by tests that round-trip parameters."""

import jax
import numpy as np


def assert_trees_equal(a, b) -> None:
    """Same structure, dtypes and values, leaf by leaf (the failing leaf's path named)."""
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(
        jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b), strict=True
    ):
        assert x.dtype == y.dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), jax.tree_util.keystr(path))
