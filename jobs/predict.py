"""Entrypoint for ``ray job submit``: segments images with a trained model (``wsss-ray predict``).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/predict.py --model s3://bucket/runs/voc/train_seg-KEY --input s3://bucket/photos/ \
        --out s3://bucket/predictions/photos --flip --crf

Takes the ``wsss-ray predict`` options (``--model``, ``--input``, ``--out``, ``--crf``, ``--scales``, ``--flip``,
``--overlay``). A resubmitted job skips the images already predicted under the same ``--out``.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("predict"))
