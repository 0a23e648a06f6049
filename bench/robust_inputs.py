"""The training inputs of the robust-training bench (``bench/robust_training.py``) and their static figures.

The generated VOC data's training masks are corrupted, at a fixed seed, with the kinds of noise pseudo-masks
have; every method's maps are made from the same corrupted masks the way their generators make them. The
figures here need no training: they score the stored maps against the clean masks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fidelity_figures as ff
import numpy as np
from scipy import ndimage

from wsss_ray.data.image_io import encode_label_png, read_image, read_label
from wsss_ray.data.weak_labels import weak_tags
from wsss_ray.maths.metrics import ConfusionMatrix
from wsss_ray.methods.bana.boxes import prototypes, retrieve
from wsss_ray.methods.cdsp.distance import boundary_distance, scribble_distance, to_uint8
from wsss_ray.methods.mspn.seeds import proposals, vote

NUM_CLASSES = 21
MSPN_THRESHOLDS = (3, 4, 5, 6)

# ------------------------------------------------------------------------------------------------- noise


def corrupt(mask: np.ndarray, rng: np.random.Generator, strength: float, num_classes: int) -> np.ndarray:
    """Structured pseudo-mask noise on a clean label map (255 kept as 255)."""
    out = mask.copy()
    h, w = mask.shape
    for label in [v for v in np.unique(mask) if v not in (0, 255)]:
        objects, count = ndimage.label(mask == label)
        for k in range(1, count + 1):
            region = objects == k
            roll = rng.random()
            if roll < 0.15 * strength:  # missing object
                out[region] = 0
                continue
            if roll < 0.35 * strength:  # swapped for its similar class (1↔2, 3↔4, ...)
                partner = label + 1 if label % 2 == 1 else label - 1
                out[region] = partner if 1 <= partner <= num_classes else label
            radius = int(rng.integers(1, 5))
            if rng.random() < 0.5 * strength:  # boundary error: eroded or dilated
                structure = ndimage.generate_binary_structure(2, 1)
                if rng.random() < 0.5:
                    eroded = ndimage.binary_erosion(region, structure, iterations=radius)
                    out[region & ~eroded] = 0
                else:
                    grown = ndimage.binary_dilation(region, structure, iterations=radius)
                    out[grown & (mask == 0)] = out[region][0]
    if rng.random() < 0.3 * strength:  # spurious blob of a random class
        cy, cx, r = int(rng.integers(0, h)), int(rng.integers(0, w)), int(rng.integers(h // 10, h // 5 + 2))
        yy, xx = np.ogrid[:h, :w]
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        out[blob & (mask != 255)] = int(rng.integers(1, num_classes + 1))
    return out


def colour_features(image: np.ndarray, stride: int = 4) -> np.ndarray:
    """(3 + 3, h, w): mean and std colour per stride×stride cell — the stand-in features for Y_ret."""
    h, w = image.shape[0] // stride, image.shape[1] // stride
    cells = image[: h * stride, : w * stride].astype(np.float32).reshape(h, stride, w, stride, 3) / 255.0
    mean, std = cells.mean(axis=(1, 3)), cells.std(axis=(1, 3))
    return np.concatenate([mean - 0.5, std * 4], axis=-1).transpose(2, 0, 1)


def retrieved_map(image: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """The stand-in for BANA's Y_ret: each pixel's nearest prototype (over colour features) of the classes in
    the noisy mask."""
    feats = colour_features(image)
    present = sorted(set(np.unique(noisy).tolist()) - {255})
    return retrieve(feats, prototypes(feats, noisy, present), noisy.shape, None)


def make_inputs(train: list[dict[str, Any]], out: Path, num_classes: int, seed: int) -> list[dict[str, Any]]:
    """Corrupted masks and every method's maps, written as PNGs; returns train_seg records."""
    rng = np.random.default_rng(seed)
    records = []
    for r in train:
        truth = read_label(r["mask_uri"])
        noisy = corrupt(truth, rng, 1.0, num_classes)
        image = read_image(r["image_uri"])
        tags = weak_tags(r, "tags")
        labels = [0, *tags]
        y_ret = retrieved_map(image, noisy)
        seeds = np.stack([corrupt(truth, rng, 0.5, num_classes) for _ in range(6)])
        majority, agreement = vote(seeds)
        scribble = read_label(r["scribble_uri"])
        arrays = {"label": noisy, "retrieved": y_ret, "majority": majority, "agreement": agreement,
                  "proposed": proposals(seeds, labels), "majority_ce": majority,
                  "dist_scribble": to_uint8(scribble_distance(scribble, 2.0)),
                  "dist_boundary": to_uint8(boundary_distance(noisy, 7.0)), "clean": truth}
        row = {"image_id": r["image_id"], "image_uri": r["image_uri"], "scribble_uri": r["scribble_uri"],
               "label_list": labels}
        for name, array in arrays.items():
            path = out / name / f"{r['image_id']}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_label_png(array.astype(np.uint8)))
            row[f"{name}_uri"] = str(path)
        records.append(row)
    return records


