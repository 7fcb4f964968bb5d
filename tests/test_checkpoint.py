"""Checkpoint I/O: the original's formats load, the wrong ones are refused by content."""
import collections

import pytest
import torch

from checkpoint import backbone_weights, load_checkpoint, load_pretrained, load_weights, save_checkpoint
from errors import UserError
from models import build_model


def _original_ckpt(model, prefix=''):
    # The original's train.py format: best_acc1 is a tensor, state_dict maybe from DataParallel.
    sd = collections.OrderedDict((prefix + k, v) for k, v in model.state_dict().items())
    return {'epoch': 200, 'arch': 'resnet32', 'state_dict': sd, 'best_acc1': torch.tensor(81.3),
            'optimizer': torch.optim.SGD(model.parameters(), 0.1, momentum=0.9).state_dict()}


def test_original_format_with_module_prefix_loads(tmp_path):
    src = build_model('resnet32', 10)
    path = tmp_path / 'ckpt.pth.tar'
    torch.save(_original_ckpt(src, 'module.'), path)
    ckpt = load_checkpoint(str(path))
    assert float(ckpt['best_acc1']) == pytest.approx(81.3)
    dst = build_model('resnet32', 10)
    from checkpoint import canonical_state_dict, state_dict_of
    load_weights(dst, canonical_state_dict(state_dict_of(ckpt)), 'test')
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_pretrained_rotation_checkpoint_keeps_fc_fresh(tmp_path):
    rot = build_model('resnet32', 4)
    path = tmp_path / 'rot.pth.tar'
    save_checkpoint(_original_ckpt(rot), str(path))
    model = build_model('resnet32', 10)
    fc_before = model.fc.weight.clone()
    kind = load_pretrained(model, str(path), log=lambda s: None)
    assert kind == 'rotation/supervised'
    sd = model.state_dict()
    for k, v in rot.state_dict().items():
        if not k.startswith('fc.'):
            assert torch.equal(sd[k], v), k
    assert torch.equal(model.fc.weight, fc_before)


def test_pretrained_moco_checkpoint(tmp_path):
    q, k = build_model('resnet32', 128), build_model('resnet32', 128)
    sd = {f'module.encoder_q.{n}': v for n, v in q.state_dict().items()}
    sd.update({f'module.encoder_k.{n}': v + 1 for n, v in k.state_dict().items() if v.is_floating_point()})
    sd['module.queue'] = torch.randn(128, 64)
    path = tmp_path / 'moco_ckpt_0200.pth.tar'
    torch.save({'epoch': 200, 'arch': 'resnet32', 'state_dict': sd, 'optimizer': {}}, path)
    kind, backbone = backbone_weights(load_checkpoint(str(path)))
    assert kind == 'MoCo' and not any(n.startswith('fc.') for n in backbone)
    model = build_model('resnet32', 10, use_norm=True)
    load_pretrained(model, str(path), log=lambda s: None)
    assert torch.equal(model.conv1.weight, q.conv1.weight)


def test_pretrained_bare_state_dict_and_linear_head(tmp_path):
    src = build_model('resnet32', 10)
    sd = {('linear.' + n[3:]) if n.startswith('fc.') else n: v for n, v in src.state_dict().items()}
    path = tmp_path / 'bare.pth'
    torch.save(sd, path)
    kind = load_pretrained(build_model('resnet32', 100), str(path), log=lambda s: None)
    assert kind == 'bare state dict'


def test_pretrained_other_architecture_is_refused(tmp_path):
    path = tmp_path / 'r20.pth.tar'
    torch.save(_original_ckpt(build_model('resnet20', 10)), path)
    with pytest.raises(UserError, match='does not fit the architecture'):
        load_pretrained(build_model('resnet32', 10), str(path), log=lambda s: None)
    path = tmp_path / 'r50.pth.tar'
    torch.save({'state_dict': {'module.encoder_q.' + k: v for k, v in build_model('resnet18', 8).state_dict().items()}}, path)
    with pytest.raises(UserError, match='does not fit the architecture'):
        load_pretrained(build_model('resnet32', 10), str(path), log=lambda s: None)


def test_other_class_count_is_refused(tmp_path):
    with pytest.raises(UserError, match='another number of classes'):
        load_weights(build_model('resnet32', 10), build_model('resnet32', 100).state_dict(), 'ckpt')


def test_corrupt_and_missing_and_malicious_checkpoints(tmp_path):
    with pytest.raises(UserError, match='not found'):
        load_checkpoint(str(tmp_path / 'none.pth.tar'))
    bad = tmp_path / 'bad.pth.tar'
    bad.write_bytes(b'not a checkpoint at all')
    with pytest.raises(UserError, match=r'is not a PyTorch checkpoint \(it holds text\)'):
        load_checkpoint(str(bad))
    good = tmp_path / 'good.pth.tar'
    save_checkpoint({'state_dict': build_model('resnet20', 10).state_dict()}, str(good))
    cut = tmp_path / 'cut.pth.tar'
    cut.write_bytes(good.read_bytes()[:1000])
    # PyTorch's 300-character miniz paragraph cut to its first sentence
    with pytest.raises(UserError, match=r'cut.pth.tar is corrupt or truncated \(PytorchStreamReader failed reading zip '
                                        r'archive: failed finding central directory\)$'):
        load_checkpoint(str(cut))

    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), 'w'))

    evil = tmp_path / 'evil.pth.tar'
    torch.save({'state_dict': {}, 'payload': Evil()}, evil)
    with pytest.raises(UserError, match='refusing'):
        load_checkpoint(str(evil))
    assert not marker.exists()


def test_files_that_are_no_checkpoint_say_what_they_are(tmp_path):
    """The trial's --resume README.md or per_class_acc.png read 'possibly code; refusing to load it', an alarm
    for a plain wrong file; a run folder read 'file not found'."""
    (tmp_path / 'README.md').write_text('# a project\n')
    (tmp_path / 'plot.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)))
    (tmp_path / 'empty.pth.tar').write_bytes(b'')
    for name, what in (('README.md', 'text'), ('plot.png', 'a PNG image'), ('empty.pth.tar', 'is empty')):
        with pytest.raises(UserError) as e:
            load_checkpoint(str(tmp_path / name))
        assert 'is not a PyTorch checkpoint' in str(e.value) and what in str(e.value) and 'code' not in str(e.value)
    run = tmp_path / 'checkpoint' / 'cifar10_resnet32_CE_None_exp_0.01_ss_pretrained'
    run.mkdir(parents=True)
    with pytest.raises(UserError, match=r'is a folder, not a checkpoint file'):
        load_checkpoint(str(run))
    save_checkpoint({'state_dict': build_model('resnet20', 10).state_dict()}, str(run / 'ckpt.pth.tar'))
    with pytest.raises(UserError, match=f"--resume {run} is a folder; did you mean {run / 'ckpt.pth.tar'}\\?"):
        load_checkpoint(str(run))
