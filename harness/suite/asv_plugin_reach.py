"""capsbench's asv plugin (``"plugins"`` in asv.conf.json) that says which installed implementation plugins a
run cannot measure.

Plain ``asv run`` builds an environment of its own from a commit of the repository and installs capsbench
there, not the plugin packages installed where ``asv`` runs (entry points of ``capsbench.implementations``):
the suite there does not know them, so the run would measure none of them without a word.  Before such a run
this plugin names them in one warning with the command that measures them, ``asv run --python=same`` from
the environment they are installed in (docs/plugins.md).  It reads the entry points' names only: no plugin
is imported into asv's process.
"""

from __future__ import annotations

import functools
from importlib import metadata

from asv import environment
from asv.commands.run import Run
from asv.console import log

from harness.registry import ENTRY_POINT_GROUP


def builds_its_environments(conf, env_spec: list[str] | None) -> bool:
    """Whether asv builds an environment of its own for the run, by asv's own reading of ``env_spec``
    (``-E``/``--python``; ``--python=same`` is an existing environment) and the configuration."""
    try:
        return not environment.is_existing_only(list(environment.get_environments(conf, env_spec, verbose=False)))
    except environment.EnvironmentUnavailable:
        return False  # asv itself says what is wrong with the environment asked for


def unreachable_plugins_warning(conf, env_spec: list[str] | None) -> str | None:
    """The warning for a run in an environment asv builds, naming the implementation plugins installed here;
    None where there is none or the run uses an existing environment."""
    names = sorted({entry.name for entry in metadata.entry_points(group=ENTRY_POINT_GROUP)})
    if not names or not builds_its_environments(conf, env_spec):
        return None
    return (f"capsbench: the implementation plugins installed here ({', '.join(names)}) are not in the environment "
            f"asv builds, so this run measures none of them; measure them with `asv run --python=same "
            f"--set-commit-hash $(git rev-parse HEAD)` from this environment (docs/plugins.md#the-asv-suite)")


def warning_of_unreachable_plugins(run):
    """``Run.run`` (a classmethod's function) that first logs :func:`unreachable_plugins_warning`."""

    @functools.wraps(run)
    def warned(cls, conf, *args, env_spec=None, **kwargs):
        warning = unreachable_plugins_warning(conf, env_spec)
        if warning:
            log.warning(warning)
        return run(cls, conf, *args, env_spec=env_spec, **kwargs)

    warned.warns_of_unreachable_plugins = True
    return warned


def setup() -> None:
    """asv's plugin hook, called once when asv loads the configuration: wrap ``Run.run`` (``asv run`` and
    ``asv continuous``)."""
    run = Run.run.__func__
    if not getattr(run, "warns_of_unreachable_plugins", False):
        Run.run = classmethod(warning_of_unreachable_plugins(run))
