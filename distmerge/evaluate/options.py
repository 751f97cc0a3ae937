"""What an evaluation run is asked to do (``EvalOptions``), checked when it is built, before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from distmerge import validate
from distmerge.evaluate.sandbox import SandboxLimits

DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "transformers", "vllm")
LIGHT_TASK_CPUS = 0.25  # read, prepare and score tasks: mostly waiting on I/O or a sandboxed child


@dataclass(frozen=True)
class EvalOptions:
    batch_size: int = 8
    workers: int = 1
    limit: int | None = None
    max_new_tokens: int | None = None  # default: the task's (the papers' limits)
    max_length: int | None = None  # classify/perplexity tokens per input; default: the task's, capped by the model
    device: str = "auto"  # auto: cuda when the cluster has GPUs
    backend: str = "auto"  # generation: auto = vllm when importable and on GPU, else transformers
    cpus_per_worker: float | None = None  # default: a share that leaves room for the light tasks
    sandbox: SandboxLimits = field(default_factory=SandboxLimits)
    progress: bool | None = None  # Ray Data progress bars; None: Ray Data's default

    def __post_init__(self):
        for name in ("batch_size", "workers"):
            validate.number(name, getattr(self, name), 1, integer=True)
        for name in ("limit", "max_new_tokens", "max_length"):
            if getattr(self, name) is not None:
                validate.number(name, getattr(self, name), 1, integer=True)
        validate.choice("device", self.device, DEVICES)
        validate.choice("backend", self.backend, BACKENDS)
        if self.cpus_per_worker is not None:
            validate.number("cpus_per_worker", self.cpus_per_worker, 0, lo_open=True)
