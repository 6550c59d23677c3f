"""Plugins: a norm, optimizer, attention, feed-forward or diagnostic from the researcher's own
file, registered into the same tables normopt's own components use (:mod:`normopt.registry`).

Where plugins come from, and only from there:

* ``--plugin PATH_OR_MODULE`` on any command (repeatable);
* ``plugins:`` in the config file passed with ``--config`` (a list; paths relative to the
  file) or in a factorial spec (its cells get them on their command line);
* installed packages declaring an entry point in the group ``normopt.plugins`` (loaded by
  every command unless ``NORMOPT_DISABLE_PLUGIN_AUTOLOAD=1``): installing a package is the
  same act of trust as naming its file.

Nothing is imported because a run directory, checkpoint, cell config or experiment file on
disk names it. A run records each loaded plugin's name, source and SHA-256 content hash
(``plugins.json`` in the run directory); resuming, reporting, sampling or exporting the run
requires the same plugins to be loaded again, unchanged (:func:`check_run_plugins`): a
changed norm is a change of the math.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from importlib.metadata import entry_points
from pathlib import Path

from normopt.errors import UserError
from normopt.registry import REGISTRIES, crediting
from normopt.run_dir import PLUGINS_FILE

ENTRY_POINT_GROUP = "normopt.plugins"
AUTOLOAD_OFF = "NORMOPT_DISABLE_PLUGIN_AUTOLOAD"


@dataclass(frozen=True)
class Plugin:
    """One loaded plugin: its name (file stem, module or entry-point name), where it came from,
    the SHA-256 of its source (the file, or every .py file of its package) and the components
    it registered (``kind:name``)."""

    name: str
    source: str
    sha256: str
    components: tuple[str, ...] = ()

    def describe(self) -> str:
        return f"{self.name} ({self.source}, sha256 {self.sha256[:12]})"


_loaded: dict[str, Plugin] = {}  # by name, in load order


def loaded_plugins() -> list[Plugin]:
    return list(_loaded.values())


def source_digest(path: Path) -> str:
    """SHA-256 of a plugin's source: the file's bytes, or for a package folder every ``.py``
    file below it (relative path and bytes, in sorted order)."""
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts):
            digest.update(str(file.relative_to(path)).encode() + b"\0" + file.read_bytes() + b"\0")
    else:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _is_path(spec: str, base: Path | None) -> bool:
    return spec.endswith(".py") or "/" in spec or os.sep in spec or (base is not None and (base / spec).exists())


def _module_file(module_name: str) -> Path | None:
    """The file or package folder an importable module's source lives in, without importing
    it (None when it is not importable)."""
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    if found is None or found.origin in (None, "built-in", "frozen"):
        return None
    origin = Path(found.origin)
    return origin.parent if origin.name == "__init__.py" else origin


def _credited_components(name: str) -> tuple[str, ...]:
    return tuple(f"{r.kind}:{entry}" for r in REGISTRIES for entry in r if r.owner(entry) == name)


HOOK = "normopt_plugin"  # a plugin module's optional registration function, given normopt.extend


def call_hook(module) -> None:
    """Call the module's ``normopt_plugin(normopt)`` with :mod:`normopt.extend`, if it has one
    (a module that registers at import needs none)."""
    hook = getattr(module, HOOK, None)
    if callable(hook):
        import normopt.extend

        hook(normopt.extend)


def _import(name: str, source: str, digest_path: Path, load) -> Plugin:
    """Run ``load`` (the import) with every registration credited to ``name`` and record the
    plugin, its source hashed as it was imported; any failure is one line naming the plugin."""
    import normopt.extend  # noqa: F401  (every registry fills with the built-ins first, credited to normopt)

    digest = source_digest(digest_path)
    try:
        with crediting(name):
            load()
    except UserError as exc:
        forget(name)
        raise UserError(f"plugin {name} ({source}): {exc}") from None
    except Exception as exc:  # the plugin's own code: whatever it raises is its problem, in one line
        forget(name)
        detail = str(exc).splitlines()[0] if str(exc) else ""
        raise UserError(f"plugin {name} ({source}) failed to load: {type(exc).__name__}: {detail}") from None
    _loaded[name] = Plugin(name, source, digest, _credited_components(name))
    return _loaded[name]


def load_plugin(spec: str, base: Path | None = None) -> Plugin:
    """Import one plugin (a ``.py`` file, a package folder, or an importable module name);
    loading the same source again is a no-op. Paths are relative to ``base`` (the folder of
    the config or spec that names them; default the working directory)."""
    if _is_path(spec, base):
        path = Path(spec).expanduser()
        path = (base / path if base is not None and not path.is_absolute() else path).resolve()
        if not path.exists():
            raise UserError(f"plugin {spec}: no such file or folder ({path})")
        if path.is_dir() and not (path / "__init__.py").is_file():
            raise UserError(f"plugin {spec}: {path} is a folder without __init__.py (name a .py file or a package)")
        name, source = path.stem if path.is_file() else path.name, str(path)
        module_name = "normopt_plugin_" + re.sub(r"\W", "_", name)

        def load() -> None:
            init = path / "__init__.py" if path.is_dir() else path
            locations = [str(path)] if path.is_dir() else None
            module_spec = importlib.util.spec_from_file_location(
                module_name, init, submodule_search_locations=locations
            )
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_name] = module  # dataclasses and pickling-free lookups need it there
            try:
                module_spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module_name, None)
                raise
            call_hook(module)

        digest_path = path
    else:
        name, source = spec, f"module {spec}"
        digest_path = _module_file(spec)
        if digest_path is None:
            raise UserError(
                f"plugin {spec}: no importable module of that name (a file needs its path, e.g. ./{spec}.py)"
            )

        def load() -> None:
            call_hook(importlib.import_module(spec))

    if name in _loaded:
        if _loaded[name].source != source:
            raise UserError(f"plugin {spec}: another plugin named {name} is already loaded ({_loaded[name].source})")
        return _loaded[name]
    return _import(name, source, digest_path, load)


def load_plugins(specs, base: Path | None = None) -> list[Plugin]:
    """:func:`load_plugin` for each of ``specs``, after the installed entry points (once)."""
    load_entry_points()
    return [load_plugin(str(spec), base) for spec in specs]


_entry_points_loaded = False


def load_entry_points() -> None:
    """Import every installed ``normopt.plugins`` entry point (unless switched off)."""
    global _entry_points_loaded
    if _entry_points_loaded or os.environ.get(AUTOLOAD_OFF) == "1":
        return
    _entry_points_loaded = True
    for point in entry_points(group=ENTRY_POINT_GROUP):
        module = point.value.split(":", 1)[0]
        file = _module_file(module)
        if file is None:
            raise UserError(f"entry point {point.name} ({ENTRY_POINT_GROUP}): module {module} is not importable")
        if point.name not in _loaded:
            source = f"entry point {point.name}"
            _import(point.name, source, file, lambda m=module: call_hook(importlib.import_module(m)))


def plugin_args(plugins: list[Plugin] | None = None) -> list[str]:
    """``--plugin`` arguments that load ``plugins`` (default: all loaded) in a child process
    (a grid's cells, its SLURM jobs); entry points need none, every process loads them."""
    args = []
    for plugin in loaded_plugins() if plugins is None else plugins:
        if plugin.source.startswith("entry point "):
            continue
        args.append(f"--plugin={plugin.name if plugin.source.startswith('module ') else plugin.source}")
    return args


def forget(name: str) -> None:
    """Drop a plugin's registrations (a failed load, or a test putting the tables back)."""
    for registry in REGISTRIES:
        registry.forget(name)
    _loaded.pop(name, None)


def forget_all() -> None:
    """Every plugin forgotten; the next :func:`load_plugins` loads the entry points again."""
    global _entry_points_loaded
    for name in list(_loaded):
        forget(name)
    _entry_points_loaded = False


# ------------------------------------------------------------------ the run directory's record


def write_run_plugins(run_dir: Path) -> None:
    """Record the loaded plugins in ``run_dir/plugins.json`` (none loaded: no file). A resumed
    run has passed :func:`check_run_plugins`, so the loaded ones include every recorded one."""
    path = Path(run_dir) / PLUGINS_FILE
    plugins = [asdict(p) for p in loaded_plugins()]
    if not plugins:
        path.unlink(missing_ok=True)
        return
    for p in plugins:
        p["components"] = list(p["components"])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"plugins": plugins}, indent=1) + "\n")
    os.replace(tmp, path)


