"""The pinned requirements of one image role, from pyproject.toml (the one list of versions).

    python scripts/requirements.py slim   # core + onnx: services on pre-exported ONNX files or in front of Triton
    python scripts/requirements.py full   # every extra: torch, onnx, science, registry, jobs

The Dockerfile installs these before it copies the code, so a code change does not reinstall dependencies.
Extras that name this project (`vision-serving[torch,onnx]`) are expanded here, as pip would.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
# The extras each role's image carries on top of the core dependencies.
ROLES = {"slim": ("onnx",), "full": ("full",)}


def requirements(role: str, pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    self_reference = re.compile(rf"^{re.escape(project['name'])}\[([^\]]+)\]$")
    out: list[str] = list(project["dependencies"])
    seen: set[str] = set()

    def add(extra: str) -> None:
        if extra in seen:
            return
        seen.add(extra)
        for requirement in extras[extra]:
            if match := self_reference.match(requirement.replace(" ", "")):
                for name in match.group(1).split(","):
                    add(name)
            elif requirement not in out:
                out.append(requirement)

    for extra in ROLES[role]:
        add(extra)
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1 or argv[0] not in ROLES:
        print(f"usage: requirements.py {{{','.join(ROLES)}}}", file=sys.stderr)
        return 2
    print("\n".join(requirements(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
