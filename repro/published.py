"""Published top-1 errors (%) for the rows of the `cifar10-lt-baselines` / `cifar100-lt-baselines` tables.

PUBLISHED maps (dataset, rho, method) -> Published(error, source, recipe) for CIFAR-10-LT / CIFAR-100-LT,
exponential profile, rho = 100, 50, 10, ResNet-32 unless the recipe says otherwise. Every number was read
in the source named (never estimated, never filled from memory); where a source reports accuracy, error is
100 - accuracy and `source` says so. A (dataset, rho, method) with no entry has no published number in any
source read here: the table prints "not published". The recipes differ from row to row (and from this
project's recipe), which is the point of printing them next to the number.

Sources, and how each was read (the search tools of the session that wrote this file; the papers' own PDFs
and arXiv pages were not reachable, so PDF-to-text copies kept in public GitHub repositories were read
through find_string / read_file; the ids are read_file ids):

- [Cui19] Cui, Jia, Lin, Song, Belongie, "Class-Balanced Loss Based on Effective Number of Samples", CVPR
  2019, arXiv:1901.05555. Table 2 (error of softmax, sigmoid and focal CE; "Class-Balanced" = best of loss
  type, beta and gamma per column) and Appendix A Figures 8 (CIFAR-10) and 10 (CIFAR-100), the error of
  every loss x beta; Section 5.2 recipe. Read: find_string "different loss functions on long-tailed CIFAR"
  -> read_file id 67629973265 (PDF text; Table 2 and the figures' cell values); Table 2 again in an
  independent markdown copy, id 55952368749. The figures' cells were matched to their rows by checking the
  SM, SGM and Focal rows of every column against Table 2.
- [Cao19] Cao, Wei, Gaidon, Arechiga, Ma, "Learning Imbalanced Datasets with Label-Distribution-Aware
  Margin Loss", NeurIPS 2019, arXiv:1906.07413v2. Table 2 (long-tailed 100 and 10 only) and Appendix B
  recipe. Read: find_string "validation errors of ResNet-32 on imbalanced CIFAR" -> read_file id
  52825197875 (PDF text).
- [BBN20] Zhou, Cui, Wei, Chen, "BBN: Bilateral-Branch Network with Cumulative Learning", CVPR 2020,
  arXiv:1912.02413. Table 1 (error; rho = 100, 50, 10) and Section 5.2. Read: read_file id 52599566952
  (PDF text, found with find_string "**Topic**: long_tail").
- [Menon21] Menon, Jayasumana, Rawat, Jain, Veit, Kumar, "Long-Tail Learning via Logit Adjustment",
  arXiv:2007.07314 (ICLR 2021). Table 3 of the arXiv text read (balanced error, mean of 5 trials, rho = 100
  only) and Appendix D recipe. Read: read_file id 52934202046 (PDF text). The epoch counts of the released
  code: google-research/google-research logit_adjustment/utils.py, dataset_mappings() (read_file).
- [Ren20] Ren, Yu, Sheng, Ma, Zhao, Yi, Li, "Balanced Meta-Softmax for Long-Tailed Visual Recognition"
  (BALMS), NeurIPS 2020, arXiv:2007.10740. Table 2 (top-1 accuracy, mean of 3 runs, imbalance factor 200,
  100, 10; cRT and LWS re-run under BALMS's recipe) and Table 5 row (3) "Balanced Softmax" (end-to-end);
  Appendix C.3 recipe. Read: read_file id 52476334927 (PDF text). The augmentation of the released code:
  jiawei-ren/BalancedMetaSoftmax-Classification README.md (credits CIFAR AutoAugment and Cutout) and
  config/CIFAR10_LT/balanced_softmax_imba200.yaml (13,000 iterations, batch 512, wd 5e-4).
- [WB22] Alshammari, Wang, Ramanan et al., "Long-Tailed Recognition via Weight Balancing", CVPR 2022,
  arXiv:2203.14197. Table 2 (top-1 accuracy, CIFAR-100-LT only, IF = 100, 50, 10) and Section 4.1 recipe.
  Read: find_string "**arXiv**: 2203.14197" -> read_file id 53071130289 (PDF text of this paper, filed
  under another paper's title in that repository).
- [LADE21] Hong et al., "Disentangling Label Distribution for Long-tailed Visual Recognition" (LADE), CVPR
  2021, arXiv:2012.00321. Table 2 (top-1 accuracy, CIFAR-100-LT only, rho = 100, 50, 10; its own runs of
  Balanced Softmax and of "PC Softmax", which by its Eq. 26 is logits - log p_s(y) + log p_t(y), i.e.
  post-hoc logit adjustment with tau = 1 for a uniform test prior) and Appendix 6.2 recipe; Table 10
  repeats the rho = 50 accuracies. Read: read_file id 52898620291 (PDF text).
- [Yang20] Yang, Xu, "Rethinking the Value of Labels for Improving Class-Imbalanced Learning", NeurIPS
  2020, arXiv:2006.07529. The paper's text was not reachable. Its CE (Uniform) + SSP and CE (Balanced) +
  SSP numbers are read from the authors' repository: YyzHarry/imbalanced-semi-self README.md at commit
  7cccaa2a1415b8dac485bd520e7814ed3c2ea31d, "Results and Models" (top-1 error, 200-epoch final models).
  Its LDAM-DRW + SSP numbers are read only as others quote them: [WB22] Table 2 row "LDAM+SSP [78]"
  (CIFAR-100, accuracy) and the Long-Tailed-Classification-Leaderboard README (error, both data sets,
  "Source: arXiv 2006.07529"; read_file id 37224146063); the source strings say so.

Not published in any source read (so absent below): rho = 50 for cRT and LWS and, on CIFAR-10-LT, for
BalancedSoftmax ([Ren20] has 200/100/10; [LADE21] fills CIFAR-100-LT rho = 50 for BalancedSoftmax);
rho = 50 and 10 for LogitAdjusted and tau-norm ([Menon21] has rho = 100 only) and, on CIFAR-10-LT, for
CE+posthocLA ([LADE21] fills CIFAR-100-LT); WB on CIFAR-10-LT ([WB22] has CIFAR-100-LT only).
Kang et al. (ICLR 2020; cRT, tau-norm, LWS) report no CIFAR numbers. Not used, on purpose: [Cui19]'s "Class-Balanced" row (a
different loss per column: CB focal, CB sigmoid or CB softmax, picked per column), [WB22]'s rows for other
methods ("tau-norm [38]", "LogitAjust [54]", ...: no recipe given), and MiSLAS (Zhong et al., CVPR 2021),
whose cRT / LWS + mixup table was not reachable (its README lists MiSLAS only).
"""
from dataclasses import dataclass


