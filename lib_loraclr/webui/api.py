"""REST endpoints for automation: list LoRAs, start a merge, poll it, cancel it.

They follow the host's own rules for its API, because they write into the Lora folder and
start jobs that hold the model for minutes: mounted only when the host serves its API
(``--api``, or ``--nowebui`` where the API is all there is), and behind the same HTTP Basic
credentials as ``/sdapi/v1/*`` when ``--api-auth user:password[,user2:password2]`` is set
(as A1111's and Forge's ``modules/api/api.py`` check them). Bad requests get HTTP 400 with the
same message the tab shows; unknown job ids get 404.
"""

# No ``from __future__ import annotations``: FastAPI reads the dependency's annotation at runtime.
from secrets import compare_digest

from ..merge.pipeline import json_safe
from .merge_service import MergeRequest, MergeService

PREFIX = "/loraclr/v1"
HOST_API_ROUTE = "/sdapi/v1/txt2img"  # mounted by the host's create_api before extensions' app_started


def api_enabled(app, host) -> bool:
    """Whether the host serves its own API: by its command line, or because its routes are there."""
    if host.command_option("api") or host.command_option("nowebui"):
        return True
    return any(getattr(route, "path", None) == HOST_API_ROUTE for route in getattr(app, "routes", ()))


def parse_credentials(spec: str) -> list[tuple[str, str]]:
    """``--api-auth`` as the hosts read it: comma-separated ``user:password`` (the password may hold ':')."""
    pairs = []
    for item in spec.split(","):
        user, separator, password = item.partition(":")
        if not separator:
            raise ValueError("--api-auth must be user:password[,user2:password2]")
        pairs.append((user, password))
    return pairs


def basic_auth(spec: str):
    """A FastAPI dependency accepting only these HTTP Basic credentials (401 otherwise)."""
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPBasic, HTTPBasicCredentials

    accepted = [(user.encode(), password.encode()) for user, password in parse_credentials(spec)]

    def check(credentials: HTTPBasicCredentials = Depends(HTTPBasic())):
        given = (credentials.username.encode(), credentials.password.encode())
        # compare every pair in full (bytes, so non-ASCII input is compared, not a TypeError)
        matches = [compare_digest(given[0], user) & compare_digest(given[1], password) for user, password in accepted]
        if not any(matches):
            raise HTTPException(status_code=401, detail="Incorrect username or password",
                                headers={"WWW-Authenticate": "Basic"})
        return True

    return check


def register_api(app, service: MergeService) -> bool:
    """Mount the routes on the host's FastAPI app if its API is enabled; returns whether it did."""
    from fastapi import Body, Depends, HTTPException

    host = service.host
    if not api_enabled(app, host):
        return False
    auth = host.command_option("api_auth")
    dependencies = [Depends(basic_auth(auth))] if auth else []

    def loras():
        return [{"name": name, "path": path, "arch": host.lora_arch(path)} for name, path in host.lora_files().items()]

    def start_merge(payload: dict = Body(...)):
        try:
            job_id = service.start(MergeRequest.from_dict(payload))
        except (ValueError, TypeError, OSError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        return json_safe({"job": job_id, **service.status(job_id).to_dict()})

    def job_status(job_id: str):
        try:
            return json_safe(service.status(job_id).to_dict())
        except KeyError as error:
            raise HTTPException(status_code=404, detail=str(error)) from error

    def cancel_job(job_id: str):
        try:
            return json_safe(service.cancel(job_id).to_dict())
        except KeyError as error:
            raise HTTPException(status_code=404, detail=str(error)) from error

    app.add_api_route(f"{PREFIX}/loras", loras, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/merge", start_merge, methods=["POST"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/merge/{{job_id}}", job_status, methods=["GET"], dependencies=dependencies)
    app.add_api_route(f"{PREFIX}/merge/{{job_id}}/cancel", cancel_job, methods=["POST"], dependencies=dependencies)
    return True
