"""Print the pip requirements of oodflow's core and the given extras, read from pyproject.toml,
with ONNX Runtime replaced by one explicit requirement.

The image build (deploy/Dockerfile) installs these before the project itself (`pip install
--no-deps .`), so the dependency layer is cached until pyproject.toml changes, and each variant
gets exactly one ONNX Runtime: pyproject picks onnxruntime-gpu on Linux x86-64, which the CPU image
does not want (its CUDA provider library alone is ~280 MB), and the CUDA image wants it with its
CUDA wheels and a pinned CUDA major version. onnxruntime and onnxruntime-gpu write the same
package folder, so they must never both be installed.

    python deploy/requirements.py serve,ray "onnxruntime==1.32.0" > requirements.txt

Markers (e.g. uvloop's `sys_platform != 'win32'`) are kept; pip evaluates them. Python >= 3.11
standard library only.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

__all__ = ["ONNXRUNTIME_DISTRIBUTIONS", "main", "requirements"]

ONNXRUNTIME_DISTRIBUTIONS = frozenset({"onnxruntime", "onnxruntime-gpu"})
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def _name(requirement: str) -> str:
    match = _NAME.match(requirement)
    if match is None:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def requirements(pyproject: Path, extras: list[str], onnxruntime: str) -> list[str]:
    """Core dependencies plus `extras`, without duplicates, ONNX Runtime replaced by `onnxruntime`."""
    project = tomllib.loads(Path(pyproject).read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    unknown = [extra for extra in extras if extra not in optional]
    if unknown:
        raise ValueError(f"unknown extras {unknown}; pyproject.toml has {sorted(optional)}")
    if _name(onnxruntime) not in ONNXRUNTIME_DISTRIBUTIONS:
        raise ValueError(f"{onnxruntime!r} is not an ONNX Runtime requirement")
    wanted = [*project.get("dependencies", []), *(r for extra in extras for r in optional[extra])]
    selected: list[str] = []
    for requirement in wanted:
        if _name(requirement) in ONNXRUNTIME_DISTRIBUTIONS or requirement in selected:
            continue
        selected.append(requirement)
    return [*selected, onnxruntime]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("extras", help="comma-separated extras of pyproject.toml, e.g. serve or serve,ray")
    parser.add_argument("onnxruntime", help="the one ONNX Runtime requirement, e.g. onnxruntime==1.32.0")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args(argv)
    extras = [extra for extra in args.extras.split(",") if extra]
    try:
        lines = requirements(args.pyproject, extras, args.onnxruntime)
    except (OSError, ValueError, KeyError) as exc:
        print(f"requirements: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
