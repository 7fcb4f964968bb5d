"""t-SNE of a checkpoint's penultimate-layer features, coloured by class, head and tail classes marked
(the style of the paper's Figure 1).

    python tools/tsne.py --resume checkpoint/<run>/ckpt.pth.tar --dataset cifar10 --imb_factor 0.01
    python tools/tsne.py --resume checkpoint/<run>/ckpt.pth.tar --dataset digits --output tsne.png
    python tools/tsne.py --resume checkpoint/<run>/ckpt.pth.tar --dataset folder --data_path <ROOT> --imb_factor 1
    python tools/tsne.py --resume logs/ImageNet_LT/<stage>/final_model_checkpoint.pth \
        --cfg imagenet_inat/config/ImageNet_LT/feat_uniform.yaml --data_root <ImageNet root> --max-points 5000

train.py / train_semi.py checkpoints (ours or the original's) are scored on --dataset; imagenet_inat
results (final_model_checkpoint.pth: `state_dict_best` with `feat_model`) on the split files of --cfg.
Head classes are the half of the classes with the most training images (of the long-tailed training
split given by --imb_type/--imb_factor/--rand_number, or the split file); they are drawn as dots,
tail classes as crosses. At most --max-points images, drawn per class in proportion, seeded.
"""
import os
import sys

import numpy as np
from torch.utils.data import DataLoader, Subset

# `python tools/tsne.py` puts tools/ on the path, not the repository root that holds the project's modules.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cli  # noqa: E402
import dist  # noqa: E402
from checkpoint import load_checkpoint, load_weights, read_weights, strip_prefix  # noqa: E402
from dataset.samplers import get_targets  # noqa: E402
from engine import predict  # noqa: E402
from errors import UserError  # noqa: E402
from fileio import atomic_write_bytes  # noqa: E402
from utils import figure_png, new_figure  # noqa: E402


def _trainer_source(args, ckpt):
    """(feature model, eval split, training counts) of a train.py / train_semi.py checkpoint."""
    from dataset import build_transform, resolve_dataset
    from dataset.folder import checked_against_checkpoint
    from models import build_model
    if args.dataset is None:
        raise UserError(f"--resume {args.resume} is a train.py checkpoint: pass --dataset (and the imbalance "
                        f"flags of its run)")
    # A folder is read at the checkpoint's image size, with its classes and statistics.
    info = checked_against_checkpoint(resolve_dataset(args.dataset, args.data_path, ckpt.get('image_size')), ckpt,
                                      f"--resume {args.resume}")
    _, sd = read_weights(args.resume, 'classification', 'pass a classifier checkpoint')
    cosine_head = 'fc.weight' in sd and 'fc.bias' not in sd  # LDAM's NormedLinear
    model = build_model(args.arch or ckpt.get('arch', 'resnet32'), info.num_classes, use_norm=cosine_head,
                        return_features=True)
    load_weights(model, sd, f"--resume {args.resume}")
    transform = build_transform(args.dataset, train=False, info=info)
    train_set = info.build_train(args.data_path, args.imb_type, args.imb_factor, args.rand_number, transform)
    data = train_set if args.split == 'train' else info.build_val(args.data_path, transform)
    return (lambda x: model(x)[1]), model, data, np.asarray(train_set.get_cls_num_list())


def _decoupled_source(args, ckpt):
    """(feature model, eval split, training counts) of an imagenet_inat stage result."""
    from imagenet_inat import data as data_mod
    from imagenet_inat.config import load_config
    if args.cfg is None:
        raise UserError(f"--resume {args.resume} is an imagenet_inat result: pass the --cfg of its stage")
    cfg = load_config(args.cfg)
    net = cfg.networks['feat_model']
    model = net.spec.build(net.params)
    load_weights(model, strip_prefix(ckpt['state_dict_best']['feat_model'], 'module.'), f"--resume {args.resume}")
    split_dir = args.split_dir or os.path.join('imagenet_inat', 'data', cfg.dataset)
    train_set = data_mod.load_phase(cfg, 'train_plain', args.data_root, split_dir)
    split = {'train': 'train_plain', 'test': data_mod.final_split(cfg.dataset)}[args.split]
    data = train_set if split == 'train_plain' else data_mod.load_phase(cfg, split, args.data_root, split_dir)
    return model, model, data, np.bincount(train_set.targets, minlength=cfg.num_classes)


# Recognised by content: imagenet_inat results hold `state_dict_best`, everything else is a classifier.
SOURCES = {'imagenet_inat': _decoupled_source, 'classifier': _trainer_source}


def source_kind(ckpt):
    return 'imagenet_inat' if 'state_dict_best' in ckpt else 'classifier'


def subsample(labels, max_points, seed=0):
    """Indices of at most `max_points` images, each class kept in proportion (at least one image)."""
    if len(labels) <= max_points:
        return np.arange(len(labels))
    rng = np.random.RandomState(seed)
    keep = []
    for c in np.unique(labels):
        members = np.where(labels == c)[0]
        keep.append(rng.choice(members, max(1, round(len(members) * max_points / len(labels))), replace=False))
    return np.sort(np.concatenate(keep))