def mask_miou(records: list[dict[str, Any]], key: str) -> float:
    """mIoU of a stored map against the clean masks (how noisy the training input is)."""
    cm = ConfusionMatrix(NUM_CLASSES)
    for r in records:
        cm.update(read_label(r["clean_uri"]), read_label(r[f"{key}_uri"]))
    return float(cm.to_dict([str(i) for i in range(NUM_CLASSES)])["miou"])



def static_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of the stored maps alone, summed over the training images at full resolution: the input
    mIoUs, MSPN's clean-pixel split and negative-target precision per threshold, and NAL's S / ~S split."""
    mspn = {t: {} for t in MSPN_THRESHOLDS}
    nal: ff.Counts = {}
    for r in records:
        gt, maps = read_label(r["clean_uri"]), {k: read_label(r[f"{k}_uri"]) for k in
                                                  ("label", "retrieved", "majority", "agreement", "proposed")}
        nal = ff.add_counts(nal, ff.nal_input_counts(maps["label"], maps["retrieved"], gt))
        for t in MSPN_THRESHOLDS:
            counts = ff.add_counts(ff.mspn_clean_counts(maps["majority"], maps["agreement"], gt, t),
                                   ff.negative_target_counts(maps["majority"], maps["agreement"], maps["proposed"],
                                                             r["label_list"], gt, t, NUM_CLASSES))
            mspn[t] = ff.add_counts(mspn[t], counts)
    return {"input_miou": {key: mask_miou(records, key) for key in ("label", "retrieved", "majority")},
            "mspn": mspn, "nal": nal}


def print_static(figures: dict[str, Any]) -> None:
    m = figures["input_miou"]
    print(f"training inputs vs clean masks (mIoU): corrupted (Y_crf, Ω̃, OuT's pseudo-mask) {100 * m['label']:.1f}, "
          f"Y_ret {100 * m['retrieved']:.1f}, MSPN seed majority {100 * m['majority']:.1f}")
    n = figures["nal"]
    print(f"NAL input: |~S| = {n['disagree']} of {n['labelled']} labelled pixels "
          f"({100 * ff.ratio(n['disagree'], n['labelled']):.1f} %); Y_crf precision on ~S "
          f"{100 * ff.ratio(n['disagree_correct'], n['disagree']):.1f} % vs on S "
          f"{100 * ff.ratio(n['agree_correct'], n['agree']):.1f} %")
    print("MSPN seed vote (6 seeds): t, clean precision, coverage, noisy pixels' majority right, and the "
          "negative targets' precision (pairs whose label ≠ GT) per reading")
    print(f"{'t':>2s} {'clean prec':>10s} {'coverage':>9s} {'noisy maj.':>10s} {'minority':>9s} {'proposed':>9s} "
          f"{'excl. tags':>10s} {'#clean':>8s} {'#noisy':>7s}")
    for t, c in figures["mspn"].items():
        print(f"{int(t):2d} {100 * ff.ratio(c['clean_correct'], c['clean']):10.1f} "
              f"{100 * ff.ratio(c['clean'], c['valid']):9.2f} {100 * ff.ratio(c['noisy_correct'], c['noisy']):10.1f} "
              + " ".join(f"{100 * ff.ratio(c[f'{k}_right'], c[f'{k}_pairs']):9.1f}"
                         for k in ("minority", "proposed")) +
              f" {100 * ff.ratio(c['excluded_tags_right'], c['excluded_tags_pairs']):10.1f} "
              f"{c['clean']:8d} {c['noisy']:7d}")
