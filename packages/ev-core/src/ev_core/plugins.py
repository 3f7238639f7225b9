"""Discovery of installed ev packages through entry points.

Every ev package registers

* its typer CLI in the group ``ev.cli`` (so ``ev reid ...`` runs ``ev-reid ...``), and
* once it has one, a demo function in the group ``ev.demo`` with the signature
  :data:`DemoFn`: ``demo(out_dir: Path, quick: bool) -> dict`` returning the metrics it wrote.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

CLI_GROUP = "ev.cli"
DEMO_GROUP = "ev.demo"

DemoFn = Callable[[Path, bool], dict[str, Any]]


@dataclass(frozen=True)
class Plugin:
    """An installed ev package as seen through its entry points."""

    name: str
    distribution: str
    version: str
    cli: EntryPoint
    demo: EntryPoint | None


def discover_plugins() -> list[Plugin]:
    """All installed ev packages that registered a CLI, sorted by name."""
    demos = {ep.name: ep for ep in entry_points(group=DEMO_GROUP)}
    plugins = []
    for ep in entry_points(group=CLI_GROUP):
        dist = ep.dist
        plugins.append(
            Plugin(
                name=ep.name,
                distribution=dist.metadata["Name"] if dist is not None else ep.module,
                version=dist.version if dist is not None else "unknown",
                cli=ep,
                demo=demos.get(ep.name),
            )
        )
    return sorted(plugins, key=lambda p: p.name)
