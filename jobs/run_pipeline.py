"""Entrypoint for ``ray job submit``: runs (or resumes) the whole pipeline of a config on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run_pipeline.py --config jobs/configs/voc.yaml --set output=s3://bucket/runs/voc

Takes the arguments of ``wsss-ray run`` (``--config``, ``--set k=v``, ``--until STAGE``). One stage (and the
finished stages before it, which are skipped) runs with jobs/ingest.py, train_cls.py, pseudo_labels.py,
train_seg.py or evaluate.py instead.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("run"))
