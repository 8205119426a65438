"""Errors answer by their type, never by their text: each server's ``STATUSES`` table, served by a
real app on 127.0.0.1 (``rbee/http/app.py``), the nearest class of an error's MRO winning."""

from __future__ import annotations

import httpx
import pytest
import trio
from starlette.requests import Request
from starlette.routing import Route

from rbee._errors import (
    CgroupError,
    ContractError,
    LimitError,
    NotFoundError,
    SpawnError,
    StoreError,
    WorkerExistsError,
)
from rbee.config import HttpSettings
from rbee.hive.api import STATUSES as HIVE_STATUSES
from rbee.http.app import json_app
from rbee.http.serving import serve
from rbee.queen.api import STATUSES as QUEEN_STATUSES
from rbee.queen.history import QueryError

CASES = [
    (HIVE_STATUSES, WorkerExistsError("worker llm/a already exists", group="llm", instance="a"), 409),
    (HIVE_STATUSES, SpawnError("empty command line"), 400),
    (HIVE_STATUSES, SpawnError("a cgroup that already exists is not ours"), 400),  # not the text
    (HIVE_STATUSES, LimitError("memory_limit '12Q'"), 400),
    (HIVE_STATUSES, NotFoundError("no worker llm/b"), 404),
    (HIVE_STATUSES, CgroupError("no cpu controller"), 503),
    (HIVE_STATUSES, ContractError("invalid worker: bad"), 400),
    (QUEEN_STATUSES, NotFoundError("unknown hive 'x'"), 404),
    (QUEEN_STATUSES, QueryError("unknown gpu"), 400),
    (QUEEN_STATUSES, StoreError("Redis at redis://r: gone"), 503),
]


@pytest.mark.parametrize("statuses, error, status", CASES,
                         ids=[f"{type(e).__name__}-{s}-{n}" for n, (_, e, s) in enumerate(CASES)])
async def test_an_error_answers_by_its_type(nursery, statuses, error, status):
    async def fail(request: Request):
        raise error

    app = json_app([Route("/fail", fail)], HttpSettings(), statuses)
    stop = trio.Event()
    urls = await nursery.start(lambda task_status: serve(
        app, "127.0.0.1", 0, HttpSettings(), shutdown_trigger=stop.wait, task_status=task_status))
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            response = await client.get(f"{urls[0]}/fail")
    finally:
        stop.set()
    assert response.status_code == status
    assert response.json() == {"status": "error", "message": str(error)}

