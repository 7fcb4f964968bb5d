"""repro/published.py is well formed: every key names a table cell, every value is a citable error in %."""
import dataclasses

import pytest

from repro.published import DATASETS, METHODS, PUBLISHED, RHOS, SSP_METHODS, Published


def test_published_keys_name_table_cells():
    assert PUBLISHED
    for dataset, rho, method in PUBLISHED:
        assert dataset in ('cifar10', 'cifar100') and dataset in DATASETS
        assert rho in (100, 50, 10) and rho in RHOS
        assert method in METHODS + SSP_METHODS


def test_published_values_are_errors_with_a_source():
    for key, entry in PUBLISHED.items():
        assert isinstance(entry, Published), key
        assert 0 < entry.error < 100, key
        assert entry.source.strip() and entry.recipe.strip(), key
    with pytest.raises(dataclasses.FrozenInstanceError):
        next(iter(PUBLISHED.values())).error = 0.0
