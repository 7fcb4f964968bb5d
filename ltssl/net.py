"""The network a semi-supervised step trains: a classifier from the model registry plus the heads its add-ons
put on the same features (ABC's balanced head), and the view of it that evaluations score.

The classifier is the child named `module`, as DistributedDataParallel's wrapper names it, so that
checkpoint.unwrap finds it and checkpoints keep train.py's keys: a train_ssl.py checkpoint's `state_dict`
loads into train.py -e, gen_pseudolabels.py and --pretrained_model. The extra heads are saved with the
method's state (`ssl_state`), the averaged network as `ema_state_dict`.
"""
import torch.nn as nn


class SSLNet(nn.Module):
    """forward(x) -> {'logits': (N, C), 'feat': (N, D), and one (N, C) entry per extra head}."""

    def __init__(self, classifier, heads=None):
        super().__init__()
        classifier.return_features = True
        self.module = classifier
        self.heads = nn.ModuleDict(heads or {})

    def forward(self, x):
        logits, feat = self.module(x)
        out = {'logits': logits, 'feat': feat}
        for name, head in self.heads.items():
            out[name] = head(feat)
        return out


class EvalHead(nn.Module):
    """`net`'s logits from head `head` ('logits': the classifier's own), for engine.evaluate."""

    def __init__(self, net, head='logits'):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, x):
        return self.net(x)[self.head]
