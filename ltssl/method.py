"""A semi-supervised method as the shared trainer runs it: the step, the network with its add-on heads, the
weight average, the optimizer recipe and the per-step learning rate, and everything a checkpoint must hold
to resume exactly. trainer.Experiment's semi-supervised fields are this object's methods (ltssl.experiment).

Checkpoint entries (besides the trainer's own: `state_dict` holds the classifier in train.py's keys):
    ema_state_dict   the averaged classifier, train.py's keys
    ssl_state        {'algorithm': 'fixmatch+abc', ..., 'heads': the trained add-on heads, 'ema_heads': their
                      average, 'ema_updates': updates so far, 'addons': {name: state}, 'pseudo': diagnostics}
"""
import math

import torch

from errors import UserError
from ltssl.net import EvalHead


class SSLMethod:
    def __init__(self, net, step, addons, ema, stats, algorithm, recipe):
        """`recipe`: lr, momentum, weight_decay, nesterov, wd_bn_bias, lr_schedule, total_steps."""
        self.net, self.step, self.addons, self.ema, self.stats = net, step, tuple(addons), ema, stats
        self.algorithm, self.recipe = algorithm, recipe
        head = next((a.eval_head for a in self.addons if a.eval_head != 'logits'), 'logits')
        self.eval_model = EvalHead(ema.module, head)

    def optimizer(self, model):
        """SGD with momentum (Nesterov where the recipe says), weight decay on every parameter, or not on
        BatchNorm weights and biases (kekmodel's and USB's rule: 'bn' or 'bias' in the parameter's name)."""
        r = self.recipe
        named = list(model.named_parameters())
        if r['wd_bn_bias']:
            groups = [{'params': [p for _, p in named]}]
        else:
            skip = [('bn' in n or 'bias' in n) for n, _ in named]
            groups = [{'params': [p for (_, p), s in zip(named, skip) if not s]},
                      {'params': [p for (_, p), s in zip(named, skip) if s], 'weight_decay': 0.0}]
        return torch.optim.SGD(groups, r['lr'], momentum=r['momentum'], weight_decay=r['weight_decay'],
                               nesterov=r['nesterov'])

    def step_lr(self, t):
        """The lr of 0-based global step t: constant, or FixMatch's lr * cos(7 pi t / (16 T)) over T steps."""
        r = self.recipe
        if r['lr_schedule'] == 'constant':
            return r['lr']
        return r['lr'] * math.cos(7 * math.pi * t / (16 * r['total_steps']))

    def after_step(self):
        self.ema.update(self.net)

    def epoch_lines(self, epoch):
        return {} if self.stats is None else {'log_pseudo.csv': self.stats.lines(epoch)}

    def state_dict(self):
        state = {'algorithm': self.algorithm, 'heads': self.net.heads.state_dict(),
                 'ema_heads': self.ema.module.heads.state_dict(), 'ema_updates': self.ema.updates,
                 'addons': {a.name: a.state_dict() for a in self.addons}}
        if self.stats is not None:
            state['pseudo'] = self.stats.state_dict()
        return {'ema_state_dict': self.ema.module.module.state_dict(), 'ssl_state': state}

    def load_state_dict(self, ckpt, source):
        """Restore from a checkpoint dict; one sentence for a checkpoint of another script or algorithm."""
        state = ckpt.get('ssl_state')
        if not isinstance(state, dict) or 'ema_state_dict' not in ckpt:
            raise UserError(f"{source} was written by {ckpt.get('script', 'another script')}.py, not train_ssl.py; "
                            f"start from its weights with --pretrained_model")
        if state.get('algorithm') != self.algorithm:
            raise UserError(f"{source} was trained with {state.get('algorithm')}; this run is {self.algorithm}: "
                            f"pass the --ssl_alg / --imb_alg it was trained with")
        try:
            self.net.heads.load_state_dict(state['heads'])
            self.ema.module.heads.load_state_dict(state['ema_heads'])
            self.ema.module.module.load_state_dict(ckpt['ema_state_dict'])
            self.ema.load_updates(int(state['ema_updates']))
            for addon in self.addons:
                _check_shapes(addon.state_dict(), state['addons'][addon.name])
                addon.load_state_dict(state['addons'][addon.name])
            if self.stats is not None:
                _check_shapes({'sums': self.stats.sums}, state['pseudo'])
                self.stats.load_state_dict(state['pseudo'])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"{source}: its semi-supervised state does not fit this run (another split, data set or "
                            f"model? {str(e).splitlines()[0]})") from None


def _check_shapes(own, saved):
    for key, value in own.items():
        if tuple(saved[key].shape) != tuple(value.shape):
            raise ValueError(f"{key} is {tuple(saved[key].shape)} in the file, {tuple(value.shape)} here")
