"""Published top-1 errors (%) for the rows of the `cifar10-lt-baselines` / `cifar100-lt-baselines` tables.

PUBLISHED maps (dataset, rho, method) -> Published(error, source, recipe) for CIFAR-10-LT / CIFAR-100-LT,
exponential profile, rho = 100, 50, 10. Every number was read in the source named (never estimated, never
filled from memory); where a source reports accuracy, error is 100 - accuracy and `source` says so.

Which number stands beside a row (docs/baselines.md, row by row):
- only a number made with the row's own loss / classifier (a sigmoid focal loss is not this project's softmax
  focal loss; a loss divided by the batch size is not one divided by the sum of the weights);
- of those, one made under this project's recipe (ResNet-32, 200 epochs, batch 128, lr 0.1, 5 warm-up epochs,
  x0.01 at 160 and 180, wd 2e-4, crop + flip, LDAM-DRW's long-tailed draw) where one exists: Bag of Tricks'
  repository ran CB, Balanced Softmax and LDAM-DRW exactly so at rho = 100 and 50;
- otherwise the method's own paper (or a paper that re-ran it), with the recipe behind it in `recipe`.
UNPUBLISHED gives, per method, why a cell has no number; the tables print it under the rows.

Sources, and how each was read (the search tools of the sessions that wrote this file; the papers' own PDFs
and arXiv pages were not reachable, so PDF-to-text copies kept in public GitHub repositories were read
through find_string / read_file; the ids are read_file ids):

- [Cui19] Cui, Jia, Lin, Song, Belongie, "Class-Balanced Loss Based on Effective Number of Samples", CVPR
  2019, arXiv:1901.05555. Table 2 (error of softmax, sigmoid and focal CE) and Appendix A Figures 8 / 10 (every
  loss x beta); Section 5.2 recipe. Read: read_file id 67629973265 (PDF text); Table 2 again in id 55952368749.
  Its code (richardaecn/class-balanced-loss src/cifar_main.py): the focal and sigmoid losses are one-vs-all
  sigmoid losses divided by the number of positives, with the last layer's bias initialised to -log(C - 1)
  (src/model_base.py) and no weight decay on it; the weighted softmax loss is
  tf.losses.softmax_cross_entropy(weights=w), i.e. sum_i w_i l_i / N.
- [Cao19] Cao, Wei, Gaidon, Arechiga, Ma, "Learning Imbalanced Datasets with Label-Distribution-Aware
  Margin Loss", NeurIPS 2019, arXiv:1906.07413v2. Table 2 and Appendix B recipe. Read: read_file id 52825197875.
  Its long-tailed ERM, Focal, CB RW and CB Focal cells restate [Cui19]: every one equals Cui's value to the
  digit (but ERM CIFAR-100 rho 10: 44.30 for Cui's 44.29), the CB rows carry "[Cui et al., 2019]", and the text
  says only "(5) Focal: we use the recently proposed focal loss as another baseline"; its step-imbalance
  cells and CB RS, which Cui has not, are its own runs.
- [BoT] Zhang, Wei, Zhou, Wu, "Bag of Tricks for Long-Tailed Visual Recognition with Deep Convolutional Neural
  Networks", AAAI 2021: the results of its repository, zhangyongshun/BagofTricks-LT documents/trick_gallery.md
  at commit ce7859a930649d10fb2a4fd4ed9242007eb25e2f (the "cao_cifar" results of 2021-11-15: LDAM-DRW's
  long-tailed draw, configs/cao_cifar/*: this project's recipe), rho = 100 and 50 only. Its losses, read in
  lib/loss/loss_impl/: ClassBalanceCE is F.cross_entropy(weight=w), beta 0.9999 (this project's CB);
  BalancedSoftmaxCE is CE(z + log n_c); LDAM-DRW is LDAMLoss (s 30, margin 0.5, FCNorm head) with weights
  beta 0.9999 from 1-based epoch 160 (Cao's code: 0-based 160, one epoch later). The AAAI paper's tables could
  not be read with these tools, so whether the paper prints the same values is unchecked; Balanced Softmax was
  added to the repository after the paper (its log: 2021-01-10).
- [BBN20] Zhou, Cui, Wei, Chen, "BBN", CVPR 2020, arXiv:1912.02413. Table 1. Read: read_file id 52599566952.
- [Menon21] Menon et al., "Long-Tail Learning via Logit Adjustment", arXiv:2007.07314 (ICLR 2021). Table 3
  (balanced error, mean of 5 trials, rho = 100 only) and Appendix D recipe. Read: read_file id 52934202046.
  Released code: google-research/google-research logit_adjustment/utils.py.
- [Ren20] Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual Recognition" (BALMS), NeurIPS 2020,
  arXiv:2007.10740. Table 2 (accuracy, mean of 3 runs; cRT and LWS re-run on BALMS's own Softmax features),
  Table 5 row (3) "Balanced Softmax", Appendix C.3 recipe. Read: read_file id 52476334927. Released code:
  jiawei-ren/BalancedMetaSoftmax-Classification config/CIFAR10_LT/decouple_balanced_softmax_imba200.yaml
  (decoupled stage: 2,000 iterations, batch 512, lr 0.1, cosine, wd 5e-4).
- [WB22] Alshammari, Wang, Ramanan, Kong, "Long-Tailed Recognition via Weight Balancing", CVPR 2022,
  arXiv:2203.14197. Table 2 (accuracy, CIFAR-100-LT only) and Section 4.1 recipe. Read: read_file id
  53071130289. Released code: ShadeAlsha/LTR-weight-balancing (demo1/demo2, utils/*.py); the author's replies
  in its issues #3, #15 and #16 (the code's CIFAR ResNet-34; the paper's stage 1 ran 200 epochs, the demo 320).
- [LADE21] Hong et al., "Disentangling Label Distribution for Long-tailed Visual Recognition", CVPR 2021,
  arXiv:2012.00321. Table 2 (accuracy, CIFAR-100-LT only) and Appendix 6.2. Read: read_file id 52898620291;
  its config (hyperconnect/LADE config/CIFAR100_LT/*.yaml: feat_dim 128, ResNet32Feature.py) and that network
  (KaihuaTang/Long-Tailed-Recognition.pytorch classification/models/ResNet32Feature.py: BBN's ResNet-32).
- [Yang20] Yang, Xu, NeurIPS 2020, arXiv:2006.07529: the authors' README (YyzHarry/imbalanced-semi-self at
  commit 7cccaa2a1415b8dac485bd520e7814ed3c2ea31d, "Results and Models") for CE (Uniform / Balanced) + SSP;
  LDAM-DRW + SSP only as others quote it ([WB22] Table 2; the Long-Tailed-Classification-Leaderboard README,
  read_file id 37224146063). The paper's own SSP table was not reachable: one secondary, machine-written
  summary (read_file id 58690758510) lists the README's "CE(Balanced) + SSP" values as "CB-CE + SSP" beside
  "CB-CE 27.63 / 21.95", Cui's class-balanced softmax at rho 100 / 50, which would make the row class-balanced
  re-weighting (--train_rule Reweight) rather than the class-balanced sampling this project runs; unconfirmed.
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    error: float  # top-1 error, %, on the balanced CIFAR test set
    source: str   # paper, table / row, and "100 - accuracy" where the paper reports accuracy
    recipe: str   # how the published model was trained (what differs from this project's recipe)


DATASETS = ('cifar10', 'cifar100')
RHOS = (100, 50, 10)
METHODS = ('CE', 'Focal', 'CB', 'LDAM-DRW', 'BalancedSoftmax', 'LogitAdjusted', 'LogitAdjustedAdaptive',
           'CE+posthocLA', 'cRT', 'tau-norm', 'NCM', 'LWS', 'WB')
# This paper's SSP rows: CE (Uniform) / CE (Balanced) are the original README's names (this project maps
# CE (Balanced) to class-balanced sampling, `--train_rule Resample`; see [Yang20] above).
SSP_METHODS = ('CE+SSP', 'CE(Balanced)+SSP', 'LDAM-DRW+SSP')

_CUI = ('ResNet-32 (TensorFlow), 200 epochs, batch 128, SGD momentum 0.9, wd 2e-4, lr 0.1 with 5-epoch linear '
        'warm-up, x0.01 at epochs 160 and 180, pad-4 crop + flip; Cui\'s own long-tailed draw ([Cui19] Sec. 5.2)')
_CAO = ('ResNet-32, 200 epochs, batch 128, SGD momentum 0.9, wd 2e-4, lr 0.1 with 5-epoch linear warm-up, '
        'x0.01 at epochs 160 and 180, pad-4 crop + flip; LDAM largest margin 0.5; DRW re-weights only '
        'after the first lr decay ([Cao19] App. B, Fig. 3): this project\'s recipe')
_BOT = ('this project\'s recipe: ResNet-32, 200 epochs, batch 128, SGD momentum 0.9, wd 2e-4, lr 0.1 with 5 warm-up '
        'epochs, x0.01 at epochs 160 and 180, crop + flip, LDAM-DRW\'s long-tailed draw (configs/cao_cifar/); best '
        'epoch, one run')
_MENON = ('ResNet-32, 200 epochs, batch 128, SGD momentum 0.9, wd 1e-4, lr 0.1 with 5-epoch linear warm-up, '
          'x0.1 at epochs 160 and 180, pad-4 crop + flip; mean of 5 trials ([Menon21] App. D). The released '
          'TF code counts 1,241 (CIFAR-10-LT) / 1,419 (CIFAR-100-LT) epochs over the long-tailed train set, '
          'warm-up 20/22 epochs, lr x0.1 at 604/691, x0.01 at 926/1059, x0.001 at 1128/1290, Nesterov momentum, '
          'Keras l2(1e-4) (= wd 2e-4) and a 1x1-3x3-1x1 bottleneck "ResNet-32"')
_BALMS = ('ResNet-32, 13K iterations at batch 512, SGD momentum 0.9 (Nesterov in the paper, plain in the code), '
          'wd 5e-4, lr 0.05 -> 0.1 over the first 800 iterations then cosine to 0, CIFAR AutoAugment and Cutout '
          '(before normalisation, in the released code); mean of 3 runs ([Ren20] App. C.3)')
_DECOUPLED = (_BALMS + '; stage 2: the classifier re-trained for 2K iterations (batch 512, lr 0.1, cosine, wd 5e-4, '
              'class-balanced sampling) on the frozen features of that recipe\'s plain softmax model. This table '
              'runs those 2K iterations on its own CE model')
_WB = ('stage 1: CE, their CIFAR ResNet-34 (torchvision\'s, 3x3 first conv, no max-pool; the paper says ResNet-32), '
       '200 epochs (the author, issue #15; the demo runs 320), batch 64, SGD momentum 0.9, cosine lr 0.01 -> 0 stepped '
       'at epoch start, wd 5e-3, crop + flip; stage 2: fc trained 10 epochs with the class-balanced loss, lr 0.01, '
       'batch 64, wd 0.1, MaxNorm thresh 0.1 after each epoch; BatchNorm in train mode; the demo\'s reported '
       'accuracy averages each test image\'s logits with its mirror\'s (utils/eval_funcs.py test_aug=True) and '
       'selects the best epoch of both stages on the test set ([WB22] Sec. 4.1, LTR-weight-balancing demo1 / demo2)')
_LADE = ('BBN\'s ResNet-32 (two final residual branches concatenated: 128-d features, not the standard 64-d; '
         'LADE config feat_dim 128), 200 epochs, batch 256, SGD momentum 0.9, wd 5e-4, lr 0.2 with 5-epoch '
         'linear warm-up, x0.01 at epochs 120 and 160, one fixed seed ([LADE21] App. 6.2, config/CIFAR100_LT)')
_YANG = ('rotation SSP on the same long-tailed train set, then ResNet-32 trained from it for 200 epochs by the '
         'authors\' train.py (defaults: batch 128 (256 in its first release), SGD momentum 0.9, lr 0.1 with '
         'the step schedule of its utils.py, wd 2e-4, pad-4 crop + flip)')

# Why a (dataset, rho) cell of a method has no published number, where its row has none or some.
# Why a (dataset, rho) cell of a method has no published number (the tables print these under the rows).
UNPUBLISHED = {
    'Focal': "every published 'Focal' CIFAR-LT row is another loss: Cui et al.'s (restated in Cao et al.'s Table 2) "
             "is the sigmoid one-vs-all focal loss with a -log(C - 1) bias initialisation, Bag of Tricks' the sigmoid "
             "focal loss at gamma 2; this row is LDAM-DRW's softmax focal loss, gamma 1",
    'CB': "rho 10: Cui et al.'s CB softmax (SM_0.9999) divides the weighted loss by the batch size where this row "
          "(nn.CrossEntropyLoss(weight), as LDAM-DRW's and Bag of Tricks' code) divides by the sum of the weights, a "
          "step 3.6 to 9.3 times larger on CIFAR-10-LT rho 100; Bag of Tricks reports rho 100 and 50 only",
    'LogitAdjusted': 'rho 50 and 10: Menon et al. report rho 100 only',
    'LogitAdjustedAdaptive': 'Menon et al. report the combination on ImageNet-LT and iNaturalist only (Table 4)',
    'CE+posthocLA': 'CIFAR-10-LT rho 50 and 10: Menon et al. report rho 100 only, LADE CIFAR-100-LT only',
    'tau-norm': "rho 50 and 10: Menon et al. (tau = 1, no bias, as this row) report rho 100 only; Bag of Tricks' "
                "tau-norm keeps the classifier's bias",
    'NCM': 'Kang et al. report no CIFAR numbers',
    'cRT': 'rho 50: BALMS reports imbalance 200, 100 and 10',
    'LWS': 'rho 50: BALMS reports imbalance 200, 100 and 10',
    'WB': 'CIFAR-10-LT: Alshammari et al. report CIFAR-100-LT only',
}


def _rows(method, source, recipe, cifar10=(None, None, None), cifar100=(None, None, None), accuracy=False):
    """Entries for one method: errors (or accuracies, accuracy=True) per data set in RHOS order; None = absent."""
    rows = {}
    for dataset, values in (('cifar10', cifar10), ('cifar100', cifar100)):
        for rho, value in zip(RHOS, values):
            if value is not None:
                # round() keeps 100 - 83.1 at 16.9 rather than 16.900000000000006
                error = round(100.0 - value, 2) if accuracy else value
                rows[(dataset, rho, method)] = Published(error, source, recipe)
    return rows



PUBLISHED = {
    **_rows('CE', "Cui et al., CVPR 2019, Table 2, row 'Softmax' (error); same values in Cao et al. Table 2 "
            "'ERM' (CIFAR-100 rho 10 there: 44.30), BBN Table 1 'CE' and Bag of Tricks' gallery 'Baseline'", _CUI,
            cifar10=(29.64, 25.19, 13.61), cifar100=(61.68, 56.15, 44.29)),
    **_rows('CB', "Bag of Tricks (AAAI 2021) repository, trick_gallery.md @ce7859a, re-weighting, row "
            "'ClassBalanceCE' (error; nn.CrossEntropyLoss(weight=w), beta 0.9999, as this row)", _BOT,
            cifar10=(29.52, 22.52, None), cifar100=(61.03, 56.22, None)),
    **_rows('LDAM-DRW', "Cao et al., NeurIPS 2019, Table 2, long-tailed, row 'LDAM-DRW' (error)", _CAO,
            cifar10=(22.97, None, 11.84), cifar100=(57.96, None, 41.29)),
    **_rows('LDAM-DRW', "Bag of Tricks (AAAI 2021) repository, trick_gallery.md @ce7859a, two-stage DRW, row "
            "'CE | LDAM loss' = LDAM-DRW (error; its weights switch one epoch before Cao et al.'s code)", _BOT,
            cifar10=(None, 18.40, None), cifar100=(None, 52.71, None)),
    **_rows('BalancedSoftmax', "Bag of Tricks (AAAI 2021) repository, trick_gallery.md @ce7859a, re-weighting, row "
            "'BalancedSoftmaxCE' = CE(z + log n_c) (error)", _BOT,
            cifar10=(22.46, 18.89, None), cifar100=(57.01, 53.45, None)),
    **_rows('BalancedSoftmax', "Ren et al. (BALMS), NeurIPS 2020, Table 5 row (3) 'Balanced Softmax', "
            "end-to-end; error = 100 - accuracy (90.9 / 63.1)", _BALMS,
            cifar10=(None, None, 90.9), cifar100=(None, None, 63.1), accuracy=True),
    **_rows('LogitAdjusted', "Menon et al., arXiv:2007.07314 (ICLR 2021), Table 3, row 'Logit adjustment loss "
            "(tau = 1)' (balanced error)", _MENON,
            cifar10=(22.33, None, None), cifar100=(56.11, None, None)),
    **_rows('CE+posthocLA', "Menon et al., arXiv:2007.07314 (ICLR 2021), Table 3, row 'Logit adjustment "
            "post-hoc (tau = 1)' (balanced error; tau = tau* tuned on test: 19.08 / 57.90)", _MENON,
            cifar10=(22.60, None, None), cifar100=(58.24, None, None)),
    **_rows('CE+posthocLA', "Hong et al. (LADE), CVPR 2021, Table 2, row 'PC Softmax' = CE logits - log prior "
            "at test time (post-hoc LA, tau = 1); error = 100 - accuracy (49.5, 61.2)", _LADE,
            cifar100=(None, 49.5, 61.2), accuracy=True),
    **_rows('tau-norm', "Menon et al., arXiv:2007.07314 (ICLR 2021), Table 3, row 'Weight normalisation "
            "(tau = 1) [Kang et al., 2020]' = tau-normalised ERM classifier, no bias (balanced error; tau = tau* "
            "tuned on test: 21.50 / 58.76)", _MENON,
            cifar10=(24.02, None, None), cifar100=(58.89, None, None)),
    **_rows('cRT', "Ren et al. (BALMS), NeurIPS 2020, Table 2, row 'cRT [18]' (re-run by BALMS); error = "
            "100 - accuracy (82.0, 91.0 / 50.0, 63.3)", _DECOUPLED,
            cifar10=(82.0, None, 91.0), cifar100=(50.0, None, 63.3), accuracy=True),
    **_rows('LWS', "Ren et al. (BALMS), NeurIPS 2020, Table 2, row 'LWS [18]' (re-run by BALMS); error = "
            "100 - accuracy (83.7, 91.1 / 50.5, 63.4)", _DECOUPLED,
            cifar10=(83.7, None, 91.1), cifar100=(50.5, None, 63.4), accuracy=True),
    **_rows('WB', "Alshammari et al., CVPR 2022, Table 2, row '+ WD & Max' (CIFAR-100-LT only); error = "
            "100 - accuracy (53.35, 57.71, 68.67)", _WB,
            cifar100=(53.35, 57.71, 68.67), accuracy=True),
    **_rows('CE+SSP', "Yang & Xu, NeurIPS 2020: authors' README (YyzHarry/imbalanced-semi-self @7cccaa2), "
            "'CE(Uniform) + SSP', final models (error)", _YANG,
            cifar10=(26.50, 21.80, 12.28), cifar100=(59.60, 54.96, 42.93)),
    **_rows('CE(Balanced)+SSP', "Yang & Xu, NeurIPS 2020: authors' README (YyzHarry/imbalanced-semi-self "
            "@7cccaa2), 'CE(Balanced) + SSP', final models (error); the training rule behind 'Balanced' is "
            "unconfirmed (see [Yang20])", _YANG,
            cifar10=(23.47, 19.60, 11.57), cifar100=(56.94, 52.91, 41.94)),
    **_rows('LDAM-DRW+SSP', "Yang & Xu, NeurIPS 2020, SECONDARY (paper text not read): as quoted by the "
            "Long-Tailed-Classification-Leaderboard README, 'LDAM-DRW + SSP' (error)", _YANG + ', LDAM-DRW',
            cifar10=(22.17, 17.87, 11.47)),
    **_rows('LDAM-DRW+SSP', "Yang & Xu, NeurIPS 2020, SECONDARY (paper text not read): as quoted by "
            "Alshammari et al., CVPR 2022, Table 2, row 'LDAM+SSP [78]'; error = 100 - accuracy (43.43, 47.11, "
            "58.91); the Long-Tailed-Classification-Leaderboard README gives the same errors",
            _YANG + ', LDAM-DRW', cifar100=(43.43, 47.11, 58.91), accuracy=True),
}
