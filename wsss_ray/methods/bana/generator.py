"""BANA's pseudo-label generator: background attention + box CAMs → DenseCRF (Y_crf), prototypes → Y_ret."""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from wsss_ray.core.labels import IGNORE_LABEL
from wsss_ray.maths.crf import crf_inference
from wsss_ray.maths.inference import multiscale_cams, normalize
from wsss_ray.methods.bana.boxes import (
    background_attention,
    box_constrained_argmax,
    box_fill,
    box_unaries,
    boxes_array,
    cell_centres_in_boxes,
    class_box_masks,
    retrieval_prototypes,
    retrieve,
)
from wsss_ray.methods.bana.config import BoxGeneratorConfig
from wsss_ray.methods.base import Generator


class BoxGenerator(Generator[BoxGeneratorConfig]):
    """BANA: background attention (BAP) + box CAMs → DenseCRF (``pseudo`` = Y_crf); prototypes of Y_crf
    retrieve ``retrieved`` (Y_ret); ``box_fill`` is the filled-box baseline.

    The classifier is ``train_cls``'s: its CAMs give the in-box unaries u_c (a BAP head's follow its
    ``classifier``: ReLU(f·w_c) by default, Eq. 6), and with ``ret_fallback: classifier`` its rows (a head with a
    background row: BAP, KTSE) give Y_ret's prototype of a class Y_crf lacks. BAP's background queries and
    attention are computed from its features at generation time with the generator's grid (BANA: N = 1; the
    head trains with N = 4).
    """

    outputs: ClassVar[dict[str, int]] = {"pseudo": IGNORE_LABEL, "retrieved": IGNORE_LABEL, "box_fill": IGNORE_LABEL}
    titles: ClassVar[dict[str, str]] = {"pseudo": "pseudo-mask", "retrieved": "retrieved (Y_ret)",
                                        "box_fill": "box fill"}

    @torch.no_grad()
    def model_step(self, model: torch.nn.Module, image: np.ndarray, record: dict[str, Any], labels: list[int],
                   device: str) -> dict[str, np.ndarray]:
        h, w = image.shape[:2]
        boxes = boxes_array(record.get("boxes"))
        x = normalize(torch.from_numpy(np.ascontiguousarray(image))[None].to(device))
        features = model.backbone(x)[0].float()
        feats = features.cpu().numpy()
        # Every box, whatever its class, says "not background" for the background queries.
        background = ~cell_centres_in_boxes(boxes, feats.shape[1:], (h, w))
        attention = torch.from_numpy(background_attention(feats, background, self.config.grid))
        attention = F.interpolate(attention[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        # The raw A at every pixel: BANA's relative threshold takes the max over the whole map; u_0 = 1 outside
        # the boxes is set in box_unaries.
        attention_map = attention.numpy().astype(np.float32)
        cams = multiscale_cams(model, image, labels, self.config.scales, self.config.flip, device)
        arrays = {"cams": cams, "attention": attention_map, "features": feats}
        head = getattr(model, "head", None)
        weights = head.class_weights() if head is not None and self.config.ret_fallback == "classifier" else None
        if weights is not None:
            # Rows of background and the tags, in [0, *labels] order: Y_ret's prototype of a class Y_crf lacks.
            arrays["class_weights"] = weights[[0, *labels]].float().cpu().numpy()
        return arrays

    def refine_step(self, image: np.ndarray, arrays: dict[str, np.ndarray], record: dict[str, Any],
                    labels: list[int]) -> dict[str, np.ndarray]:
        shape = image.shape[:2]
        boxes = boxes_array(record.get("boxes"))
        fill = box_fill(boxes, shape)
        if not labels:
            empty = np.zeros(shape, np.uint8)
            return {"pseudo": empty, "retrieved": empty.copy(), "box_fill": fill}
        cams = arrays["cams"].astype(np.float32)
        features = arrays["features"].astype(np.float32)
        cfg = self.config
        probs = box_unaries(cams, labels, boxes, arrays["attention"].astype(np.float32), cfg.bg_threshold,
                            cfg.bg_threshold_mode, cfg.unary, cfg.cam_norm)
        inside = class_box_masks(boxes, labels, shape)
        y_crf = box_constrained_argmax(crf_inference(image, probs, cfg.crf), labels, inside)
        # Y_ret obeys the boxes like u_c does: class c only inside a box of class c, background anywhere.
        allowed = {int(c): inside[k] for k, c in enumerate(labels)}
        protos = retrieval_prototypes(features, y_crf, [0, *labels], arrays.get("class_weights"))
        y_ret = retrieve(features, protos, shape, allowed)
        return {"pseudo": y_crf, "retrieved": y_ret, "box_fill": fill}
