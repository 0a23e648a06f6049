"""One small registry per pluggable kind: component name → its config model and its implementation.

A config section picks a component by ``name`` (``train_seg.loss.name: nal``); the registry of that kind turns
the name into the config union pydantic validates against (:meth:`Registry.config_union`) and into the
implementation the stage builds (:meth:`Registry.build`). A component also declares what it needs from the rest
of the experiment (``requires``: the supervision, the pseudo-label generator, the classifier head, ...) so that
``PipelineConfig`` checks every cross-section rule in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel

from wsss_ray.core.config_base import component_union

# What a ``requires`` may name: another config section's choice, each checked by ``PipelineConfig``.
REQUIREMENT_KEYS = ("supervision", "generator", "head", "loss")

T = TypeVar("T")


@dataclass(frozen=True)
class Component:
    """A named implementation of one kind (a classifier head, a loss, a generator, a corrector)."""

    name: str
    config: type[BaseModel]
    build: Callable[..., Any]
    # What the component needs elsewhere in the experiment: {"supervision": "boxes"}, {"generator": "box"}, ...
    requires: Mapping[str, str] = field(default_factory=dict)
    # Why, in the words the error message uses ("pools features inside boxes").
    because: str = ""

    def __getattr__(self, attribute: str) -> Any:
        # What the implementation declares (a generator's ``outputs``, an objective's ``maps``) reads through.
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return getattr(self.build, attribute)


class Registry(Generic[T]):
    """The components of one kind, chosen by the config field ``field`` (``default`` when ``name`` is omitted).

    Every implementation must subclass ``base`` (the kind's contract, ``methods/base.py``), every config must
    be named like its line, and ``requires`` may only name :data:`REQUIREMENT_KEYS`: a slip fails at import."""

    def __init__(self, field: str, default: str, components: Iterable[Component], base: type[T]) -> None:
        self.field, self.default, self.base = field, default, base
        self._components = {c.name: c for c in components}
        for component in self._components.values():
            declared = component.config.model_fields["name"].default
            if declared != component.name:
                raise ValueError(f"{field}: component {component.name!r} has a config named {declared!r}")
            if not (isinstance(component.build, type) and issubclass(component.build, base)):
                raise TypeError(f"{field}: component {component.name!r} builds {component.build!r}, which is not "
                                f"a subclass of {base.__name__}")
            if unknown := sorted(set(component.requires) - set(REQUIREMENT_KEYS)):
                raise ValueError(f"{field}: component {component.name!r} requires {unknown}; a requirement is one "
                                 f"of {list(REQUIREMENT_KEYS)}")
        if default not in self._components:
            raise ValueError(f"{field}: default {default!r} is not registered")

    def __getitem__(self, name: str) -> Component:
        try:
            return self._components[name]
        except KeyError:
            raise ValueError(f"{self.field}: unknown {name!r}; expected one of {sorted(self._components)}") from None

    def __iter__(self) -> Iterator[str]:
        """The component names, as a mapping iterates its keys."""
        return iter(self._components)

    def __contains__(self, name: object) -> bool:
        return name in self._components

    def components(self) -> list[Component]:
        return list(self._components.values())

    def implementation(self, name: str) -> type[T]:
        """The class of component ``name`` (what it declares: ``maps``, ``outputs``, ...)."""
        return self[name].build  # type: ignore[no-any-return]

    def default_config(self) -> BaseModel:
        """The default component's config with its defaults (a section's default value)."""
        return self[self.default].config()

    @property
    def names(self) -> list[str]:
        return list(self._components)

    def config_union(self) -> Any:
        """The annotated union of the component configs, discriminated by ``name``."""
        return component_union([c.config for c in self._components.values()], self.default)

    def build(self, config: BaseModel, *args: Any, **kwargs: Any) -> Any:
        """The implementation of ``config``'s component, built from it (and the kind's other arguments)."""
        return self[config.name].build(config, *args, **kwargs)  # type: ignore[attr-defined]
