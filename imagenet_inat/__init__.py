"""Decoupled long-tailed training (Kang et al., ICLR 2020) on ImageNet-LT and iNaturalist 2018:
stage 1 (instance- or class-balanced) from self-supervised weights, then cRT, tau-norm or LWS.
Run it as `python -m imagenet_inat.main`; see docs/imagenet_inat.md."""
