"""The Hugging Face hub as the commands meet it: offline mode, and one short probe before a download.

Asked for a model or dataset the hub cannot give, transformers and datasets retry for about half
a minute and then fail with a long traceback, and a name that does not exist fails the same way.
`probe_hub` asks the hub once, with a `PROBE_TIMEOUT_S` timeout and no retries, so a command can
say in one line which it is (no such repository, gated, no such revision, hub unreachable) before
it starts any work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

PROBE_TIMEOUT_S = 5.0
_TRUE = ("1", "ON", "YES", "TRUE")


def hub_offline() -> bool:
    """Whether offline mode is set (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``), read now rather than at import."""
    return any(os.environ.get(name, "").upper() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


@dataclass(frozen=True)
class HubProblem:
    """Why the hub cannot give a repository: ``reason`` (a clause for an error message); ``reachable``
    is False when the hub did not answer (so a cached copy may stand in)."""

    reason: str
    reachable: bool


def probe_hub(repo_id: str, *, kind: str = "model", revision: str | None = None) -> HubProblem | None:
    """None when the hub gives ``repo_id`` (a model's ``config.json``, or a dataset) at ``revision``; else why not.

    One request of at most `PROBE_TIMEOUT_S` seconds, with the user's stored token (private and
    gated repositories the user may read pass).
    """
    from huggingface_hub import dataset_info, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import (
        EntryNotFoundError, GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError,
    )

    try:
        if kind == "model":
            get_hf_file_metadata(hf_hub_url(repo_id, "config.json", revision=revision), timeout=PROBE_TIMEOUT_S)
        else:
            dataset_info(repo_id, revision=revision, timeout=PROBE_TIMEOUT_S)
    except HFValidationError:
        return HubProblem(f"{repo_id!r} is not a valid Hugging Face hub name", reachable=True)
    except GatedRepoError:
        return HubProblem(f"the {kind} {repo_id!r} is gated: accept its terms on huggingface.co, then log in "
                          "with `hf auth login`", reachable=True)
    except RepositoryNotFoundError:
        return HubProblem(f"the Hugging Face hub has no {kind} {repo_id!r} (if it is private, log in with "
                          "`hf auth login`)", reachable=True)
    except RevisionNotFoundError:
        return HubProblem(f"the {kind} {repo_id!r} has no revision {revision!r}", reachable=True)
    except EntryNotFoundError:
        return HubProblem(f"the hub's {repo_id!r} has no config.json: it is not a transformers model",
                          reachable=True)
    except Exception as err:  # noqa: BLE001  (connection, DNS, TLS, timeout, 5xx: whatever the HTTP stack raises)
        return HubProblem(f"the Hugging Face hub cannot be reached ({type(err).__name__}: {err})", reachable=False)
    return None
