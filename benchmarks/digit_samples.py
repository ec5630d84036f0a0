"""How recognisable are the digits a run draws? A classifier trained on scikit-learn's real digits (the training
split nvae_tf's `digits` dataset uses) looks at every image; the table gives the share it assigns to some class
with probability >= 0.9, next to the same share for the held-out real digits (grey, and binarised as a
`--decoder=bernoulli` model sees them), and how evenly the samples spread over the ten classes.

    python benchmarks/digit_samples.py --model_dirs=runs/digits
    python benchmarks/digit_samples.py --model_dirs=runs/digits,runs/digits_grey --temperatures=1.0,0.8

The classifier is an RBF support-vector machine with libsvm's Platt-scaled probabilities on the original 8x8
digits (larger images are block-averaged to 8x8 first): 98.0 % right on the held-out digits. Runs must be of the
`digits` or `digits_grey` dataset at 8x8, 16x16 or another multiple of 8; each is sampled `--num_samples` times
per temperature, as decoder means by default (`--pixels=mean`, what the README's quick start draws; `auto`
or `sample` draws the pixels as `nvae_tf.sample` does by default). `--readjust_bn` re-estimates the BatchNorm
statistics at each temperature first, as the README's quick start samples.
"""

import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THRESHOLD = 0.9


def features(images):
    """`[n, s, s(, 1)]` images in [0, 1], s a multiple of 8 -> `[n, 64]`: block means on the original 8x8 grid."""
    x = np.asarray(images, np.float64)
    side = x.shape[1]
    f = side // 8
    x = x.reshape(len(x), side, side)
    return x.reshape(len(x), 8, f, 8, f).mean(axis=(2, 4)).reshape(len(x), 64)


