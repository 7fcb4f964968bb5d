"""repro/published.py: every key names a table cell, every value is a citable error in % (accuracies turned into
errors, the direction pinned on cells written out from their sources), and a number stands only beside its own loss."""
import dataclasses

import pytest

from repro.published import DATASETS, METHODS, PUBLISHED, RHOS, SSP_METHODS, UNPUBLISHED, Published


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


# Cells as their sources print them and as the table must show them (top-1 error, %): an accuracy is turned into
# 100 - accuracy; an error is kept as printed.
ERRORS_AS_PRINTED = {
    ('cifar10', 100, 'CE'): 29.64,          # Cui et al. Table 2, error
    ('cifar100', 10, 'LDAM-DRW'): 41.29,    # Cao et al. Table 2, error
    ('cifar10', 100, 'CB'): 29.52,          # Bag of Tricks' gallery, ClassBalanceCE, error
    ('cifar100', 50, 'BalancedSoftmax'): 53.45,  # Bag of Tricks' gallery, BalancedSoftmaxCE, error
    ('cifar10', 50, 'LDAM-DRW'): 18.40,     # Bag of Tricks' gallery, CE | LDAM loss (DRW), error
}
FROM_ACCURACY = {
    ('cifar10', 100, 'cRT'): 18.0,          # BALMS Table 2: 82.0 % accuracy
    ('cifar100', 10, 'LWS'): 36.6,          # BALMS Table 2: 63.4 %
    ('cifar10', 10, 'BalancedSoftmax'): 9.1,     # BALMS Table 5 (3): 90.9 %
    ('cifar100', 100, 'WB'): 46.65,         # Alshammari et al. Table 2: 53.35 %
    ('cifar100', 50, 'CE+posthocLA'): 50.5,  # LADE Table 2, PC Softmax: 49.5 %
}


def test_published_errors_and_the_direction_of_the_accuracy_conversion():
    for key, error in {**ERRORS_AS_PRINTED, **FROM_ACCURACY}.items():
        assert PUBLISHED[key].error == error, key
    for key in FROM_ACCURACY:
        assert '100 - accuracy' in PUBLISHED[key].source, key
    for key in ERRORS_AS_PRINTED:
        assert '100 - accuracy' not in PUBLISHED[key].source, key


def test_a_published_number_is_made_with_the_rows_loss():
    """Cui et al.'s numbers only beside Cui's losses: no Focal number (every published one is a sigmoid focal
    loss; this row is the softmax one), no CB number from Cui (its loss divides by the batch size); the CB cells
    are Bag of Tricks' ClassBalanceCE, the same weighted mean as this row. Every empty cell says why."""
    assert not [k for k in PUBLISHED if k[2] == 'Focal']
    assert {k: v.error for k, v in PUBLISHED.items() if k[2] == 'CB'} == {
        ('cifar10', 100, 'CB'): 29.52, ('cifar10', 50, 'CB'): 22.52,
        ('cifar100', 100, 'CB'): 61.03, ('cifar100', 50, 'CB'): 56.22}
    assert all('Cui' not in v.source for k, v in PUBLISHED.items() if k[2] == 'CB')
    for method in METHODS:
        missing = [(d, r) for d in DATASETS for r in RHOS if (d, r, method) not in PUBLISHED]
        assert bool(missing) == (method in UNPUBLISHED), method
