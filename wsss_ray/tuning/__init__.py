"""Ray Tune sweeps over pipeline configs: search spaces (``space``) and the sweep driver (``sweep``)."""

from wsss_ray.tuning.space import ParamSpec, SearchSpace, load_space

__all__ = ["ParamSpec", "SearchSpace", "load_space", "run_sweep"]


def __getattr__(name: str) -> object:
    # ``sweep`` imports Ray Tune; loading it lazily keeps ``wsss-ray config``-style validation fast.
    if name == "run_sweep":
        from wsss_ray.tuning.sweep import run_sweep

        return run_sweep
    raise AttributeError(name)
