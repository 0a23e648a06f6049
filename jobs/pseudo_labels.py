"""Entrypoint for ``ray job submit``: runs the pipeline up to and including ``pseudo_labels``.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/pseudo_labels.py --config jobs/configs/voc.yaml --set output=s3://bucket/runs/voc

Stages before it that already finished under the same output are skipped, so submitting the stages one by one
builds up the same outputs as jobs/run_pipeline.py. Takes ``--config`` and ``--set key=value``.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("pseudo-labels"))
