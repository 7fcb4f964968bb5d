"""Results: reading the stages' logs, the mean and std over the seeds, the md / csv / png files."""
import io
import os

from errors import UserError

def read_trainer_log(path):
    """The last epoch's top-1, shot and per-class accuracy (%) and the best top-1 of a train.py-style
    run, read by the trainer's own reader of what it writes (None before the first evaluation)."""
    import numpy as np
    from trainer import read_test_log
    if not os.path.isfile(path):
        return None
    records = read_test_log(path)
    if not records or records[-1]['best'] is None:
        return None
    last = records[-1]
    many, medium, few = last['shots'] or (np.nan, np.nan, np.nan)
    return {'best': last['best'], 'last': last['top1'], 'many': many, 'medium': medium, 'few': few,
            'per_class': None if last['per_class'] is None else 100 * last['per_class']}


def labeled_counts(args):
    """Images per class of the labeled long-tailed training set of a train.py / train_semi.py run, or
    None where its data is not at hand."""
    import numpy as np
    from dataset import resolve_dataset
    try:  # a folder's from its files (read back from its cache)
        info = resolve_dataset(args.dataset, args.data_path, getattr(args, 'image_size', None))
        train_set = info.build_train(args.data_path, args.imb_type, args.imb_factor, args.rand_number, None)
    except (UserError, OSError):
        return None
    return np.asarray(train_set.get_cls_num_list())


def with_labeled_shots(result, counts):
    """Shot groups by the labeled counts (the logs of train_semi.py count the pseudo-labeled images too)
    and the class order from the most to the fewest of them."""
    import numpy as np
    from utils import shot_accuracy
    if result is None or counts is None or result['per_class'] is None:
        return result
    shots = shot_accuracy(result['per_class'], counts)  # the mean of per-class %, so in % too
    return {**result, **shots, 'order': np.argsort(-counts, kind='stable').tolist()}


def read_decoupled_results(path):
    """imagenet_inat's results_<split>.json: the best-val weights evaluated after training (top-1 and
    shots in %, per-class accuracy as fractions, None for NaN); it has no last-epoch test number."""
    import json
    import numpy as np
    if path is None:
        return None
    def value(v):
        return np.nan if v is None else float(v)
    try:
        with open(path) as f:
            r = json.load(f)
        counts = np.asarray(r['train_class_counts'])
        return {'best': float(r['top1']), 'last': None, 'many': value(r['many_shot']),
                'medium': value(r['medium_shot']), 'few': value(r['few_shot']),
                'per_class': 100 * np.array([value(a) for a in r['cls_accs']]),
                'order': np.argsort(-counts, kind='stable').tolist()}
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path}: expected imagenet_inat's results JSON (top1, many_shot, medium_shot, few_shot, "
                        f"cls_accs, train_class_counts), could not read it ({type(e).__name__}: {e})") from None



def summarize(table, cells, seeds):
    """One row per cell: mean and std over the seeds whose result stage finished."""
    import numpy as np
    rows = []
    for k, cell in enumerate(cells[seeds[0]]):
        found = {}
        for seed in seeds:
            last = cells[seed][k].stages[-1]
            if last.status().done and last.spec.result is not None:
                r = last.result()
                if r is not None:
                    found[seed] = r
        row = {'key': cell.key, 'label': cell.label, 'group': cell.group, 'paper': cell.paper,
               'source': cell.source,
               'n': len(found), 'seeds': ' '.join(str(s) for s in found)}
        for metric in ('best', 'last'):
            err = np.array([100 - r[metric] for r in found.values() if r[metric] is not None])
            row[f'{metric}_err'] = err.mean() if len(err) else None
            row[f'{metric}_err_std'] = err.std(ddof=1) if len(err) > 1 else None
        for group in ('many', 'medium', 'few'):
            acc = np.array([r[group] for r in found.values()])
            row[group] = np.nanmean(acc) if len(acc) and np.isfinite(acc).any() else None
            row[f'{group}_std'] = np.nanstd(acc, ddof=1) if np.isfinite(acc).sum() > 1 else None
        curves = [r['per_class'] for r in found.values() if r.get('per_class') is not None]
        row['per_class'] = np.mean(curves, axis=0) if curves else None
        orders = [r['order'] for r in found.values() if r.get('order') is not None]
        row['order'] = orders[0] if orders else None
        row['diff'] = row['best_err'] - cell.paper if cell.paper is not None and found else None
        row['per_seed'] = {seed: {'best': r['best'], 'last': r['last'], **r.get('extra', {})}
                           for seed, r in found.items()}
        for key, _, _ in table.extra:
            values = [r['extra'][key] for r in found.values() if r.get('extra', {}).get(key) is not None]
            row[key] = np.mean(values) if values else None
            row[f'{key}_std'] = np.std(values, ddof=1) if len(values) > 1 else None
        row['status'] = 'done' if len(found) == len(seeds) else ('missing' if not found else
                                                               f'partial ({len(found)} of {len(seeds)} seeds)')
        rows.append(row)
    return rows


def _fmt(mean, std=None, digits=2):
    if mean is None:
        return '—'
    return f'{mean:.{digits}f}' if std is None else f'{mean:.{digits}f} ± {std:.{digits}f}'


