"""`ldm-serve`: parse the settings, refuse unsafe ones, run the app under uvicorn. SIGTERM/SIGINT drain: new jobs
get 503, the running job has --grace seconds to finish (else it goes back to the queue), queued jobs stay in the
database for the next start, then the process exits 0."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Sequence

import uvicorn

from ldm.serve.settings import SettingsError, parse_settings

log = logging.getLogger("ldm.serve")


class DrainingServer(uvicorn.Server):
    """uvicorn, but the first SIGTERM/SIGINT drains the job queue before the server stops listening."""

    def __init__(self, config: uvicorn.Config, service, grace: float):
        super().__init__(config)
        self.service = service
        self.grace = grace
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:  # a second signal: stop now (the running job is re-run at the next start)
            self.service.worker.abort()
            return super().handle_exit(sig, frame)
        self._draining = True
        log.info('{"event": "draining", "grace_seconds": %s}', self.grace)

        def drain() -> None:
            self.service.drain(self.grace)
            self.should_exit = True

        threading.Thread(target=drain, name="ldm-serve-drain", daemon=True).start()


def page_url(host: str, port: int) -> str:
    """The address a browser on this machine opens: a wildcard bind is reached through loopback."""
    shown = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "[::1]"}.get(host, host)
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def serve_on_ray(settings) -> int:
    """`--ray`: the same app on Ray Serve (ldm.serve.ray_serve, the only serving module that imports Ray)."""
    try:
        from ldm.serve import ray_serve
    except ImportError as e:
        missing = (e.name or "ray").split(".")[0] == "ray"
        reason = "Ray is not installed" if missing else f"Ray cannot be imported ({e})"
        print(f'error: {reason}; install it with: pip install -e ".[ray]"', file=sys.stderr)
        return 2
    return ray_serve.serve_forever(settings)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_settings(argv)
    except SettingsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if settings.ray is not None:
        return serve_on_ray(settings)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    import torch  # the model's imports come after the settings are known to be good: a refusal is quick

    from ldm.serve.app import create_app

    # One core is left to the event loop: on a small CPU machine, OpenMP threads that share their cores with it
    # slow sampling down many times over (docs/serving.md, "Under load").
    torch.set_num_threads(settings.threads or max(1, (os.cpu_count() or 1) - 1))
    from ldm.serve.store import DataDirBusy

    try:
        app = create_app(settings)
    except DataDirBusy as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        access_log=False,  # ours is structured (ldm.serve.access)
        log_level="warning",
        proxy_headers=settings.forwarded_allow_ips is not None,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=5,
    )
    server = DrainingServer(config, app.state.service, settings.grace)
    log.info('{"event": "listening", "url": "http://%s:%d", "data_dir": "%s"}', settings.host, settings.port,
             settings.data_dir)  # fmt: skip
    print(f"ldm-serve: open {page_url(settings.host, settings.port)} in a browser (the web page; "
          "the API is under /v1, /sdapi/v1, docs/serving.md)", flush=True)  # fmt: skip
    server.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
