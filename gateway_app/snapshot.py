"""Everything a reload may change, as one immutable object: the routes and their settings, the API keys,
the engine credential. A reload builds a new snapshot and swaps it whole; a request uses the snapshot it
started with to its end."""

from __future__ import annotations

from dataclasses import dataclass

from gateway_app.auth import ANONYMOUS, Client, KeyStore
from gateway_app.config import Settings
from gateway_app.rate_limit import Limits
from gateway_app.route_table import RouteTable


@dataclass(frozen=True, slots=True)
class Snapshot:
    routes: RouteTable
    keys: KeyStore | None  # None: authentication is off
    engine_auth: tuple[tuple[str, str], ...]  # headers for every engine request

    @property
    def settings(self) -> Settings:
        return self.routes.settings

    def authenticate(self, headers: list[tuple[bytes, bytes]]) -> Client:
        keys = self.keys
        return ANONYMOUS if keys is None else keys.authenticate(headers)

    def limits_for(self, client: Client) -> Limits:
        """The client's own limits, else the map-wide defaults."""
        defaults = self.routes.settings.limits
        return Limits(
            client.requests_per_minute if client.requests_per_minute is not None else defaults.requests_per_minute,
            client.tokens_per_minute if client.tokens_per_minute is not None else defaults.tokens_per_minute,
        )