def per_seed_lines(table, rows, seeds):
    """Markdown: every cell's best / last top-1 and extra columns per seed, for criteria paired by seed."""
    lines = ['Per seed (top-1 accuracy, %):', '',
             '| cell | seed | best | last |' + ''.join(f' {header} |' for _, header, _ in table.extra),
             '| --- |' + ' :---: |' * (3 + len(table.extra))]
    for r in rows:
        for seed in seeds:
            values = r['per_seed'].get(seed) if r.get('per_seed') else None
            if values is None:
                continue
            cells = ''.join(f" {_fmt(values.get(key), digits=3 if key.startswith('kl') else 2)} |"
                            for key, _, _ in table.extra)
            lines.append(f"| {r['label']} | {seed} | {_fmt(values['best'])} | {_fmt(values['last'])} |{cells}")
    return lines + ['']


CSV_COLUMNS = ('table', 'cell', 'label', 'n', 'seeds', 'best_err', 'best_err_std', 'last_err', 'last_err_std',
               'many', 'many_std', 'medium', 'medium_std', 'few', 'few_std', 'paper', 'best_minus_paper',
               'status', 'schedule', 'epochs')


def write_results(name, table, opts, seeds, rows):
    """<out>/<name>.csv, .md and .png (atomically); returns the markdown."""
    import csv
    from fileio import atomic_write_bytes
    epochs = opts.epochs or table.epochs
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator='\n')
    extra = [key for key, _, _ in table.extra]
    writer.writerow(CSV_COLUMNS + tuple(c for key in extra for c in (key, f'{key}_std')))
    num = lambda v: '' if v is None else f'{v:.4f}'
    for r in rows:
        writer.writerow([name, r['key'], r['label'], r['n'], r['seeds'], num(r['best_err']), num(r['best_err_std']),
                         num(r['last_err']), num(r['last_err_std']), num(r['many']), num(r['many_std']),
                         num(r['medium']), num(r['medium_std']), num(r['few']), num(r['few_std']),
                         num(r['paper']), num(r['diff']), r['status'], opts.schedule, epochs or '']
                        + [num(r.get(c)) for key in extra for c in (key, f'{key}_std')])
    lines = [f'# {name}: {table.title}', '',
             f'Top-1 error (%) on the balanced test set, mean ± std over n seeds (of {" ".join(map(str, seeds))}): '
             f'{table.measured} LR schedule: {opts.schedule_text(epochs)}.', '']
    if table.note:
        lines += [table.note, '']
    ref = table.reference
    headers = ''.join(f' {header} |' for _, header, _ in table.extra)
    lines += [f'| cell | n | best error | last error | many | medium | few |{headers} {ref} | best − {ref} |',
              '| --- |' + ' :---: |' * (8 + len(table.extra))]
    for r in rows:
        if r['n'] == 0:
            lines.append(f"| {r['label']} | 0 | missing | | | | |{' |' * len(table.extra)} {_fmt(r['paper'])} | |")
            continue
        diff = '—' if r['diff'] is None else f"{r['diff']:+.2f}"
        cells = ''.join(f" {_fmt(r[key], r[f'{key}_std'], 3 if key.startswith('kl') else 2)} |"
                        for key, _, _ in table.extra)
        lines.append(f"| {r['label']} | {r['n']} | {_fmt(r['best_err'], r['best_err_std'])} | "
                     f"{_fmt(r['last_err'], r['last_err_std'])} | {_fmt(r['many'])} | {_fmt(r['medium'])} | "
                     f"{_fmt(r['few'])} |{cells} {_fmt(r['paper'])} | {diff} |")
    if table.extra:
        lines += ['', ' '.join(f'*{header}*: {what}' for _, header, what in table.extra), '']
        lines += per_seed_lines(table, rows, seeds)
    sources = [(r['label'], r['source']) for r in rows if r['paper'] is not None and r['source']]
    if sources:
        lines += ['', f'Where each {ref} number comes from, and the recipe behind it (this table runs every row '
                      f'under one recipe, so the two differ by more than the method):', '']
        lines += [f'- {label}: {source}' for label, source in sources]
    lines += ['', f'![per-class accuracy]({name}.png)', '']
    markdown = '\n'.join(lines)
    os.makedirs(opts.out, exist_ok=True)
    atomic_write_bytes(os.path.join(opts.out, f'{name}.csv'), buf.getvalue().encode())
    atomic_write_bytes(os.path.join(opts.out, f'{name}.md'), markdown.encode())
    atomic_write_bytes(os.path.join(opts.out, f'{name}.png'), per_class_png(table, rows))
    return markdown


def per_class_png(table, rows):
    """Per-class test accuracy of every cell (mean over seeds), classes from the most to the fewest
    training images; one panel per group of cells."""
    from utils import figure_png, new_figure
    import numpy as np
    groups = list(dict.fromkeys(r['group'] for r in rows))
    fig = new_figure((5.5 * len(groups), 5.2))
    axes = fig.subplots(1, len(groups), squeeze=False)
    for ax, group in zip(axes[0], groups):
        for r in (r for r in rows if r['group'] == group):
            if r['per_class'] is None:
                ax.plot([], [], label=f"{r['label']} (missing)")
                continue
            order = r['order'] if r['order'] is not None else list(range(len(r['per_class'])))
            ax.plot(np.arange(len(order)), r['per_class'][order], marker='.' if len(order) <= 20 else None,
                    label=f"{r['label']} (n={r['n']})")
            if len(order) <= 20:
                ax.set_xticks(np.arange(len(order)), [str(c) for c in order])
        ax.set_title(group or table.title, fontsize=9)
        ax.set_xlabel('class, most to fewest training images')
        ax.set_ylabel('test accuracy (%)')
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc='upper center', bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)
    fig.tight_layout()
    return figure_png(fig, dpi=90)

