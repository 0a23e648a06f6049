"""Entrypoint for ``ray job submit``: runs (or resumes) the whole pipeline of a config on the cluster.

    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python jobs/run_pipeline.py --config jobs/configs/voc.yaml --set output=s3://bucket/runs/voc
"""

import os
import sys

# With --working-dir the package is importable from the job's working directory without installing it.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wsss_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
