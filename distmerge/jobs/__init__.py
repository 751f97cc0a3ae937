"""Running pipelines on a Ray cluster: a local head (``cluster up``/``down``), the address a command talks to,
submission through Ray's Job Submission API with the project as the job's ``working_dir``, logs and stop.

Where the address comes from, in order: ``--address``, ``RAY_ADDRESS``, the local cluster ``cluster up``
recorded in its state file (``$DISTMERGE_CLUSTER_DIR``, default ``~/.distmerge/cluster``), else an error that
says how to start one.

A pipeline declares the pip packages it needs beyond distmerge's own dependencies as a module-level literal,
read without importing the script (importing would need those very packages)::

    REQUIREMENTS = ["datasets>=2.19", "evaluate"]

``submit`` puts them in the job's ``runtime_env["pip"]``; Ray installs them in a virtualenv on top of the
cluster's Python for that job only.

The package: ``local_cluster`` (the head on this machine), ``auth`` (the token), ``packaging`` (a pipeline
as a job ships it), ``client`` (address, submission, logs, stop); everything is importable from here.
"""

from __future__ import annotations

from distmerge.jobs.errors import (  # noqa: F401
    ClusterError, HOW_TO_AUTH, HOW_TO_START, PipelineError,
)
from distmerge.jobs.auth import (  # noqa: F401
    auth_headers, default_token_path, ensure_token_file, make_token_private, _read_token, token_at_hand,
    token_file,
)
from distmerge.jobs.local_cluster import (  # noqa: F401
    BLOCK_MARKER, cluster_down, cluster_processes, cluster_status, cluster_up, ClusterState,
    _dashboard_version, default_num_gpus, _gcs_address, _group_alive, head_environment, _is_our_head,
    Listener, listening_ports, LocalClusterSpec, LOOPBACK, _process_label, ray_start_command, read_state,
    running_state, SINGLE_MACHINE_ENV, START_LOG, state_dir, STATE_DIR_ENV, STATE_FILE, _stop_process_group,
    _tail, _url_host, _write_state,
)
from distmerge.jobs.packaging import (  # noqa: F401
    build_runtime_env, config_hash, distmerge_package_dir, find_project_root, job_metadata, load_pipeline,
    Pipeline, read_requirements, submission_id, WORKING_DIR_EXCLUDES,
)
from distmerge.jobs.client import (  # noqa: F401
    connect, exit_code, _first_line, follow, job_info, JobRow, list_jobs, _normalize, resolve_address,
    _status, stop_job, Submission, submit, Target, TERMINAL,
)
