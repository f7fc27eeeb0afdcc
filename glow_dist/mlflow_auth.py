"""Who this process is to an MLflow tracking server, and what to say when the server refuses it.

Clients authenticate the standard MLflow way, which every MLflow call here inherits: MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD (under glow-dist-horovodrun they reach the ranks on stdin, never on a command line:
distributed/credentials.py), else the `[mlflow]` section of ~/.mlflow/credentials (`mlflow_tracking_username`,
`mlflow_tracking_password`); over https the server's certificate is checked, against MLFLOW_TRACKING_SERVER_CERT_PATH
when set. A refusal is not an outage: HTTP 401 (who you are) or 403 (what you may do) cannot be fixed by retrying,
so training stops at start with the message `refusal` gives, where an unreachable server would only be retried.
"""
from __future__ import annotations

REFUSALS = {"UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403}   # MLflow's error codes for the two statuses


class TrackingAuthError(RuntimeError):
    """The tracking server refused this client (missing or wrong credentials, or no permission); the message says
    what to set."""


def refused_status(error: BaseException) -> int | None:
    """401 or 403 when `error` is an MLflow call that the server refused, else None."""
    return REFUSALS.get(getattr(error, "error_code", None))


def username() -> str | None:
    """The user MLflow's client would authenticate as (environment, then ~/.mlflow/credentials), or None."""
    from mlflow.utils.credentials import read_mlflow_creds

    return read_mlflow_creds().username


def refusal(uri: str, status: int, action: str) -> str:
    """What a 401 or 403 from `uri` means for `action` ("open the run", "download models:/x/1"), and what to do."""
    user = username()
    if status == 401:
        who = f"user {user!r}: wrong password, or no such user" if user else "anonymous: no credentials are set"
        return (f"MLflow at {uri} refused to {action} (HTTP 401, {who}). Set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or ~/.mlflow/credentials) to an account of that server")
    return (f"MLflow at {uri} refused to {action} (HTTP 403: user {user!r} lacks the permission). Ask the server's "
            "admin for it: EDIT on the experiment to train or evaluate into it, READ on a registered model to load it")
