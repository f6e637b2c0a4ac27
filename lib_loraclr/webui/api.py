"""REST endpoints for automation: list LoRAs, start a merge, poll it, cancel it.

Mounted on the WebUI's FastAPI app (``--api`` not required). Bad requests get HTTP 400 with
the same message the tab shows; unknown job ids get 404.
"""

from __future__ import annotations

from .merge_service import MergeRequest, MergeService

PREFIX = "/loraclr/v1"


def register_api(app, service: MergeService) -> None:
    from fastapi import Body, HTTPException

    def loras():
        host = service.host
        return [{"name": name, "path": path, "arch": host.lora_arch(path)} for name, path in host.lora_files().items()]

    def start_merge(payload: dict = Body(...)):
        try:
            job_id = service.start(MergeRequest.from_dict(payload))
        except (ValueError, TypeError, OSError) as error:
            raise HTTPException(status_code=400, detail=str(error)) from error
        return {"job": job_id, **service.status(job_id).to_dict()}

    def job_status(job_id: str):
        try:
            return service.status(job_id).to_dict()
        except KeyError as error:
            raise HTTPException(status_code=404, detail=str(error)) from error

    def cancel_job(job_id: str):
        try:
            return service.cancel(job_id).to_dict()
        except KeyError as error:
            raise HTTPException(status_code=404, detail=str(error)) from error

    app.add_api_route(f"{PREFIX}/loras", loras, methods=["GET"])
    app.add_api_route(f"{PREFIX}/merge", start_merge, methods=["POST"])
    app.add_api_route(f"{PREFIX}/merge/{{job_id}}", job_status, methods=["GET"])
    app.add_api_route(f"{PREFIX}/merge/{{job_id}}/cancel", cancel_job, methods=["POST"])
