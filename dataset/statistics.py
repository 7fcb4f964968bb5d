"""Every normalisation statistic (per-channel mean, std of RGB in 0..1), with the code that uses it.

A data set's own statistics sit in its DatasetInfo (dataset/__init__.py); a user's folder computes its
own from its training images (dataset/folder.py). The LT-SSL protocols normalise CIFAR with their
codebases' values (ltssl/protocols.py picks them per protocol).
"""
# The original's CIFAR transforms (imbalanced-semi-self train.py).
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
HALF = (0.5, 0.5, 0.5)  # SVHN and digits, mean and std alike

# Normalisation of the original pretrain_moco.py: ImageNet statistics, and iNaturalist's own.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
INAT_MEAN, INAT_STD = (0.466, 0.471, 0.380), (0.195, 0.194, 0.192)

# The LT-SSL codebases' CIFAR statistics (ltssl/protocols.py): USB's CIFAR-100 (semilearn/datasets/cv_datasets/
# cifar.py; its CIFAR-10 takes ImageNet's), kekmodel's CIFAR-10 (FixMatch-pytorch; DASO's CIFAR-10), DASO's CIFAR-100.
USB_CIFAR100 = (tuple(x / 255 for x in (129.3, 124.1, 112.4)), tuple(x / 255 for x in (68.2, 65.4, 70.4)))
KEKMODEL_CIFAR10 = ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616))
DASO_CIFAR100 = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