def extract(features, model, data, device, batch_size=200, workers=0):
    """(N, D) float32 features and (N,) labels of `data`, in order, in eval mode, on `device`."""
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == 'cuda')
    feats, labels = predict(model.to(device), loader, device, forward=features)
    return feats.flatten(1).numpy(), labels.numpy()


def head_classes(counts):
    """The half of the classes (rounded up) with the most training images; ties keep the lower id."""
    order = np.argsort(-np.asarray(counts), kind='stable')
    return set(order[:(len(counts) + 1) // 2].tolist())


def embed(feats, seed=0, perplexity=30.0):
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits
    perplexity = min(perplexity, max(1.0, (len(feats) - 1) / 3))  # sklearn needs perplexity < n
    # One OpenMP thread: after torch has run in this process, sklearn's OpenMP pool and torch's spin
    # against each other (a 60-point embedding took 10-40 s instead of 0.2 s here).
    with threadpool_limits(limits=1, user_api='openmp'):
        return TSNE(n_components=2, perplexity=perplexity, init='pca', random_state=seed).fit_transform(feats)


def plot(points, labels, counts, title):
    import matplotlib
    head = head_classes(counts)
    classes = np.unique(labels)
    cmap = matplotlib.colormaps['tab10' if len(counts) <= 10 else 'tab20' if len(counts) <= 20 else 'nipy_spectral']
    fig = new_figure((7, 6))
    ax = fig.subplots()
    for c in classes:
        xy = points[labels == c]
        color = cmap(c % 20 if len(counts) <= 20 else c / max(1, len(counts) - 1))
        ax.scatter(xy[:, 0], xy[:, 1], s=12, color=color, marker='o' if c in head else 'x', linewidths=1,
                   label=f"{c} ({'head' if c in head else 'tail'}, {counts[c]})" if len(classes) <= 20 else None)
    if len(classes) <= 20:
        ax.legend(title='class (group, training images)', fontsize=7, title_fontsize=7, loc='best', markerscale=1.2)
    ax.set_title(title + '\ndots: head classes (the half with the most training images), crosses: tail', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    return figure_png(fig, dpi=100)


def build_parser():
    from dataset import DATASETS
    from models import MODELS
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument('--resume', required=True, metavar='CKPT', help='the checkpoint whose features to embed')
    parser.add_argument('--dataset', default=None, choices=list(DATASETS), help='train.py / train_semi.py checkpoints')
    parser.add_argument('--data_path', default='./data')
    parser.add_argument('--imb_type', default='exp')
    parser.add_argument('--imb_factor', default=None, type=cli.imb_factor,
                        help='of the checkpoint\'s run (head/tail) (default: 0.01; --dataset folder: 1)')
    parser.finish(cli.default_imb_factor)
    parser.add_argument('--rand_number', default=0, type=int)
    parser.add_argument('-a', '--arch', default=None, choices=list(MODELS), help='default: the checkpoint\'s `arch`')
    parser.add_argument('--cfg', default=None, help='imagenet_inat results: the stage config')
    parser.add_argument('--data_root', default='./data', help='imagenet_inat: image root')
    parser.add_argument('--split_dir', default=None, help='imagenet_inat: folder of the split files')
    parser.add_argument('--split', default='test', choices=['test', 'train'],
                        help='test: the balanced test split (iNaturalist 2018: val); train: the long-tailed one')
    parser.add_argument('--max-points', default=5000, type=cli.positive_int, dest='max_points')
    parser.add_argument('--perplexity', default=30.0, type=cli.positive_float)
    parser.add_argument('--seed', default=0, type=int, help='of the subsample and of t-SNE')
    parser.add_argument('-j', '--workers', default=0, type=cli.nonneg_int)
    parser.add_argument('--gpu', default=None, type=cli.nonneg_int, help='GPU id to use (default: first GPU, else CPU)')
    parser.add_argument('--output', default='tsne.png')
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    ckpt = load_checkpoint(args.resume)
    features, model, data, counts = SOURCES[source_kind(ckpt)](args, ckpt)
    labels = np.asarray(get_targets(data))
    data = Subset(data, subsample(labels, args.max_points, args.seed).tolist())
    feats, labels = extract(features, model, data, dist.setup(args.gpu).device, workers=args.workers)
    print(f"=> {len(feats)} images, {feats.shape[1]}-d features from {args.resume}; running t-SNE")
    points = embed(feats, args.seed, args.perplexity)
    title = f"t-SNE of {os.path.basename(os.path.dirname(os.path.abspath(args.resume)))} ({args.split} split)"
    atomic_write_bytes(args.output, plot(points, labels, counts, title))
    print(f"=> wrote {args.output}")
    return 0


if __name__ == '__main__':
    cli.run_main(main)
