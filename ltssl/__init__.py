"""Long-tailed semi-supervised learning, the FixMatch family (train_ssl.py): FixMatch and its imbalance add-ons.

Modules: fixmatch (the step, the add-on protocol), abc_head (ABC), darp (DARP), net (network with add-on heads),
ema (weight average), diagnostics (log_pseudo.csv), method (what the trainer calls), protocols (recipe presets),
experiment (everything built from the flags). The data side lives in the ground: dataset.ltssl_split,
dataset.randaugment, dataset.ssl_loader; the Wide ResNets in models.wrn.

COMBINATIONS lists what was published and may run; anything else is refused in one sentence.
"""
from errors import UserError

SSL_ALGS = ('fixmatch', 'supervised')
IMB_ALGS = ('none', 'abc', 'darp')
# (ssl_alg, imb_alg) -> where it was published
COMBINATIONS = {
    ('fixmatch', 'none'): 'Sohn et al., NeurIPS 2020',
    ('fixmatch', 'darp'): 'Kim et al., NeurIPS 2020 (DARP), FixMatch version in its code',
    ('fixmatch', 'abc'): 'Lee et al., NeurIPS 2021 (ABC), its FixMatch version',
    ('supervised', 'none'): 'the labeled-only baseline of every LT-SSL table',
}


def check_combination(ssl_alg, imb_alg):
    if (ssl_alg, imb_alg) not in COMBINATIONS:
        rows = ', '.join(f"--ssl_alg {s} --imb_alg {i}" for s, i in COMBINATIONS)
        raise UserError(f"--ssl_alg {ssl_alg} --imb_alg {imb_alg} was never published (the add-ons change "
                        f"pseudo-labels of unlabeled data, which {ssl_alg} has none of); choose one of: {rows}")