@dataclass(frozen=True)
class Published:
    error: float  # top-1 error, %, on the balanced CIFAR test set
    source: str   # paper, table / row, and "100 - accuracy" where the paper reports accuracy
    recipe: str   # how the published model was trained (what differs from this project's recipe)


DATASETS = ('cifar10', 'cifar100')
RHOS = (100, 50, 10)
METHODS = ('CE', 'Focal', 'CB', 'LDAM-DRW', 'BalancedSoftmax', 'LogitAdjusted', 'CE+posthocLA', 'cRT',
           'tau-norm', 'LWS', 'WB')
# This paper's SSP rows: CE (Uniform) / CE (Balanced) are the original README's names (this project maps
# CE (Balanced) to class-balanced sampling, `--train_rule Resample`).
SSP_METHODS = ('CE+SSP', 'CE(Balanced)+SSP', 'LDAM-DRW+SSP')

_CUI = ('ResNet-32 (TensorFlow), 200 epochs, batch 128, SGD momentum 0.9, lr 0.1 with 5-epoch linear '
        'warm-up, x0.01 at epochs 160 and 180, pad-4 crop + flip ([Cui19] Sec. 5.2)')
_CAO = ('ResNet-32, 200 epochs, batch 128, SGD momentum 0.9, wd 2e-4, lr 0.1 with 5-epoch linear warm-up, '
        'x0.01 at epochs 160 and 180, pad-4 crop + flip; LDAM largest margin 0.5; DRW re-weights only '
        'after the first lr decay ([Cao19] App. B, Fig. 3)')
_BBN = ('BBN Sec. 5.2 CIFAR setup: ResNet-32, 200 epochs, batch 128, SGD momentum 0.9, wd 2e-4, lr 0.1 with '
        '5-epoch warm-up, pad-4 crop + flip (the decay epochs 120/160 it gives are BBN\'s own); the LDAM-DRW '
        'row repeats Cao et al.\'s values at rho 100 and 10, so rho 50 is BBN\'s run')
_MENON = ('ResNet-32, 200 epochs, batch 128, SGD momentum 0.9, wd 1e-4, lr 0.1 with 5-epoch linear warm-up, '
          'x0.1 at epochs 160 and 180, pad-4 crop + flip; mean of 5 trials ([Menon21] App. D). The released '
          'TF code counts 1,241 (CIFAR-10-LT) / 1,419 (CIFAR-100-LT) epochs over the long-tailed train set, '
          'warm-up 20/22 epochs, lr x0.1 at 604/691, x0.01 at 926/1059, x0.001 at 1128/1290')
_BALMS = ('ResNet-32, 13K iterations at batch 512, Nesterov SGD momentum 0.9, wd 5e-4, lr 0.05 -> 0.1 over '
          'the first 800 iterations then cosine to 0, augmentation "follows Tan et al. (EQL)" (the released '
          'code credits CIFAR AutoAugment and Cutout); mean of 3 runs ([Ren20] App. C.3)')