def real_digits(seed, size=8):
    """(train, validation) images in [0, 1], `[n, size, size]` (at 8: the original digits, 17 grey levels), split
    exactly as nvae_tf's digits source splits them."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, ROOT)
    from sklearn.datasets import load_digits

    from nvae_tf import data
    from nvae_tf.config import NVAEConfig
    labels = load_digits().target
    source = data.open_source(NVAEConfig(dataset="digits", image_size=size, seed=seed))
    order = np.random.default_rng(seed).permutation(len(labels))
    split = {"train": np.sort(order[data.DIGITS_VALIDATION:]), "validation": np.sort(order[:data.DIGITS_VALIDATION])}
    out = {}
    for name, index in split.items():
        images = np.stack([x.numpy() for x in source.read(name)])  # before the pipeline's binarisation
        assert len(images) == len(index), (name, len(images), len(index))
        out[name] = (images[..., 0] / 255.0, labels[index])
    return out


def train_classifier(images, labels):
    import warnings

    from sklearn.svm import SVC
    # libsvm's own Platt scaling (deprecated by scikit-learn 1.9, still there up to 1.10). The figure depends on
    # the classifier: scikit-learn's replacement (CalibratedClassifierCV) and a logistic regression or an MLP
    # are far more confident about blurred blobs, so only figures of this script are compared with each other.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return SVC(gamma="scale", C=10.0, probability=True, random_state=0).fit(features(images), labels)


def row(name, classifier, images, labels=None):
    p = classifier.predict_proba(features(images))
    best = p.max(axis=1)
    predicted = classifier.classes_[p.argmax(axis=1)]
    counts = np.bincount(predicted, minlength=10) / len(predicted)
    entropy = -np.sum(counts[counts > 0] * np.log(counts[counts > 0])) / np.log(10)
    return {"source": name, "images": len(images), "confident": float(np.mean(best >= THRESHOLD)),
            "mean_p": float(best.mean()), "accuracy": float(np.mean(predicted == labels)) if labels is not None
            else None, "class_spread": float(entropy), "smallest_class": float(counts.min())}


def sample_run(model_dir, temperatures, num_samples, seed, pixels="auto", bn_passes=0):
    """Yields (row name, images) per temperature; with `bn_passes`, the BatchNorm statistics are readjusted
    at each temperature first (`nvae_tf.sample --readjust_bn`, its default batch of 16)."""
    sys.path.insert(0, ROOT)
    from nvae_tf import runs, sampling
    config, model, _ = runs.load_model(model_dir)
    if config.dataset not in ("digits", "digits_grey") or config.image_size % 8:
        raise SystemExit(f"error: {model_dir} is a {config.dataset} run at {config.image_size}x{config.image_size}; "
                         f"this benchmark judges digits runs at 8x8, 16x16 or another multiple of 8")
    pixels = sampling.pixel_mode(config, pixels)
    for t in temperatures:
        if bn_passes:
            sampling.readjust_batchnorm(model, t, bn_passes, seed=seed, progress=False)
        images = sampling.draw(model, num_samples, t, seed=seed, pixels=pixels)
        readjusted = ", BN readjusted" if bn_passes else ""
        yield f"{os.path.basename(os.path.normpath(model_dir))} t={t:g} ({config.decoder}, {pixels}{readjusted})", images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_dirs", default="", help="comma-separated digits run directories")
    parser.add_argument("--temperatures", default="1.0", help="comma-separated sampling temperatures")
    parser.add_argument("--num_samples", type=int, default=500, help="samples per run and temperature")
    parser.add_argument("--pixels", default="mean", choices=("auto", "sample", "mean"),
                        help="pixel values as `nvae_tf.sample --pixels` takes them")
    parser.add_argument("--seed", type=int, default=1, help="the digits split's seed (configs/digits.flags: 1)")
    parser.add_argument("--readjust_bn", action="store_true",
                        help="readjust the BatchNorm statistics at each temperature first, as `nvae_tf.sample "
                             "--readjust_bn` does")
    parser.add_argument("--bn_passes", type=int, default=500, help="sampling passes for --readjust_bn")
    args = parser.parse_args()
    dirs = [d for d in args.model_dirs.split(",") if d]
    missing = [d for d in dirs if not os.path.isfile(os.path.join(d, "config.json"))]
    if missing:
        parser.error(f"--model_dirs: {missing[0]} holds no nvae_tf run (no config.json)")
    temperatures = [float(t) for t in args.temperatures.split(",") if t]
    if args.bn_passes < 1:
        parser.error(f"--bn_passes: must be >= 1, got {args.bn_passes}")

    real = real_digits(args.seed)
    classifier = train_classifier(*real["train"])
    images, labels = real["validation"]
    upscaled = real_digits(args.seed, 16)["validation"][0]  # as a 16x16 `digits` run sees them
    binarised = (np.random.default_rng(0).random(upscaled.shape) < upscaled).astype(np.float64)
    rows = [row("real digits, held out (grey)", classifier, images, labels),
            row("real digits, held out (16x16, binarised)", classifier, binarised, labels)]
    for model_dir in dirs:
        for name, samples in sample_run(model_dir, temperatures, args.num_samples, args.seed, args.pixels,
                                        args.bn_passes if args.readjust_bn else 0):
            rows.append(row(name, classifier, samples))

    print(f"{'source':<64} {'images':>6} {'p >= 0.9':>9} {'mean max p':>11} {'accuracy':>9} "
          f"{'class spread':>13} {'rarest class':>13}")
    print("-" * 131)
    for r in rows:
        accuracy = f"{r['accuracy']:.1%}" if r["accuracy"] is not None else "-"
        print(f"{r['source']:<64} {r['images']:>6} {r['confident']:>9.1%} {r['mean_p']:>11.3f} {accuracy:>9} "
              f"{r['class_spread']:>13.3f} {r['smallest_class']:>13.1%}")
    print(f"\np >= 0.9: share of images the classifier assigns to one class with probability >= {THRESHOLD}. "
          "class spread: entropy of the predicted classes / log 10 (1: all ten equally often).")


if __name__ == "__main__":
    main()
