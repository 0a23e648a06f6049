"""MSPN's positive-negative hybrid learning on multi-seed votes (Sang et al., JEIT 2025), and the decoding of the
per-pixel bitmask of proposed labels the pseudo-label stage stores. Conventions: ``wsss_ray.maths.pixel_losses``."""

from __future__ import annotations

from typing import Literal

import torch

from wsss_ray.maths.pixel_losses import check_label_map, global_mean, masked_mean, pixel_log_probs

# Floor of 1 − p_c inside log(1 − p_c): p_c → 1 would otherwise give log 0 = −inf (MSPN negative learning).
_ONE_MINUS_P_MIN = 1e-6


NEGATIVE_LABELS = ("minority", "proposed_below_t", "excluded_tags")
INDIRECT_LABELS = ("present_unproposed", "all_unproposed")
TERM_MEANS = ("own_set", "labelled_pixels")


def negative_sets(noisy: torch.Tensor, majority: torch.Tensor, proposed: torch.Tensor, present: torch.Tensor,
                  negative_labels: str = "minority", indirect_labels: str = "present_unproposed",
                  unlisted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel, class) pairs of ``L_neg`` and ``L_ind``, both (N, C, H, W) bool, for the noisy pixels ``noisy``.

    ``negative_labels`` (which labels are "determined as incorrect"; the paper's rule is illegible):

    - ``minority`` (default, our reading): the labels some seed proposed at the pixel other than the majority,
      the seeds' own wrong votes. The majority stays free and the unproposed labels are pushed down by ``L_ind``,
      so, as in NLNL, the mass moves to the majority indirectly.
    - ``proposed_below_t`` (the review's literal "labels proposed by fewer than t seeds"): at a noisy pixel the
      majority has < t votes and every other label at most as many, so this is *every* proposed label, majority
      included. With ``L_ind`` every label of the image is then pushed down and the minimiser moves the mass to
      absent classes: degenerate, kept to show it.
    - ``excluded_tags`` (our first reading): classes outside the image's label set. Their p is ≈ 0 once the clean
      CE has run a little, so the term is nearly empty.

    ``indirect_labels``: ``present_unproposed`` (default) = the image's labels no seed proposed;
    ``all_unproposed`` = every class no seed proposed. ``unlisted`` (N, C) marks labels without a proposal bit
    (whether a seed proposed them is unknown): they are in neither proposal-based set.
    """
    if negative_labels not in NEGATIVE_LABELS or indirect_labels not in INDIRECT_LABELS:
        raise ValueError(f"negative_labels must be one of {NEGATIVE_LABELS} and indirect_labels one of "
                         f"{INDIRECT_LABELS}; got {negative_labels!r} and {indirect_labels!r}")
    noisy_c = noisy.unsqueeze(1)
    present_c = present[:, :, None, None]
    known = torch.ones_like(present_c) if unlisted is None else ~unlisted.bool()[:, :, None, None]
    if negative_labels == "excluded_tags":
        negative = noisy_c & ~present_c
    else:
        negative = noisy_c & proposed & known
        if negative_labels == "minority":
            classes = torch.arange(proposed.shape[1], device=proposed.device)[None, :, None, None]
            negative &= classes != majority.unsqueeze(1)  # majority 255 matches no class
    unproposed = noisy_c & ~proposed & known
    indirect = unproposed & present_c if indirect_labels == "present_unproposed" else unproposed
    return negative, indirect


def mspn_hybrid_loss(logits: torch.Tensor, majority: torch.Tensor, agreement: torch.Tensor, proposed: torch.Tensor,
                     present: torch.Tensor, agreement_threshold: int = 4, negative_weight: float = 1.0,
                     indirect_weight: float = 1.0, constraint_weight: float = 0.1,
                     negative_labels: str = "minority", indirect_labels: str = "present_unproposed",
                     unlisted: torch.Tensor | None = None,
                     term_mean: Literal["own_set", "labelled_pixels"] = "own_set",
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MSPN positive-negative hybrid learning on multi-seed votes: ``L = L_pos + w_neg·L_neg + w_ind·L_ind +
    w_pc·L_pc``.

    Our reading — the MSPN paper body is an illegible OCR; only its English abstract survives ("negative learning
    for error suppression", "indirect negative learning ... the input image does not belong to its complementary
    labels", "a prediction constraint loss" against over-confidence on noisy labels). We implement exactly this:

    * Pixel sets, from the seeds' votes. clean = agreement ≥ t and majority ≠ 255; unknown = majority = 255,
      agreement = 0 and no label proposed (crop padding, or every seed abstained), excluded from every term;
      noisy = neither clean nor unknown.
    * ``L_pos`` = CE on the majority label, mean over clean pixels (positive learning).
    * ``L_neg`` = mean over (noisy pixel, "incorrect" label c) pairs of ``−log(1 − p_c)``: negative learning
      (NLNL, Kim et al. ICCV 2019) on "labels determined as incorrect"; default: the seeds' minority labels.
    * ``L_ind`` = the same over (noisy pixel, complementary label c: not proposed by any seed) pairs: indirect
      negative learning (NLNL / JNPL). Both sets and their options: :func:`negative_sets`.
    * ``L_pc`` = mean over noisy pixels of ``Σ_c p_c log p_c`` (negative entropy): a confidence penalty
      (Pereyra et al. 2017) as the prediction constraint; minimising it keeps noisy pixels from becoming
      over-confident.
    * ``1 − p_c`` is floored at 1e-6 inside the log; an empty set contributes exactly 0 with a gradient path.
    * ``term_mean``: each term is a mean over its own set (``own_set``, default: how NLNL and JNPL average
      their positive and negative terms), or every term's sum is divided by the number of labelled pixels
      (clean + noisy, ``labelled_pixels``), so each pixel weighs the same whichever set it falls in and a term
      shrinks with its set. Which one MSPN uses the illegible paper does not say.

    Args:
        logits: (N, C, H, W) segmentation scores.
        majority: (N, H, W) int64 majority label of the seeds, 255 where every seed abstained.
        agreement: (N, H, W) int64 number of seeds that voted for ``majority``.
        proposed: (N, C, H, W) bool, label c was proposed by at least one seed at the pixel.
        present: (N, C) bool, the image's label set (background + image tags).
        agreement_threshold: t, the votes needed for a clean label (MSPN: t ∈ {3, 4, 5, 6} of 6 seeds).
        negative_weight: w_neg.
        indirect_weight: w_ind.
        constraint_weight: w_pc.
        negative_labels: minority | proposed_below_t | excluded_tags (:func:`negative_sets`).
        indirect_labels: present_unproposed | all_unproposed.
        unlisted: (N, C) bool, labels with no proposal bit (in neither proposal-based set); None = none.
        term_mean: own_set | labelled_pixels.

    Returns:
        (L, terms) with terms "pos", "neg", "indirect", "constraint" and "clean_fraction" (clean pixels / pixels
        that are not unknown, 0 if none), all detached.
    """
    check_label_map(logits, majority, "majority")
    check_label_map(logits, agreement, "agreement")
    if tuple(proposed.shape) != tuple(logits.shape):
        raise ValueError(f"proposed must be (N, C, H, W) = {tuple(logits.shape)}, got {tuple(proposed.shape)}")
    if tuple(present.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"present must be (N, C) = {tuple(logits.shape[:2])}, got {tuple(present.shape)}")
    if agreement_threshold < 1:
        raise ValueError(f"agreement_threshold must be >= 1, got {agreement_threshold}")
    if term_mean not in TERM_MEANS:
        raise ValueError(f"term_mean must be one of {TERM_MEANS}, got {term_mean!r}")

    log_p, log_p_major, has_major = pixel_log_probs(logits, majority)
    p = log_p.exp()
    proposed = proposed.bool()
    present = present.bool()

    clean = has_major & (agreement >= agreement_threshold)
    unknown = ~has_major & (agreement == 0) & ~proposed.any(dim=1)
    noisy = ~clean & ~unknown
    labelled = (~unknown).sum()

    def mean(values: torch.Tensor, members: torch.Tensor) -> torch.Tensor:
        if term_mean == "own_set":
            return masked_mean(values, members)
        return global_mean(torch.where(members, values, torch.zeros_like(values)).sum(), labelled)

    loss_pos = mean(-log_p_major, clean)

    neg_log = -torch.log((1.0 - p).clamp_min(_ONE_MINUS_P_MIN))  # −log(1 − p_c), (N, C, H, W)
    negative, indirect = negative_sets(noisy, majority, proposed, present, negative_labels, indirect_labels,
                                       unlisted)
    loss_neg = mean(neg_log, negative)
    loss_ind = mean(neg_log, indirect)

    # p·log p with log-softmax (finite even where p underflows to 0, where the product is then 0).
    neg_entropy = (p * log_p).sum(dim=1)
    loss_pc = mean(neg_entropy, noisy)

    loss = loss_pos + negative_weight * loss_neg + indirect_weight * loss_ind + constraint_weight * loss_pc
    clean_fraction = clean.sum().float() / (~unknown).sum().clamp_min(1).float()
    terms = {"pos": loss_pos.detach(), "neg": loss_neg.detach(), "indirect": loss_ind.detach(),
             "constraint": loss_pc.detach(), "clean_fraction": clean_fraction.detach()}
    return loss, terms


def decode_proposed(bits: torch.Tensor, label_lists: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Unpack MSPN's per-pixel proposal bitmask into ``proposed`` (N, C, H, W) bool.

    Bit k of ``bits[n, h, w]`` set means the k-th label of image n's label list, ``label_lists[n, k]``, was
    proposed by at least one seed at that pixel; 0 = nothing proposed. A uint8 mask holds 8 labels per image
    (background + 7 tags); the caller pads ``label_lists`` with -1, and a set bit on a -1 slot is ignored.

    Args:
        bits: (N, H, W) uint8 or int64 bitmask.
        label_lists: (N, K) int64 class ids, K ≤ 8 for uint8 bits (≤ 63 for int64), padded with -1.
        num_classes: C.

    Returns:
        (N, C, H, W) bool on ``bits``' device.
    """
    if bits.dim() != 3:
        raise ValueError(f"bits must be (N, H, W), got shape {tuple(bits.shape)}")
    if label_lists.dim() != 2 or label_lists.shape[0] != bits.shape[0]:
        raise ValueError(f"label_lists must be (N, K) with N = {bits.shape[0]}, got {tuple(label_lists.shape)}")
    num_slots = label_lists.shape[1]
    capacity = 8 if bits.dtype == torch.uint8 else 63
    if num_slots > capacity:
        raise ValueError(f"label_lists has {num_slots} slots but {bits.dtype} bits hold at most {capacity}")
    label_lists = label_lists.to(device=bits.device, dtype=torch.int64)
    if ((label_lists < -1) | (label_lists >= num_classes)).any():
        raise ValueError(f"label_lists must hold class ids in [0, {num_classes}) or -1 padding")

    n, h, w = bits.shape
    bits = bits.to(torch.int64)
    proposed = torch.zeros((n, num_classes, h, w), dtype=torch.bool, device=bits.device)
    classes = torch.arange(num_classes, device=bits.device)
    for slot in range(num_slots):
        is_set = ((bits >> slot) & 1).bool()  # (N, H, W)
        # (N, C) one-hot of this slot's class id; all False for -1 padding.
        slot_class = label_lists[:, slot, None] == classes
        proposed |= is_set[:, None] & slot_class[:, :, None, None]
    return proposed