_DECOUPLED = (_BALMS + '; classifier re-trained for 2K iterations on the frozen features of the plain '
              'softmax (instance-balanced) model')
_WB = ('ResNet-32, 200 epochs, batch 64, SGD momentum 0.9, cosine lr 0.01 -> 0, flip + crop; stage 1: CE '
       'with tuned weight decay; stage 2: classifier re-trained with the class-balanced loss, tuned weight '
       'decay and MaxNorm (hyperparameters by Bayesian optimisation) ([WB22] Secs. 3.3, 4.1)')
_LADE = ('ResNet-32 (the TDE / Causal Norm implementation), 200 epochs, SGD momentum 0.9, wd 5e-4, lr 0.2 '
         'with 5-epoch linear warm-up, x0.01 at epochs 120 and 160, one fixed seed; batch 256 is the CIFAR-100-LT '
         'batch its settings table gives for LADE ([LADE21] App. 6.2)')
_YANG = ('rotation SSP on the same long-tailed train set, then ResNet-32 trained from it for 200 epochs by the '
         'authors\' train.py (defaults: batch 128 (256 in its first release), SGD momentum 0.9, lr 0.1 with '
         'the step schedule of its '
         'utils.py, wd 2e-4, pad-4 crop + flip)')


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
            "'ERM' (CIFAR-100 rho 10 there: 44.30) and BBN Table 1 'CE'", _CUI,
            cifar10=(29.64, 25.19, 13.61), cifar100=(61.68, 56.15, 44.29)),
    **_rows('Focal', "Cui et al., CVPR 2019, Table 2, row 'Focal (gamma = 1.0)' (error; gamma = 1 as this "
            "project's Focal); same at rho 100/10 in Cao et al. Table 2 'Focal'", _CUI,
            cifar10=(29.62, 23.29, 13.34), cifar100=(61.59, 55.68, 44.22)),
    **_rows('CB', "Cui et al., CVPR 2019, App. A Fig. 8 (CIFAR-10) / Fig. 10 (CIFAR-100), cell 'SM_0.9999' = "
            "class-balanced softmax CE, beta = 0.9999 (error); same at rho 100/10 in Cao et al. Table 2 "
            "'CB RW'", _CUI,
            cifar10=(27.63, 21.95, 13.46), cifar100=(66.01, 57.54, 42.88)),
    **_rows('LDAM-DRW', "Cao et al., NeurIPS 2019, Table 2, long-tailed, row 'LDAM-DRW' (error)", _CAO,
            cifar10=(22.97, None, 11.84), cifar100=(57.96, None, 41.29)),
    **_rows('LDAM-DRW', "Zhou et al. (BBN), CVPR 2020, Table 1, row 'LDAM-DRW [3]' (error)", _BBN,
            cifar10=(None, 18.97, None), cifar100=(None, 53.38, None)),
    **_rows('BalancedSoftmax', "Ren et al. (BALMS), NeurIPS 2020, Table 5 row (3) 'Balanced Softmax', "
            "end-to-end; error = 100 - accuracy (83.1, 90.9 / 50.3, 63.1)", _BALMS,
            cifar10=(83.1, None, 90.9), cifar100=(50.3, None, 63.1), accuracy=True),
    **_rows('BalancedSoftmax', "Hong et al. (LADE), CVPR 2021, Table 2, row 'Balanced Softmax' (LADE's run); "
            "error = 100 - accuracy (49.9; also Table 10)", _LADE,
            cifar100=(None, 49.9, None), accuracy=True),
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
            "(tau = 1) [Kang et al., 2020]' = tau-normalised ERM classifier (balanced error; tau = tau* tuned "
            "on test: 21.50 / 58.76)", _MENON,
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
            "@7cccaa2), 'CE(Balanced) + SSP', final models (error)", _YANG,
            cifar10=(23.47, 19.60, 11.57), cifar100=(56.94, 52.91, 41.94)),
    **_rows('LDAM-DRW+SSP', "Yang & Xu, NeurIPS 2020, SECONDARY (paper text not read): as quoted by the "
            "Long-Tailed-Classification-Leaderboard README, 'LDAM-DRW + SSP' (error)", _YANG + ', LDAM-DRW',
            cifar10=(22.17, 17.87, 11.47)),
    **_rows('LDAM-DRW+SSP', "Yang & Xu, NeurIPS 2020, SECONDARY (paper text not read): as quoted by "
            "Alshammari et al., CVPR 2022, Table 2, row 'LDAM+SSP [78]'; error = 100 - accuracy (43.43, 47.11, "
            "58.91); the Long-Tailed-Classification-Leaderboard README gives the same errors",
            _YANG + ', LDAM-DRW', cifar100=(43.43, 47.11, 58.91), accuracy=True),
}