def read_run_plugins(run_dir: Path) -> list[Plugin]:
    """The plugins ``run_dir`` records (none without a ``plugins.json``); read as data, never imported."""
    path = Path(run_dir) / PLUGINS_FILE
    if not path.is_file():
        return []
    try:
        raw = json.loads(path.read_text())
        return [
            Plugin(str(p["name"]), str(p["source"]), str(p["sha256"]), tuple(p.get("components", ())))
            for p in raw["plugins"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: cannot read the run's plugin record ({type(exc).__name__})") from None


def check_run_plugins(run_dir: Path, doing: str) -> None:
    """Refuse, in one line, to go on (``doing``: "resume", "report", "sample", "export") with
    a run whose recorded plugins are not all loaded now, unchanged."""
    loaded = {p.name: p for p in loaded_plugins()}
    for recorded in read_run_plugins(run_dir):
        now = loaded.get(recorded.name)
        if now is None:
            raise UserError(
                f"{run_dir} was trained with plugin {recorded.describe()}; name it to {doing} "
                f"this run (--plugin {recorded.source if not recorded.source.startswith('module ') else recorded.name})"
            )
        if now.sha256 != recorded.sha256:
            raise UserError(
                f"plugin {recorded.name} changed since {run_dir} was trained (sha256 {recorded.sha256[:12]} "
                f"then, {now.sha256[:12]} now, {now.source}): a changed component is changed math; "
                f"restore it to {doing} this run, or start a new run"
            )
