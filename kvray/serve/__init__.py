"""kvray over HTTP: `api` is the FastAPI app and the plain model backend (no Ray); `app` is the
Ray Serve shell around them (`serve run kvray.serve.app:app`, or `deploy(...)`).

Importing this package does not import Ray: `deploy` and `build_app` load `kvray.serve.app`
on first use."""

from __future__ import annotations

from .api import (Backend, GenerateJob, GenerateResult, ModelBackend, RequestError, build_api,
                  get_backend)

_FROM_APP = ("deploy", "build_app", "CompressedLM", "KVRayAPI")


def __getattr__(name: str):
    if name in _FROM_APP:
        from . import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Backend", "GenerateJob", "GenerateResult", "ModelBackend", "RequestError", "build_api",
           "get_backend", *_FROM_APP]
