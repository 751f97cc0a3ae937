"""A pipeline as a Ray job ships it: the script, the project folder as ``working_dir``, its declared pip
requirements (read without importing the script), and what identifies the run (a hash of the script, its
arguments and the files they name)."""

from __future__ import annotations

import ast
import hashlib
import secrets
import shlex
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distmerge.jobs.errors import PipelineError


# Never shipped to the cluster: environments, VCS data, caches, benchmark outputs, local run folders.
WORKING_DIR_EXCLUDES = (
    ".git", ".venv*", "venv", "**/__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".cache", "build", "dist", "benchmarks/results", "distmerge-demo", "/out",
    "*.safetensors", "*.bin", "*.pt",
)


@dataclass(frozen=True)
class Pipeline:
    path: Path
    project_root: Path
    requirements: tuple[str, ...]

    @property
    def relative(self) -> str:
        return self.path.relative_to(self.project_root).as_posix()


def read_requirements(path: Path) -> tuple[str, ...]:
    """The script's module-level ``REQUIREMENTS = [...]`` (a literal list of strings), without importing it."""
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as exc:
        raise PipelineError(f"pipeline '{path}': syntax error at line {exc.lineno}: {exc.msg}") from None
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) and node.value is not None else []
        if not any(isinstance(t, ast.Name) and t.id == "REQUIREMENTS" for t in targets):
            continue
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            value = None
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
            raise PipelineError(f"pipeline '{path}', line {node.lineno}: REQUIREMENTS must be a literal list of "
                                "pip requirement strings, e.g. REQUIREMENTS = [\"datasets>=2.19\"]")
        return tuple(v.strip() for v in value)
    return ()


def distmerge_package_dir() -> Path:
    return Path(__file__).resolve().parent.parent  # distmerge/, above jobs/


def find_project_root(pipeline: Path) -> Path:
    """The nearest folder above the pipeline holding a pyproject.toml (the project it belongs to); else its own
    folder."""
    for folder in pipeline.parents:
        if (folder / "pyproject.toml").is_file():
            return folder
    return pipeline.parent


def load_pipeline(path: str | Path, project: str | Path | None = None) -> Pipeline:
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise PipelineError(f"pipeline '{path}' does not exist")
    if path.suffix != ".py":
        raise PipelineError(f"pipeline '{path}' is not a Python script (.py)")
    root = Path(project).expanduser().resolve() if project else find_project_root(path)
    if not root.is_dir():
        raise PipelineError(f"--project: '{root}' is not a folder")
    if root not in path.parents:
        raise PipelineError(f"pipeline '{path}' is outside the project folder '{root}' that is shipped as the job's "
                            "working_dir; move it under the project or pass --project")
    return Pipeline(path=path, project_root=root, requirements=read_requirements(path))


def build_runtime_env(pipeline: Pipeline, extra_env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The job's runtime_env: the project as working_dir (importable: Ray puts it first on PYTHONPATH), distmerge
    itself as a py_module when the project does not contain it, the pipeline's pip requirements."""
    env_vars = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    env_vars.update(extra_env or {})
    runtime_env: dict[str, Any] = {"working_dir": str(pipeline.project_root),
                                   "excludes": list(WORKING_DIR_EXCLUDES), "env_vars": env_vars}
    package = distmerge_package_dir()
    if pipeline.project_root not in package.parents:
        runtime_env["py_modules"] = [str(package)]
    if pipeline.requirements:
        runtime_env["pip"] = list(pipeline.requirements)
    return runtime_env


def config_hash(pipeline: Pipeline, args: list[str], cwd: Path | None = None) -> str:
    """Identifies what ran: the pipeline's text, its arguments, and the contents of arguments naming files."""
    digest = hashlib.sha256()
    digest.update(pipeline.relative.encode())
    digest.update(pipeline.path.read_bytes())
    for arg in args:
        digest.update(b"\0" + arg.encode())
        candidate = Path(cwd or Path.cwd(), arg)
        if len(arg) < 4096 and candidate.is_file():
            digest.update(candidate.read_bytes())
    return digest.hexdigest()[:12]


def job_metadata(pipeline: Pipeline, args: list[str]) -> dict[str, str]:
    from distmerge import __version__

    return {"submitted_by": "distmerge", "distmerge_version": __version__, "pipeline": pipeline.relative,
            "args": shlex.join(args), "config_hash": config_hash(pipeline, args),
            "requirements": ", ".join(pipeline.requirements)}


def submission_id(pipeline: Pipeline) -> str:
    stem = "".join(c if c.isalnum() else "-" for c in pipeline.path.stem.lower())
    return f"distmerge-{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
