"""The console: server-rendered pages at `/console` over the same services as the API and the
CLI (see `install_service.console.pages`). `ConsolePlugin` adds it to an app in one line."""

from install_service.console.plugin import ConsolePlugin

__all__ = ["ConsolePlugin"]
