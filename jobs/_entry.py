"""Shared body of the ``ray job submit`` entrypoints in this folder (run_pipeline.py and one per stage).

    ray job submit --address http://HEAD:8265 --working-dir . --runtime-env jobs/runtime_env.yaml -- \
        python jobs/train_cls.py --config jobs/configs/voc.yaml --set output=s3://bucket/runs/voc

``python jobs/<stage>.py`` puts ``jobs/`` first on ``sys.path``, which is how the entrypoints import this module.
"""

from __future__ import annotations

import os
import sys

# The uploaded working dir (the repository root) is the job's cwd, but ``python jobs/x.py`` only puts ``jobs/``
# on sys.path; adding the root makes ``wsss_ray`` importable on the cluster without installing the package.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(command: str, argv: list[str] | None = None) -> int:
    """Run ``wsss-ray <command> <argv>`` (argv defaults to this process's arguments); returns the exit code."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    # Imported after the path change on purpose: the package is found through REPO_ROOT on a cluster.
    from wsss_ray.cli import main

    return main([command, *(sys.argv[1:] if argv is None else argv)])
