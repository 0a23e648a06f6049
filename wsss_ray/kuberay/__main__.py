"""``python -m wsss_ray.kuberay cluster/*.yaml``: validate manifests; see :mod:`wsss_ray.kuberay`."""

import sys

from wsss_ray.kuberay.validate import main

sys.exit(main())
