"""The one kind of registry every component table of normopt is: norms, optimizers,
attentions, feed-forwards and diagnostics (each module that owns a table creates it here
and registers its built-ins), and the config keys a component declares for itself.

A plugin (:mod:`normopt.plugins`) registers into the very same tables through
:meth:`Registry.register`; while its module is being imported, every registration is
credited to it, so a clash names both owners, a run can record which plugin each of its
components came from, and the plugin's entries can be forgotten again. Nothing here
imports torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")

BUILT_IN = "normopt"  # the owner of the components normopt ships
_owner_stack: list[str] = []  # the plugin whose module is being imported (innermost last)
REGISTRIES: list[Registry] = []
_generation = 0  # counts changes to the tables, so what is derived from them can be cached


def generation() -> int:
    """A number that changes whenever a component is registered or forgotten."""
    return _generation


def _changed() -> None:
    global _generation
    _generation += 1


def current_owner() -> str:
    """Who a registration made now is credited to: the plugin being imported, else normopt."""
    return _owner_stack[-1] if _owner_stack else BUILT_IN


class crediting:
    """``with crediting(name):`` credits the registrations made inside to plugin ``name``."""

    def __init__(self, owner: str):
        self.owner = owner

    def __enter__(self) -> None:
        _owner_stack.append(self.owner)

    def __exit__(self, *exc) -> None:
        _owner_stack.pop()


class Registry(Mapping[str, T], Generic[T]):
    """name -> component, in registration order (the built-ins first, in their module's
    order: the order of config messages and of the report's rows and columns).

    ``section`` is the config section a component's own keys join (see
    :func:`declare_keys`); ``name_of`` reads a component's registry name."""

    def __init__(self, kind: str, plural: str, section: str, name_of=lambda entry: entry.name, check=None):
        self.kind, self.plural, self.section, self._name_of = kind, plural, section, name_of
        self._check = check  # entry -> a problem in words, or None
        self._entries: dict[str, T] = {}
        self._owners: dict[str, str] = {}
        REGISTRIES.append(self)

    def register(self, entry: T) -> T:
        """Add ``entry`` under its name (usable as a class decorator); a name already taken
        is refused, naming both owners. Its ``config`` dataclass, if it has one, declares
        its own keys (:func:`declare_keys`)."""
        name = self._name_of(entry)
        if not isinstance(name, str) or not all(part.isidentifier() for part in name.split(".")):
            raise ValueError(f"a {self.kind}'s name must be an identifier (or dotted ones), got {name!r}")
        owner = current_owner()
        problem = self._check(entry) if self._check is not None else None
        if problem:
            raise ValueError(f"{self.kind} {name!r}: {problem}")
        if name in self._entries:
            raise ValueError(
                f"{self.kind} {name!r} is registered twice (by {self._owners[name]} and by {owner}); "
                f"give one of them another name"
            )
        config = getattr(entry, "config", None)
        if config is not None:
            declare_keys(self.section, name, config)
        self._entries[name] = entry
        self._owners[name] = owner
        _changed()
        return entry

    def get_entry(self, name: str) -> T:
        """The component registered as ``name``; a ValueError lists the registered names."""
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(f"unknown {self.kind} {name!r} ({self.unknown_hint()})") from None

    def unknown_hint(self) -> str:
        return f"{self.plural}: {', '.join(self._entries)}; a plugin's {self.kind} needs its plugin named"

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def owner(self, name: str) -> str:
        """The plugin that registered ``name`` (:data:`BUILT_IN` for normopt's own)."""
        return self._owners[name]

    def forget(self, owner: str) -> None:
        """Drop every entry ``owner`` registered (and the keys they declared)."""
        for name in [n for n, o in self._owners.items() if o == owner]:
            del self._entries[name], self._owners[name]
            _declared.pop((self.section, name), None)
            _changed()

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


def check_registered(registry: Registry, key: str, name: str | None) -> None:
    """Refuse a config value naming a component (None = a default) that ``registry`` lacks:
    a UserError naming ``key``, the registered names and how a plugin's would get there."""
    from normopt.key_roles import require

    require(
        name is None or name in registry,
        key,
        f"{name!r} is not one of {', '.join(registry)} (a plugin's {registry.kind}: name its "
        f"plugin with --plugin or plugins:)",
    )


# ------------------------------------------------------------------ component config keys

# (section, component name) -> the component's config dataclass: its fields join ``section``
# as ``<component>_<field>`` (the spelling of the built-ins' own keys, e.g. optim.normuon_beta2)
_declared: dict[tuple[str, str], type] = {}
_extended: dict[tuple, type] = {}


def declare_keys(section: str, component: str, config: type) -> None:
    """Let ``component``'s config dataclass (fields declared with
    :func:`normopt.key_roles.role`: type, default, resume role, help) add its keys to
    ``section``, each spelled ``<component>_<field>``."""
    if not dataclasses.is_dataclass(config):
        raise ValueError(f"{component}: its config must be a dataclass, got {config!r}")
    from normopt.key_roles import HELP, ROLE

    for f in dataclasses.fields(config):
        if ROLE not in f.metadata or HELP not in f.metadata:
            raise ValueError(f"{component}: config field {f.name!r} must be declared with role(ROLE, default, help)")
    _declared[(section, component)] = config


def declared_keys(section: str) -> dict[str, type]:
    """Component name -> config dataclass of the components with keys in ``section``."""
    return {component: cls for (s, component), cls in _declared.items() if s == section}


def key_name(component: str, field_name: str) -> str:
    return f"{component}_{field_name}"


def section_class(base: type, section: str) -> type:
    """``base`` (a config section's dataclass) with the keys its components declared
    (:func:`declare_keys`) added as fields; ``base`` itself when there are none. The
    extended class validates the declared keys too, through each component config's
    own ``validate`` (when it has one)."""
    declared = declared_keys(section)
    if not declared:
        return base
    signature = (base, section, *((c, cls) for c, cls in declared.items()))
    if signature in _extended:
        return _extended[signature]
    import typing

    fields = []
    for component, config in declared.items():
        hints = typing.get_type_hints(config)
        for f in dataclasses.fields(config):
            name = key_name(component, f.name)
            if name in {g.name for g in dataclasses.fields(base)}:
                raise ValueError(f"{section}.{name}: declared by {component} but normopt already has that key")
            default = (
                dataclasses.field(default=f.default, metadata=f.metadata)
                if f.default is not dataclasses.MISSING
                else dataclasses.field(default_factory=f.default_factory, metadata=f.metadata)
            )
            fields.append((name, hints[f.name], default))

    def validate(self, *args, **kwargs) -> None:
        base.validate(self, *args, **kwargs)
        for component in declared:
            options = component_options(self, component)
            if options is not None and hasattr(options, "validate"):
                options.validate()

    cls = dataclasses.make_dataclass(base.__name__, fields, bases=(base,), namespace={"validate": validate})
    cls.__module__ = base.__module__
    _extended[signature] = cls
    return cls


def component_options(section_values: Any, component: str) -> Any | None:
    """The config dataclass instance of ``component``'s own keys, read from a section
    (``cfg.optim`` for an optimizer's); None when the component declared no keys there."""
    for (_, name), config in _declared.items():
        keys = {f.name: key_name(component, f.name) for f in dataclasses.fields(config)}
        if name == component and all(hasattr(section_values, key) for key in keys.values()):
            return config(**{field: getattr(section_values, key) for field, key in keys.items()})
    return None
