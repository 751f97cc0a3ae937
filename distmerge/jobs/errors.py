"""The errors of the cluster and job commands, and the hints their messages end with."""

from __future__ import annotations

from distmerge.errors import DistmergeError


class ClusterError(DistmergeError):
    """No cluster to talk to, or the cluster refused or failed a request."""


class PipelineError(DistmergeError):
    """The pipeline script cannot be submitted as it is."""


HOW_TO_START = ("start one with `distmerge cluster up`, pass --address http://HOST:8265, or set RAY_ADDRESS")
HOW_TO_AUTH = ("set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token (`ray get-auth-token` on the head "
               "prints it)")
