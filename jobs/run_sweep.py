"""Entrypoint for ``ray job submit``: runs (or resumes) a Ray Tune sweep of a search space on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/run_sweep.py --space tuning/label_smoothing.yaml --set output=s3://bucket/runs/demo

Takes the arguments of ``wsss-ray sweep`` (``--space``, ``--set k=v`` for the base config, ``--no-resume``).
Re-submitting the same command resumes the sweep from its Tune state below ``<output>/sweeps/<name>``.
"""

import sys

from _entry import run

if __name__ == "__main__":
    sys.exit(run("sweep"))
