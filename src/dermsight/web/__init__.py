"""The dermsight web application: upload pages, condition pages and the JSON API (see `create_app`)."""

from dermsight.web.app import create_app

__all__ = ["create_app"]
