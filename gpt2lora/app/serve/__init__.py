"""``gpt2lora serve``: an OpenAI-compatible server for one base model and many LoRA adapters, with continuous
batching across adapters (:mod:`.engine`), the HTTP API (:mod:`.api`) and request checks (:mod:`.schemas`).

Needs the ``serve`` extra: ``pip install 'gpt2lora[serve]'``.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Self

from ...errors import ConfigError
from .models import ServedModels


def _uvicorn() -> Any:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConfigError("gpt2lora serve needs the serve extra: pip install 'gpt2lora[serve]'") from None
    return uvicorn


def parse_adapters(specs: list[str] | None) -> dict[str, str]:
    """``NAME=PATH`` flags as a dict, each name once."""
    adapters: dict[str, str] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--adapter {spec!r}: expected NAME=RUN_OR_ADAPTER_DIR")
        if name in adapters:
            raise ConfigError(f"--adapter {spec!r}: the name {name!r} is given twice")
        adapters[name] = path
    return adapters


def build_app(base: str, adapters: dict[str, str] | None = None, api_key: str | None = None,
              adapter_root: str | None = None, **options: Any) -> Any:
    """The ASGI app for ``base`` and ``adapters``; ``options`` go to :class:`ServedModels`."""
    _uvicorn()
    from .api import create_app

    return create_app(ServedModels(base, adapters, **options), api_key=api_key, adapter_root=adapter_root)


def serve(base: str, adapters: dict[str, str] | None = None, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, adapter_root: str | None = None, shutdown_timeout: float = 30.0,
          log_level: str = "info", **options: Any) -> None:
    """Serve until SIGINT/SIGTERM: in-flight requests finish (up to ``shutdown_timeout`` s), then stop."""
    uvicorn = _uvicorn()
    app = build_app(base, adapters, api_key, adapter_root, **options)
    app.state.api.shutdown_timeout = shutdown_timeout
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout)


class BackgroundServer:
    """An app served by uvicorn on a thread of this process (notebooks, tests); a free port when ``port=0``.

    ``with BackgroundServer(app) as server: ...`` serves at ``server.url`` and stops on exit.
    """

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> None:
        uvicorn = _uvicorn()
        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.url = f"http://{host}:{port}"
        self.timeout = timeout
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gpt2lora-serve", daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the server at {self.url} did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)


__all__ = ["BackgroundServer", "ServedModels", "build_app", "parse_adapters", "serve"]
